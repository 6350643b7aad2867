"""Replicas and data over devices and hosts, with JAX's own machinery.

A run is laid out on a two-axis device mesh (``jax.sharding.Mesh``):

* ``"replica"`` — Replicated-SGD's y replicas are spread over it: every
  leaf with a leading replica axis (params, BatchNorm statistics, each
  replica's optimizer state) is sharded along it, and the centre
  c = (1/y) Σ_a wᵃ is a mean over it (an all-reduce).
* ``"data"`` — each minibatch is split over it (data parallelism): the
  gradient of the mean loss, and BatchNorm's batch statistics, are means
  over the whole minibatch of one replica, i.e. over ``"data"`` only.

The preferred path is a sharded ``jit``: the unchanged training step of
:func:`flatjax.training.make_train_step` is compiled with input and output
shardings (:func:`flatjax.training.shard_train_step`) and XLA inserts the collectives, so a
loss that is a mean over the global minibatch gives the gradient averaged
over ``"data"``, and a BatchNorm's batch mean is global per replica. The
plain code gives the same numbers on one device, on N devices and on a pod.
:func:`rsgd_shard_map_step` is the explicit variant: ``jax.shard_map`` with
``flatjax.replicate(..., axis_name="replica")`` and a ``pmean`` over
``"data"``.

Multi-host: :func:`initialize_distributed` starts ``jax.distributed``; every
process then runs the same program on the global mesh, and each host loads
only the slice of the batch its devices hold (:func:`process_batch_slice`,
:func:`host_batch_to_global`).

References:
  Pittorino et al., Entropic gradient descent algorithms and wide flat minima,
  ICLR 2021, arXiv:2006.07897.
  Xu et al., GSPMD: General and Scalable Parallelization for ML Computation
  Graphs, 2021, arXiv:2105.04663.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flatjax._rsgd import ReplicateState, replica_map, replicate

__all__ = [
    "REPLICA_AXIS",
    "DATA_AXIS",
    "LAYOUTS",
    "make_mesh",
    "batch_sharding",
    "shard_batch",
    "process_batch_slice",
    "host_batch_to_global",
    "rsgd_shard_map_step",
    "initialize_distributed",
    "put_on_mesh",
]

REPLICA_AXIS = "replica"
DATA_AXIS = "data"
LAYOUTS = ("replicas", "batch", "stacked")
# Which leading axes of a batch leaf are sharded, per layout.
_BATCH_SPECS = {
    "replicas": P(REPLICA_AXIS, DATA_AXIS),  # [y, B, ...]: Replicated-SGD
    "batch": P(DATA_AXIS),  # [B, ...]: SGD, Entropy-SGD stepwise
    "stacked": P(None, DATA_AXIS),  # [L, B, ...]: Entropy-SGD scan mode
}


# --------------------------------------------------------------------------- mesh


def _check_size(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int or None, got {value!r}.")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}.")
    return int(value)


def make_mesh(
    *, replica: int | None = None, data: int | None = None, devices: Sequence | None = None
) -> Mesh:
    """A device mesh with axes ``("replica", "data")`` of sizes (r, d), r·d = #devices.

    The replicas of Replicated-SGD are spread over ``"replica"`` (r devices
    hold y/r replicas each) and every minibatch over ``"data"``. Given one
    size, the other is #devices / size; given none, all devices go to
    ``"data"`` (r = 1: data parallelism for SGD and Entropy-SGD). Both axes
    have ``AxisType.Auto``, so the mesh serves sharded ``jit`` (XLA places
    the collectives) and ``jax.shard_map`` alike.

    Args:
      replica: r, the number of devices the replicas are spread over, or None.
      data: d, the number of devices each minibatch is split over, or None.
      devices: the devices to use (default ``jax.devices()``: all devices of
        all processes).

    Returns:
      A ``jax.sharding.Mesh`` of shape {"replica": r, "data": d}.

    Raises:
      ValueError: a size that does not divide the device count, or r·d
        different from it (e.g. 3 replica devices on 4 devices).

    Example:
      >>> import jax, flatjax
      >>> mesh = flatjax.make_mesh(replica=2, data=2, devices=jax.devices()[:4])
      >>> dict(mesh.shape)
      {'replica': 2, 'data': 2}
    """
    replica = _check_size("replica", replica)
    data = _check_size("data", data)
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if n == 0:
        raise ValueError("devices is empty; make_mesh needs at least one device.")
    for name, size in (("replica", replica), ("data", data)):
        if size is not None and n % size:
            raise ValueError(
                f"{name}={size} does not divide the {n} devices; choose a divisor of {n} "
                f"(or pass devices=jax.devices()[:k] with k a multiple of {size})."
            )
    if replica is None and data is None:
        replica, data = 1, n
    elif replica is None:
        replica = n // data
    elif data is None:
        data = n // replica
    if replica * data != n:
        raise ValueError(
            f"replica * data = {replica} * {data} = {replica * data} must equal the number of "
            f"devices, {n}; pass devices=jax.devices()[:{replica * data}] to use fewer."
        )
    return jax.make_mesh(
        (replica, data),
        (REPLICA_AXIS, DATA_AXIS),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices,
    )


def _check_mesh(mesh) -> None:
    if not isinstance(mesh, Mesh) or tuple(mesh.axis_names) != (REPLICA_AXIS, DATA_AXIS):
        raise TypeError(
            "mesh must be a jax.sharding.Mesh with axes ('replica', 'data') "
            f"(see flatjax.make_mesh), got {mesh!r}."
        )


def _check_layout(layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(
            f"layout must be one of {LAYOUTS} ([y, B, ...], [B, ...], [L, B, ...]), "
            f"got {layout!r}."
        )


def batch_sharding(mesh: Mesh, layout: str) -> NamedSharding:
    """How a batch of ``layout`` is laid out on ``mesh``.

    ``'replicas'``: [y, B, ...] sharded ("replica", "data"); ``'batch'``:
    [B, ...] sharded over "data"; ``'stacked'``: [L, B, ...] with B sharded
    over "data". Trailing axes are not sharded.

    Args:
      mesh: a mesh from :func:`make_mesh`.
      layout: ``'replicas'``, ``'batch'`` or ``'stacked'``.

    Returns:
      A ``NamedSharding``.

    Example:
      >>> import jax, flatjax
      >>> mesh = flatjax.make_mesh(data=2, devices=jax.devices()[:2])
      >>> flatjax.batch_sharding(mesh, "stacked").spec
      P(None, 'data')
    """
    _check_mesh(mesh)
    _check_layout(layout)
    return NamedSharding(mesh, _BATCH_SPECS[layout])


def put_on_mesh(tree, shardings):
    """device_put on one process; make_array_from_callback across processes.

    With several processes each one holds the whole (identical) value and
    copies into its addressable shards only.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(x, sharding):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(put, tree, shardings)


