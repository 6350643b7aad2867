"""Training states and steps on a device mesh: the shardings of a TrainState.

The mesh primitives (:func:`flatjax.make_mesh`, :func:`flatjax.batch_sharding`,
:func:`flatjax.shard_batch`, ...) know nothing of training; this module lays
a :class:`~flatjax.training.TrainState` out on the ``("replica", "data")``
mesh: Replicated-SGD's replicas (params, BatchNorm statistics, each
replica's optimizer state) over ``"replica"``, everything else replicated,
and compiles the unchanged training step as a sharded ``jit`` (XLA places
the collectives: GSPMD, Xu et al. 2021, arXiv:2105.04663).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flatjax._mesh import (
    REPLICA_AXIS,
    _check_layout,
    _check_mesh,
    batch_sharding,
    put_on_mesh,
)
from flatjax._rsgd import ReplicateState
from flatjax.training import algorithms

__all__ = ["batch_layout", "train_state_sharding", "shard_train_state", "shard_train_step"]


def batch_layout(config) -> str:
    """The batch layout a training config's step takes.

    ``'replicas'`` ([y, B, ...], Replicated-SGD), ``'stacked'`` ([L, B, ...],
    Entropy-SGD in scan mode) or ``'batch'`` ([B, ...], SGD and Entropy-SGD
    stepwise).

    Args:
      config: a config from :func:`flatjax.training.base_config`.

    Returns:
      The layout name, for :func:`flatjax.batch_sharding` and :func:`flatjax.shard_batch`.

    Example:
      >>> import flatjax
      >>> from flatjax.training import base_config
      >>> config = base_config()
      >>> config.algorithm = "entropy_sgd"
      >>> flatjax.training.batch_layout(config)
      'stacked'
    """
    return algorithms.get(config.algorithm).batch_layout(config)


def _replicate_state_spec(opt_state, replica_spec):
    """Per-leaf PartitionSpecs of an optimizer state: ReplicateState.base_state sharded."""

    def spec(node):
        if isinstance(node, ReplicateState):
            return node._replace(
                count=P(),
                coupling=P(),
                requested_coupling=P(),
                center_distance=P(),
                base_state=jax.tree.map(lambda _: replica_spec, node.base_state),
                center=jax.tree.map(lambda _: P(), node.center),
                center_state=jax.tree.map(lambda _: P(), node.center_state),
            )
        return P()

    return jax.tree.map(spec, opt_state, is_leaf=lambda x: isinstance(x, ReplicateState))


def _leading_sizes(tree) -> set:
    return {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(tree)}


def train_state_sharding(state, mesh: Mesh):
    """The sharding of every leaf of a :class:`flatjax.training.TrainState` on ``mesh``.

    Replicated-SGD (an algorithm with replicas): params, BatchNorm
    statistics and the base optimizer's per-replica state (the leading
    replica axis y) are sharded over ``"replica"``; the step, the key and the
    scalars of :class:`flatjax.ReplicateState` are replicated. SGD and
    Entropy-SGD: everything is replicated (data parallelism).

    Args:
      state: a ``TrainState`` (or any object with ``params``,
        ``batch_stats``, ``opt_state`` and ``algorithm``; only its structure
        and shapes are read).
      mesh: a mesh from :func:`flatjax.make_mesh`.

    Returns:
      A pytree of ``NamedSharding`` shaped like ``state``.

    Raises:
      ValueError: y not divisible by the mesh's replica size.

    Example:
      >>> import jax, flatjax
      >>> from flatjax.models.mlp import MLPTiny
      >>> from flatjax.training import base_config, create_train_state
      >>> config = base_config()
      >>> config.algorithm, config.rsgd.coupling = "replicated_sgd", 1.0
      >>> config.rsgd.num_replicas = 2
      >>> state = create_train_state(config, MLPTiny(num_classes=2),
      ...                            {"input_shape": (3,), "num_train": 1024},
      ...                            jax.random.PRNGKey(0))
      >>> mesh = flatjax.make_mesh(replica=2, devices=jax.devices()[:2])
      >>> s = flatjax.training.train_state_sharding(state, mesh)
      >>> s.params["Dense_0"]["kernel"].spec, s.step.spec
      (P('replica',), P())
    """
    _check_mesh(mesh)
    replicated = NamedSharding(mesh, P())
    if not algorithms.get(getattr(state, "algorithm", "sgd")).has_replicas:
        return jax.tree.map(lambda _: replicated, state)
    sizes = _leading_sizes(state.params)
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            "Replicated-SGD params need one leading replica axis on every leaf; found leading "
            f"sizes {sizes}."
        )
    (y,) = sizes
    r = mesh.shape[REPLICA_AXIS]
    if y % r:
        raise ValueError(
            f"num_replicas={y} is not divisible by the mesh's replica axis of size {r}; "
            "every device must hold the same number of replicas "
            f"(use flatjax.make_mesh(replica=k) with k dividing {y})."
        )
    spec = P(REPLICA_AXIS)
    specs = state.replace(
        step=P(),
        params=jax.tree.map(lambda _: spec, state.params),
        batch_stats=jax.tree.map(lambda _: spec, state.batch_stats),
        opt_state=_replicate_state_spec(state.opt_state, spec),
        rng=P(),
        hparams=jax.tree.map(lambda _: P(), getattr(state, "hparams", {})),
    )
    return jax.tree.map(
        lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P)
    )


def shard_train_state(state, mesh: Mesh):
    """Places a training state on ``mesh`` per :func:`train_state_sharding`.

    On several processes every process must pass the same state (same
    seed); each keeps only the shards of its own devices.

    Args:
      state: a :class:`flatjax.training.TrainState`.
      mesh: a mesh from :func:`flatjax.make_mesh`.

    Returns:
      The state with every leaf a sharded ``jax.Array``.

    Example:
      >>> import jax, flatjax
      >>> from flatjax.models.mlp import MLPTiny
      >>> from flatjax.training import base_config, create_train_state
      >>> state = create_train_state(base_config(), MLPTiny(num_classes=2),
      ...                            {"input_shape": (3,), "num_train": 1024},
      ...                            jax.random.PRNGKey(0))
      >>> mesh = flatjax.make_mesh(data=2, devices=jax.devices()[:2])
      >>> sharded = flatjax.training.shard_train_state(state, mesh)
      >>> sharded.params["Dense_0"]["bias"].sharding.num_devices
      2
    """
    return put_on_mesh(state, train_state_sharding(state, mesh))


def shard_train_step(train_step: Callable, mesh: Mesh, state, layout: str) -> Callable:
    """Compiles a training step for ``mesh``: a sharded ``jit`` of the unchanged step.

    ``train_step(state, batch) -> (state, metrics)`` (e.g.
    :func:`flatjax.training.make_train_step`) is jitted with the state
    sharded per :func:`train_state_sharding`, the batch per
    :func:`flatjax.batch_sharding` and the metrics replicated. XLA partitions the
    computation (GSPMD): each device computes its replicas on its part of
    the minibatch; the mean loss over the minibatch makes the gradient a
    mean over ``"data"``, a BatchNorm's batch statistics are means over the
    replica's whole minibatch (synchronised over ``"data"`` only), and the
    centre a mean over ``"replica"``. The numbers equal those of the plain
    step on one device up to float rounding of the reductions.

    For Replicated-SGD set ``config.rsgd.strategy='vmap'`` so the replica
    axis stays a batch dimension XLA can split over devices (the CPU
    default, ``'unroll'``, slices replicas one by one).

    Args:
      train_step: ``step(state, batch) -> (state, metrics)``.
      mesh: a mesh from :func:`flatjax.make_mesh`.
      state: a state of the run (only its structure and shapes are read).
      layout: the batch layout (see :func:`batch_layout`).

    Returns:
      The compiled step; pass it states from :func:`shard_train_state` and
      batches from :func:`flatjax.shard_batch` or :func:`flatjax.host_batch_to_global`.

    Example:
      >>> import jax, numpy as np, flatjax
      >>> from flatjax.models.mlp import MLPTiny
      >>> from flatjax.training import base_config, create_train_state, make_train_step
      >>> config = base_config()
      >>> state = create_train_state(config, MLPTiny(num_classes=2),
      ...                            {"input_shape": (3,), "num_train": 1024},
      ...                            jax.random.PRNGKey(0))
      >>> mesh = flatjax.make_mesh(data=2, devices=jax.devices()[:2])
      >>> step = flatjax.training.shard_train_step(make_train_step(config), mesh, state, "batch")
      >>> batch = flatjax.shard_batch({"image": np.ones((8, 3), np.float32),
      ...                              "label": np.zeros(8, np.int32)}, mesh, "batch")
      >>> state, metrics = step(flatjax.training.shard_train_state(state, mesh), batch)
      >>> int(state.step)
      1
    """
    if not callable(train_step):
        raise TypeError(f"train_step must be callable, got {train_step!r}.")
    _check_mesh(mesh)
    _check_layout(layout)
    state_sharding = train_state_sharding(state, mesh)
    return jax.jit(
        train_step,
        in_shardings=(state_sharding, batch_sharding(mesh, layout)),
        out_shardings=(state_sharding, NamedSharding(mesh, P())),
    )
