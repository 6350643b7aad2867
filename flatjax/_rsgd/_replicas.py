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
_CONVOLUTION = "conv_general_dilated"


def _sub_jaxprs(value):
    """The jaxprs inside an equation's parameter (a jaxpr, a closed one, or a sequence of them)."""
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def _has_convolution(jaxpr) -> bool:
    """Whether ``jaxpr`` (or any jaxpr nested in it: jit, scan, cond, custom rules) convolves."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == _CONVOLUTION:
            return True
        for value in eqn.params.values():
            if any(_has_convolution(sub) for sub in _sub_jaxprs(value)):
                return True
    return False


def _convolves(fn, replica_args) -> bool:
    """Whether one replica's ``fn(*replica_args)`` contains a convolution (traced, not run)."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype) if hasattr(x, "dtype") else x,
        replica_args,
    )
    try:
        return _has_convolution(jax.make_jaxpr(fn)(*abstract).jaxpr)
    except Exception:  # noqa: BLE001 - a function that cannot be traced apart: assume it does
        return True


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
    - ``"auto"``: on CPU, ``"unroll"`` when ``fn`` convolves and y <= 8,
      else ``"vmap"``; on other backends ``"vmap"``. Decided when the mapped
      function is traced (one extra abstract trace of ``fn``, nothing run).
      Measured on a 2-core CPU, y = 3, batch 128, the replicated step ÷ 3
      SGD steps: LeNet-5 unrolled 0.92–1.05, vmapped 1.56–1.72; MLP
      784-300-100 unrolled 1.07–1.24, vmapped 0.97–1.11 (batched matmuls
      are what XLA:CPU does well). The unrolled program's compile time grows
      with y, so large ensembles are vmapped.

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
        def replica(a):
            return tuple(
                jax.tree.map(lambda x: x[a], arg) if ax == 0 else arg
                for arg, ax in zip(args, axes, strict=True)
            )

        chosen = strategy
        if chosen == "auto":
            cpu = jax.default_backend() == "cpu"
            chosen = "unroll" if cpu and y <= 8 and _convolves(fn, replica(0)) else "vmap"
        if chosen == "vmap":
            return jax.vmap(fn, in_axes=axes, spmd_axis_name=spmd_axis_name)(*args)
        outs = [fn(*replica(a)) for a in range(y)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    return mapped