def _check_batch(batch, mesh, layout) -> None:
    if not isinstance(batch, Mapping) or not batch:
        raise TypeError(f"batch must be a non-empty dict of arrays, got {type(batch).__name__}.")
    r, d = mesh.shape[REPLICA_AXIS], mesh.shape[DATA_AXIS]
    need = {"replicas": ((0, r, "y (replicas)"), (1, d, "B")), "batch": ((0, d, "B"),),
            "stacked": ((1, d, "B"),)}[layout]
    for key, value in batch.items():
        shape = np.shape(value)
        for axis, size, what in need:
            if len(shape) <= axis:
                raise ValueError(
                    f"batch[{key!r}] has shape {shape}; layout {layout!r} needs at least "
                    f"{axis + 1} axes."
                )
            if shape[axis] % size:
                axis_name = REPLICA_AXIS if what.startswith("y") else DATA_AXIS
                raise ValueError(
                    f"batch[{key!r}] has {what} = {shape[axis]} on axis {axis}, not divisible "
                    f"by the mesh's {axis_name!r} size {size}."
                )


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, layout: str) -> dict:
    """Places a whole (global) batch on ``mesh`` per :func:`batch_sharding`.

    On several processes every process must pass the same global batch;
    use :func:`host_batch_to_global` to load only each host's slice.

    Args:
      batch: dict of arrays ``{'image', 'label'}`` with the layout's leading axes.
      mesh: a mesh from :func:`make_mesh`.
      layout: ``'replicas'`` ([y, B, ...]), ``'batch'`` ([B, ...]) or
        ``'stacked'`` ([L, B, ...]); see :func:`flatjax.training.batch_layout`.

    Returns:
      The batch as sharded ``jax.Array`` s.

    Raises:
      ValueError: y or B not divisible by the mesh axis they are split over.

    Example:
      >>> import jax, numpy as np, flatjax
      >>> mesh = flatjax.make_mesh(replica=2, data=2, devices=jax.devices()[:4])
      >>> b = flatjax.shard_batch({"image": np.zeros((2, 8, 3))}, mesh, "replicas")
      >>> b["image"].sharding.shard_shape(b["image"].shape)
      (1, 4, 3)
    """
    _check_mesh(mesh)
    _check_layout(layout)
    _check_batch(batch, mesh, layout)
    sharding = batch_sharding(mesh, layout)
    return put_on_mesh(dict(batch), {k: sharding for k in batch})


