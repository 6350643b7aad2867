"""The centre's BatchNorm statistics: the replicas' average, or recomputed at c.

The centre c = mean_a wᵃ is a network no replica ran forward passes with, so
its BatchNorm running statistics are not any replica's. The authors average
the replicas' statistics (:func:`average_batch_stats`); SWA, Parle and PAPA
recompute them from forward passes of the averaged network
(:func:`recompute_batch_stats`).

References:
  Pittorino et al., Entropic gradient descent algorithms and wide flat minima,
  ICLR 2021, arXiv:2006.07897.
  Izmailov et al., Averaging weights leads to wider optima and better
  generalization, UAI 2018, arXiv:1803.05407.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp

from flatjax._rsgd import _axis
from flatjax._validation import check_replica_axis, leading_size

__all__ = ["average_batch_stats", "recompute_batch_stats"]


def average_batch_stats(batch_stats, *, axis_name=None):
    """The centre's BatchNorm statistics as the mean of the replicas' (authors' choice).

    Running means and variances are averaged over the replica axis. This is
    cheap but not the statistics of the centre network's activations; see
    `recompute_batch_stats` for those.

    Args:
      batch_stats: replicated ``batch_stats`` collection (leading replica axis).
      axis_name: named axis the replicas are spread over, or None.

    Returns:
      ``batch_stats`` without replica axis.

    Example:
      >>> import jax.numpy as jnp, flatjax
      >>> flatjax.average_batch_stats({"bn": {"mean": jnp.array([[0.0], [2.0]])}})
      {'bn': {'mean': Array([1.], dtype=float32)}}
    """
    check_replica_axis(batch_stats, leading_size(batch_stats), "batch_stats")
    return _axis._tree_mean(batch_stats, axis_name)


def recompute_batch_stats(apply_fn: Callable, variables, batches: Iterable):
    """Recompute the centre's BatchNorm statistics from forward passes.

    As SWA, Parle and PAPA do for averaged weights: the running statistics
    are reset and re-estimated from training batches with the network in
    training mode. The result is the cumulative average, the exact mean over
    the K batches of each per-batch statistic (what a BatchNorm with
    momentum (k − 1)/k at batch k would hold), independent of the momentum
    the model was built with and of the batches' order.

    How: a BatchNorm update is affine in the old statistic, S' = m S + (1 − m) B
    with B the batch statistic. One pass from S = 0 gives Z = (1 − m) B, one
    pass from S = s gives m s + Z; so the first batch costs two forward passes
    (they reveal m, one momentum per statistics leaf) and every later batch
    one, B = Z / (1 − m). Float32 keeps B to a relative ~1e-7 / (1 − m).

    Args:
      apply_fn: ``apply_fn(variables, batch) -> (output, mutated)`` running
        the model in training mode and returning the updated collections,
        e.g. ``functools.partial(model.apply, train=True,
        mutable=["batch_stats"])``. It is jitted here.
      variables: the centre's variables, ``{"params": ..., "batch_stats": ...}``
        without replica axis (the incoming ``batch_stats`` only give the
        structure).
      batches: iterable of model inputs (at least one), each passed as
        ``batch`` to ``apply_fn``.

    Returns:
      ``variables`` with ``batch_stats`` replaced by the recomputed means.

    Example:
      >>> import functools, jax, jax.numpy as jnp, flax.linen as nn, flatjax
      >>> bn = nn.BatchNorm(use_running_average=False)
      >>> v = bn.init(jax.random.key(0), jnp.zeros((4, 1)))
      >>> apply = functools.partial(bn.apply, mutable=["batch_stats"])
      >>> xs = [jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [4.0]])]
      >>> out = flatjax.recompute_batch_stats(apply, v, xs)
      >>> out["batch_stats"]["mean"], out["batch_stats"]["var"]  # means of (1, 4), (1, 0)
      (Array([2.5], dtype=float32), Array([0.5], dtype=float32))
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable, got {apply_fn!r}.")
    if not isinstance(variables, dict) or "batch_stats" not in variables:
        raise ValueError(
            "variables must be a dict with a 'batch_stats' collection, got "
            f"{type(variables).__name__} with keys "
            f"{list(variables) if isinstance(variables, dict) else '-'}."
        )

    @jax.jit
    def stats_from(stats, batch):
        _, mutated = apply_fn({**variables, "batch_stats": stats}, batch)
        return mutated["batch_stats"]

    template = variables["batch_stats"]
    zeros = jax.tree.map(jnp.zeros_like, template)
    total, decay, k = None, None, 0
    for batch in batches:
        scaled = stats_from(zeros, batch)  # (1 − m) B
        if decay is None:
            # A probe S = s with s ≥ |Z| keeps m's rounding error at a few ulps.
            probe = jax.tree.map(lambda z: 1.0 + jnp.abs(z), scaled)
            decay = jax.tree.map(
                lambda o, z, s: jnp.mean((o - z) / s), stats_from(probe, batch), scaled, probe
            )
            if any(not bool(m < 1.0 - 1e-6) for m in jax.tree.leaves(decay)):
                raise ValueError(
                    "apply_fn does not update batch_stats (momentum 1, or not in training "
                    "mode): pass a function that runs the model with train=True and "
                    'mutable=["batch_stats"].'
                )
            total = jax.tree.map(jnp.zeros_like, template)
        total = jax.tree.map(lambda t, s, m: t + s / (1.0 - m), total, scaled, decay)
        k += 1
    if k == 0:
        raise ValueError("batches is empty; recompute_batch_stats needs at least one batch.")
    return {**variables, "batch_stats": jax.tree.map(lambda t: t / k, total)}
