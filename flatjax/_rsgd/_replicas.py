"""Replicas on a leading axis: create them, map a per-replica function, take their mean.

Replicated-SGD keeps y replicas w¹..wʸ of a network stacked on a leading axis
of size y of every parameter leaf. :func:`init_replicas` draws them,
:func:`replica_map` runs a per-replica function (a loss and its gradient)
over that axis, and :func:`replica_center` returns their mean, the centre c.

References:
  Pittorino et al., Entropic gradient descent algorithms and wide flat minima,
  ICLR 2021, arXiv:2006.07897.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp

from flatjax._rsgd import _axis
from flatjax._validation import check_choice, check_int, check_replica_axis, leading_size

__all__ = ["init_replicas", "replica_center", "replica_map"]

_STRATEGIES = ("auto", "vmap", "unroll")


def init_replicas(init_fn: Callable, key: jax.Array, num_replicas: int, *args, **kwargs):
    """y independently initialised replicas stacked on a leading axis.

    Replica a is ``init_fn(key_a, *args, **kwargs)`` with key_a the a-th of
    ``jax.random.split(key, num_replicas)``; the results are stacked on axis
    0 of every leaf (for a Flax model this stacks params and batch_stats).

    Args:
      init_fn: ``init_fn(key, *args, **kwargs) -> pytree``, e.g. ``model.init``.
      key: PRNG key.
      num_replicas: y >= 1.
      *args: passed to ``init_fn`` unchanged (e.g. a dummy input).
      **kwargs: passed to ``init_fn`` unchanged.

    Returns:
      The pytree of ``init_fn`` with a leading replica axis of size y.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, flatjax
      >>> v = flatjax.init_replicas(nn.Dense(4).init, jax.random.key(0), 3, jnp.ones((1, 2)))
      >>> v["params"]["kernel"].shape
      (3, 2, 4)
    """
    if not callable(init_fn):
        raise TypeError(f"init_fn must be callable, got {init_fn!r}.")
    check_int("num_replicas", num_replicas, minimum=1)
    keys = jax.random.split(key, int(num_replicas))
    return jax.vmap(lambda k: init_fn(k, *args, **kwargs))(keys)


def replica_center(params, *, axis_name=None):
    """The mean of the replicas, c = (1/y) Σ_a wᵃ.

    Args:
      params: replicated params (leading replica axis on every leaf).
      axis_name: named axis the replicas are spread over (inside
        ``shard_map``/``pmap``), or None.

    Returns:
      The mean's params, without replica axis.

    Example:
      >>> import jax.numpy as jnp, flatjax
      >>> flatjax.replica_center({"w": jnp.array([[1.0, 2.0], [3.0, 6.0]])})
      {'w': Array([2., 4.], dtype=float32)}
    """
    check_replica_axis(params, leading_size(params), "params")
    return _axis._tree_mean(params, axis_name)


def replica_map(
    fn: Callable,
    *,
    strategy: str = "auto",
    in_axes: int | None | Sequence = 0,
    spmd_axis_name: Hashable | None = None,
):
    """Map a per-replica function over the leading replica axis of its arguments.

    ``replica_map(fn)(*args)[a] = fn(*args_a)`` where ``args_a`` takes index a
    of the leading axis of every mapped argument (``in_axes`` 0) and passes
    unmapped ones (``in_axes`` None) whole; outputs are stacked on axis 0.
    Typical use: ``replica_map(jax.value_and_grad(loss))(params, batches)``.

    Strategies (the forward/backward pass is the expensive part of a step):

    - ``"vmap"``: ``jax.vmap``; one batched program, the fast choice on
      GPU/TPU where batched matmuls and convolutions fill the device.
    - ``"unroll"``: a Python loop over the y replicas traced into the
      caller's ``jit`` and stacked. XLA:CPU batches convolutions poorly: on
      this project's 2-core CPU a vmapped LeNet-5 step took 2.0x the time of
      y sequential steps, the unrolled one 0.67x. Compile time grows with y.
    - ``"auto"``: ``"unroll"`` when JAX's default backend is CPU and y <= 8,
      ``"vmap"`` otherwise (decided when the mapped function is called; the
      unrolled program's compile time grows by about 7 s per LeNet-5 replica
      here, so large ensembles are vmapped).

    Args:
      fn: function of one replica.
      strategy: ``"auto"``, ``"vmap"`` or ``"unroll"``.
      in_axes: 0 (map every argument), None, or a sequence with one entry
        (0 or None) per positional argument.
      spmd_axis_name: with ``"vmap"`` under a sharded ``jit`` whose replica
        axis is sharded over this mesh axis (e.g. ``"replica"``), tells XLA
        that the mapped axis is that mesh axis, so each device computes its
        own replicas instead of gathering them (measured here on LeNet-5, 4
        emulated devices: 24 all-gathers and 60 all-reduces per step without
        it, 8 and 3 with it). Ignored by ``"unroll"``.

    Returns:
      The mapped function.

    Example:
      >>> import jax.numpy as jnp, flatjax
      >>> f = flatjax.replica_map(lambda w, x: w * x, strategy="unroll", in_axes=(0, None))
      >>> f(jnp.array([1.0, 2.0]), 3.0)
      Array([3., 6.], dtype=float32)
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}.")
    check_choice("strategy", strategy, _STRATEGIES)
    if isinstance(in_axes, (list, tuple)):
        if any(a not in (0, None) or isinstance(a, bool) for a in in_axes):
            raise ValueError(f"in_axes entries must be 0 or None, got {in_axes!r}.")
        in_axes = tuple(in_axes)
    elif in_axes not in (0, None) or isinstance(in_axes, bool):
        raise ValueError(
            f"in_axes must be 0, None or a sequence of 0/None per argument, got {in_axes!r}."
        )

    def mapped(*args):
        axes = in_axes if isinstance(in_axes, tuple) else (in_axes,) * len(args)
        if len(axes) != len(args):
            raise ValueError(
                f"in_axes has {len(axes)} entries but the function got {len(args)} arguments."
            )
        sizes = {
            jnp.shape(leaf)[0] if jnp.ndim(leaf) else None
            for arg, ax in zip(args, axes, strict=True)
            if ax == 0
            for leaf in jax.tree.leaves(arg)
        }
        if not sizes:
            raise ValueError("replica_map needs at least one mapped (in_axes 0) array argument.")
        if None in sizes or len(sizes) != 1:
            raise ValueError(
                "every mapped argument needs the same leading replica axis; found leading "
                f"sizes {sorted(s for s in sizes if s is not None)}"
                f"{' and scalars' if None in sizes else ''}."
            )
        (y,) = sizes
        chosen = strategy
        if chosen == "auto":
            chosen = "unroll" if jax.default_backend() == "cpu" and y <= 8 else "vmap"
        if chosen == "vmap":
            return jax.vmap(fn, in_axes=axes, spmd_axis_name=spmd_axis_name)(*args)
        outs = [
            fn(
                *(
                    jax.tree.map(lambda x, a=a: x[a], arg) if ax == 0 else arg
                    for arg, ax in zip(args, axes, strict=True)
                )
            )
            for a in range(y)
        ]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    return mapped