def process_batch_slice(mesh: Mesh, layout: str, global_shape: Sequence[int]) -> tuple:
    """The slice of a global batch that this process's devices hold.

    A host loads ``global_batch[process_batch_slice(...)]`` (e.g. only its
    replicas' minibatches, or only its rows of each minibatch) and passes it
    to :func:`host_batch_to_global`. On one process this is the whole batch.

    Args:
      mesh: a mesh from :func:`make_mesh`.
      layout: the batch layout (see :func:`batch_sharding`).
      global_shape: shape of one global batch leaf, e.g. (y, B, 28, 28, 1).

    Returns:
      A tuple of ``slice`` objects, one per axis of ``global_shape``.

    Example:
      >>> import jax, flatjax
      >>> mesh = flatjax.make_mesh(data=2, devices=jax.devices()[:2])
      >>> flatjax.process_batch_slice(mesh, "batch", (8, 3))
      (slice(0, 8, None), slice(0, 3, None))
    """
    sharding = batch_sharding(mesh, layout)
    global_shape = tuple(int(s) for s in global_shape)
    indices = list(sharding.addressable_devices_indices_map(global_shape).values())
    bounds = [[idx[axis].indices(size)[:2] for idx in indices]
              for axis, size in enumerate(global_shape)]
    out = tuple(slice(min(b[0] for b in axis), max(b[1] for b in axis)) for axis in bounds)
    # The union of this process's shards must be the box ``out`` (a contiguous slice).
    shards = {tuple(b[i] for b in bounds) for i in range(len(indices))}
    shard_size = int(np.prod([stop - start for start, stop in next(iter(shards))]))
    if len(shards) * shard_size != int(np.prod([s.stop - s.start for s in out])):
        raise ValueError(
            f"process {jax.process_index()}'s devices hold non-contiguous parts of the batch "
            f"{global_shape}; build the mesh with flatjax.make_mesh over jax.devices() "
            "(ordered by process)."
        )
    return out


