"""One jitted training step for SGD, Entropy-SGD and Replicated-SGD.

:func:`make_train_step` returns ``step(state, batch) -> (state, metrics)``.
What ``batch`` holds and what one step costs:

* SGD: one minibatch ``[B, ...]``; 1 gradient evaluation.
* Entropy-SGD, ``esgd.mode='scan'``: L stacked minibatches ``[L, B, ...]``;
  one outer step, L gradient evaluations, run as ONE ``update`` call of
  :func:`flatjax.entropy_sgd` (``has_aux=True``) with ``grad_fn(walker, i,
  aux)`` picking minibatch i. The aux carries the training metrics of the L
  minibatches and, for BatchNorm models with ``esgd.batch_norm='walker'``
  (the authors' code: running statistics keep updating at the walker during
  the inner steps), the statistics. ``esgd.batch_norm='anchor'`` updates the
  statistics only by a forward pass at the new anchor x (on minibatch L−1).
  Metrics: the mean loss and error of the L minibatches, the largest
  gradient norm.
* Entropy-SGD, ``esgd.mode='stepwise'``: one minibatch ``[B, ...]``; one
  Langevin step through an unmodified ``state.apply_gradients``.
* Replicated-SGD: one minibatch per replica ``[y, B, ...]``; y gradient
  evaluations, per-replica loss and gradient mapped with
  :func:`flatjax.replica_map` (``rsgd.strategy``).

Each algorithm's step lives in its module of :mod:`flatjax.training.algorithms`.

NaN/inf policy (``config.nan_policy``): the step computes a ``finite`` flag
(loss, gradient norm, new params' norm and, for Replicated-SGD, the replicas'
distance to the centre). 'skip' keeps the old params, statistics and
optimizer state where it is False (a ``jnp.where`` inside the jitted step; the
step counter and key still advance so the data stream stays aligned); 'stop'
lets the training loop raise at its next metrics fetch, naming the step and
the metric (:func:`check_finite`).
"""

from __future__ import annotations

import math

import jax
import ml_collections

from flatjax._losses import cross_entropy, error_percent
from flatjax.training import algorithms

__all__ = ["make_train_step", "cross_entropy", "error_percent", "check_finite", "NonFiniteError"]


class NonFiniteError(FloatingPointError):
    """Raised by the 'stop' NaN policy; names the step and the offending metric."""


_GUARDED = ("loss", "grad_norm", "param_norm", "replica_distance")


def check_finite(metrics: dict, step: int) -> None:
    """Raises :class:`NonFiniteError` if a guarded metric is NaN or inf.

    Args:
      metrics: host-side metrics of one step (floats).
      step: the training step they belong to (1-based: after that step).

    Example:
      >>> from flatjax.training import check_finite
      >>> check_finite({"loss": float("nan"), "grad_norm": 1.0}, step=7)
      Traceback (most recent call last):
      ...
      flatjax.training.steps.NonFiniteError: Training diverged at step 7: loss = nan ...
    """
    for name in _GUARDED:
        if name in metrics and not math.isfinite(float(metrics[name])):
            shown = ", ".join(f"{k} = {float(metrics[k]):.4g}" for k in _GUARDED if k in metrics)
            raise NonFiniteError(
                f"Training diverged at step {step}: {name} = {float(metrics[name])} ({shown}). "
                "Lower the learning rate or bound the coupling (esgd.coupling_max; "
                "rsgd.coupling), or set config.nan_policy='skip' to skip such updates."
            )


def make_train_step(config: ml_collections.ConfigDict):
    """The jitted training step ``step(state, batch) -> (state, metrics)`` for ``config``.

    ``batch`` is a dict of arrays ``{'image', 'label'}`` shaped as in the
    module docstring (``[B, ...]``; ``[L, B, ...]`` for Entropy-SGD's scan
    mode; ``[y, B, ...]`` for Replicated-SGD). The loss is the mean softmax
    cross-entropy in training mode (BatchNorm batch statistics, dropout with
    a key split from ``state.rng``).

    Args:
      config: a validated config (``algorithm``, ``esgd``, ``rsgd``, ``nan_policy``).

    Returns:
      A jitted function returning the new :class:`TrainState` and a dict of
      scalar metrics: ``loss``, ``error`` (%, on the training minibatch;
      Entropy-SGD scan mode: mean over the inner steps, or at the new anchor
      on minibatch L−1 when run through ``grad_fn``), ``grad_norm`` (largest
      over the inner steps; the norm of the outer update through
      ``grad_fn``), ``param_norm``, ``coupling`` (the applied γ; 0 for SGD),
      ``requested_coupling`` (the schedule's γ: larger than ``coupling`` when
      the stability clamp engaged), ``finite``, and ``replica_distance``
      (mean_a ‖wᵃ − c‖²) for Replicated-SGD.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flatjax.models.mlp import MLPTiny
      >>> from flatjax.training import base_config, create_train_state, make_train_step
      >>> config = base_config()
      >>> state = create_train_state(config, MLPTiny(num_classes=2),
      ...                            {"input_shape": (3,), "num_train": 512},
      ...                            jax.random.PRNGKey(0))
      >>> batch = {"image": jnp.ones((8, 3)), "label": jnp.zeros(8, jnp.int32)}
      >>> state, metrics = make_train_step(config)(state, batch)
      >>> int(state.step), sorted(metrics)  # doctest: +NORMALIZE_WHITESPACE
      (1, ['coupling', 'error', 'finite', 'grad_norm', 'loss', 'param_norm',
           'requested_coupling'])
    """
    return jax.jit(algorithms.get(config.algorithm).make_step(config))