def host_batch_to_global(
    local_batch: Mapping[str, Any], mesh: Mesh, layout: str, global_shapes: Mapping | None = None
) -> dict:
    """Assembles a global sharded batch from each process's local slice.

    Every process passes the slice :func:`process_batch_slice` names for it;
    ``jax.make_array_from_process_local_data`` builds the global arrays
    without any host ever holding the whole batch. On one process this is
    :func:`shard_batch`.

    Args:
      local_batch: dict of this process's arrays.
      mesh: a mesh from :func:`make_mesh` (over all processes' devices).
      layout: the batch layout (see :func:`batch_sharding`).
      global_shapes: optional dict of global shapes per key (default: inferred
        by JAX from the local shapes and the sharding).

    Returns:
      Dict of global ``jax.Array`` s sharded per ``batch_sharding(mesh, layout)``.

    Example:
      >>> import jax, numpy as np, flatjax
      >>> mesh = flatjax.make_mesh(data=2, devices=jax.devices()[:2])
      >>> b = flatjax.host_batch_to_global({"label": np.arange(4)}, mesh, "batch")
      >>> b["label"].shape, b["label"].sharding.spec
      ((4,), P('data',))
    """
    sharding = batch_sharding(mesh, layout)
    if not isinstance(local_batch, Mapping) or not local_batch:
        raise TypeError(
            f"local_batch must be a non-empty dict of arrays, got {type(local_batch).__name__}."
        )
    shapes = dict(global_shapes or {})
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v), shapes.get(k))
        for k, v in local_batch.items()
    }


# --------------------------------------------------------------------------- shard_map


def rsgd_shard_map_step(
    loss_fn: Callable,
    mesh: Mesh,
    base_optimizer: optax.GradientTransformation,
    num_replicas: int,
    coupling,
    *,
    strategy: str = "auto",
    **replicate_kwargs,
):
    """Replicated-SGD written per device with ``jax.shard_map`` (explicit collectives).

    Each device holds y/r replicas (r = mesh's replica size) and, of each
    replica's minibatch, B/d examples (d = data size). Per device:

        gᵃ = ∇ pmean_data loss_fn(wᵃ, local batch a)      (mean over the minibatch)
        w ← replicate(..., axis_name="replica").update(g, state, w)

    so the centre is a ``pmean`` over ``"replica"`` and each replica's
    gradient a mean over ``"data"``. A model with BatchNorm must be built
    with ``axis_name="data"`` for its statistics to be synchronised over the
    replica's whole minibatch. Same numbers as the single-device
    ``replicate(base_optimizer, ...)`` step with an equal-size split.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the MEAN loss of one
        replica on a minibatch (dict of arrays, leading axis B).
      mesh: a mesh from :func:`make_mesh`.
      base_optimizer: Optax transform of each replica.
      num_replicas: y, divisible by the mesh's replica size.
      coupling: γ, float or schedule (see :func:`flatjax.replicate`).
      strategy: how local replicas are mapped (:func:`flatjax.replica_map`).
      **replicate_kwargs: further keyword arguments of :func:`flatjax.replicate`
        (``learning_rate``, ``coupling_step``, ...); not ``axis_name``.

    Returns:
      ``(init, step)``: ``init(params) -> opt_state`` and
      ``step(params, opt_state, batch) -> (params, opt_state, loss)``, both
      jitted; ``params`` carry the leading replica axis y and ``batch`` is
      ``[y, B, ...]``; ``loss`` is the mean over replicas and data.

    Example:
      >>> import jax, jax.numpy as jnp, optax, flatjax
      >>> mesh = flatjax.make_mesh(replica=2, data=2, devices=jax.devices()[:4])
      >>> loss = lambda w, b: jnp.mean((b["x"] @ w) ** 2)
      >>> init, step = flatjax.rsgd_shard_map_step(loss, mesh, optax.sgd(0.1), 2, 1.0,
      ...                                          learning_rate=0.1)
      >>> w = jnp.ones((2, 3))
      >>> w, state, value = step(w, init(w), {"x": jnp.ones((2, 4, 3))})
      >>> float(value)
      9.0
    """
    _check_mesh(mesh)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {loss_fn!r}.")
    if "axis_name" in replicate_kwargs:
        raise TypeError("rsgd_shard_map_step sets axis_name='replica' itself; do not pass it.")
    optimizer = replicate(
        base_optimizer, num_replicas, coupling, axis_name=REPLICA_AXIS, **replicate_kwargs
    )
    r = mesh.shape[REPLICA_AXIS]
    if num_replicas % r:
        raise ValueError(
            f"num_replicas={num_replicas} is not divisible by the mesh's replica axis of "
            f"size {r}."
        )
    state_spec = ReplicateState(P(), P(), P(), P(), P(REPLICA_AXIS), P(), P())
    def replica_loss(params, batch):
        # The mean over the replica's whole minibatch. Its gradient with respect
        # to params that are the same on every "data" device is the gradient
        # averaged over "data" (shard_map's varying-axes typing inserts the psum
        # in the backward pass; a second pmean of the gradients would be wrong).
        return jax.lax.pmean(loss_fn(params, batch), DATA_AXIS)

    value_and_grad = replica_map(jax.value_and_grad(replica_loss), strategy=strategy)

    def local_init(params):
        return optimizer.init(params)

    def local_step(params, opt_state, batch):
        loss, grads = value_and_grad(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        mean_loss = jax.lax.pmean(jnp.mean(loss), REPLICA_AXIS)
        return optax.apply_updates(params, updates), opt_state, mean_loss

    init = jax.jit(
        jax.shard_map(local_init, mesh=mesh, in_specs=P(REPLICA_AXIS), out_specs=state_spec)
    )
    step = jax.jit(
        jax.shard_map(
            local_step,
            mesh=mesh,
            in_specs=(P(REPLICA_AXIS), state_spec, P(REPLICA_AXIS, DATA_AXIS)),
            out_specs=(P(REPLICA_AXIS), state_spec, P()),
        )
    )
    return init, step


# --------------------------------------------------------------------------- multi-host


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer.") from None


def initialize_distributed(**kwargs) -> bool:
    """``jax.distributed.initialize(**kwargs)`` when the run has several processes.

    A no-op (returns False) when nothing says the run is multi-process: no
    arguments, no ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID``, and ``FLATJAX_DISTRIBUTED`` unset; also with one
    process, or when ``jax.distributed`` is already running. Otherwise it
    calls ``jax.distributed.initialize`` with the arguments and the two
    process counts from the environment (JAX reads the coordinator address
    itself), and JAX checks the setting. ``FLATJAX_DISTRIBUTED=auto`` calls
    it without arguments so that JAX detects the cluster (Cloud TPU pod
    slices, SLURM, Open MPI, Kubernetes). Call it before any other JAX call.

    Args:
      **kwargs: arguments of ``jax.distributed.initialize``
        (``coordinator_address``, ``num_processes``, ``process_id``,
        ``local_device_ids``, ``initialization_timeout``, ...).

    Returns:
      True if this call started ``jax.distributed``.

    Raises:
      ValueError: a process count in the environment that is not an integer,
        ``FLATJAX_DISTRIBUTED`` other than 'auto', or what JAX raises for an
        incomplete setting.

    Example:
      >>> import flatjax
      >>> flatjax.initialize_distributed()  # no environment: one process
      False
    """
    if jax.distributed.is_initialized():
        return False
    auto = os.environ.get("FLATJAX_DISTRIBUTED", "")
    if auto not in ("", "auto"):
        raise ValueError(f"FLATJAX_DISTRIBUTED must be 'auto' or unset, got {auto!r}.")
    for key, name in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
        if kwargs.get(key) is None and _env_int(name) is not None:
            kwargs[key] = _env_int(name)
    given = {k: v for k, v in kwargs.items() if v is not None}
    address = given.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not given and not address and auto != "auto":
        return False
    if given.get("num_processes") == 1:
        return False
    jax.distributed.initialize(**given)
    return True
