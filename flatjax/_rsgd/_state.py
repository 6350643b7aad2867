"""The Replicated-SGD state, and the accessors that read it from any Optax state.

The params a Replicated-SGD loop holds are the y replicas; the network to
evaluate and checkpoint is the centre c (:func:`replicate_eval_params`), as
``optax.contrib.schedule_free_eval_params`` returns the evaluation params of
schedule-free optimizers. The accessors take the `ReplicateState` or any
Optax state containing exactly one (``optax.chain``, ``inject_hyperparams``).

References:
  Pittorino et al., Entropic gradient descent algorithms and wide flat minima,
  ICLR 2021, arXiv:2006.07897.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from flatjax._rsgd._replicas import replica_center

__all__ = ["ReplicateState", "replicate_coupling", "replicate_eval_params"]


class ReplicateState(NamedTuple):
    """State of the `GradientTransformation` returned by `replicate`.

    Attributes:
      count: int32 scalar, number of updates applied so far (the step t at
        which the coupling and learning-rate schedules are evaluated).
      coupling: float32 scalar, the coupling γ applied by the latest update
        (before the first update: the γ the first update will apply), after
        the stability clamp and ``max_coupling``.
      requested_coupling: float32 scalar, the schedule's γ at the same step;
        larger than ``coupling`` exactly when the clamp engaged.
      center_distance: float32 scalar, mean_a ‖wᵃ − c‖² (summed over all
        leaves) at the parameters the latest update received: a diagnostic
        for logging; growth over steps signals a coupling that overshoots.
      base_state: the base optimizer's state, every leaf with a leading
        replica axis (local size under a named axis).
      center: the explicit centre c (parameters without replica axis) when
        ``center_optimizer`` is given; ``optax.EmptyState()`` when the centre
        is the mean of the replicas.
      center_state: the centre optimizer's state, or ``optax.EmptyState()``.
    """

    count: jax.Array
    coupling: jax.Array
    requested_coupling: jax.Array
    center_distance: jax.Array
    base_state: optax.OptState
    center: Any
    center_state: optax.OptState


def _find_state(state) -> ReplicateState:
    """The one `ReplicateState` inside ``state`` (``TypeError`` if not exactly one)."""
    is_rsgd = lambda s: isinstance(s, ReplicateState)  # noqa: E731
    found = [s for s in jax.tree.leaves(state, is_leaf=is_rsgd) if is_rsgd(s)]
    if len(found) != 1:
        raise TypeError(
            "expected an optimizer state containing exactly one ReplicateState (from "
            f"flatjax.replicate), found {len(found)} in a {type(state).__name__}."
        )
    return found[0]


def replicate_coupling(state: ReplicateState) -> jax.Array:
    """The coupling γ applied by the latest update, for logging.

    Args:
      state: a `ReplicateState`, or any Optax state containing exactly one
        (``optax.chain``, ``inject_hyperparams``).

    Returns:
      float32 scalar γ (after the explicit step's clamp, if any).

    Example:
      >>> import jax.numpy as jnp, optax, flatjax
      >>> opt = optax.chain(optax.clip(1.0), flatjax.replicate(optax.sgd(0.1), 2, coupling=0.3))
      >>> float(flatjax.replicate_coupling(opt.init(jnp.zeros((2, 3)))))
      0.3...
    """
    return _find_state(state).coupling


def replicate_eval_params(state, params, *, axis_name=None):
    """The centre c, the network to evaluate and checkpoint.

    The explicit centre when the optimizer has one (``center_optimizer``),
    else the mean of the replicas. ``state`` may be the `ReplicateState` or
    any Optax state containing exactly one (e.g. ``optax.chain``,
    ``inject_hyperparams``). The argument order is optax's
    (``optax.contrib.schedule_free_eval_params(state, params)``).

    Args:
      state: the optimizer state.
      params: replicated params (leading replica axis on every leaf).
      axis_name: named axis the replicas are spread over, or None.

    Returns:
      The centre's params, without replica axis.

    Example:
      >>> import jax.numpy as jnp, optax, flatjax
      >>> opt = flatjax.replicated_sgd(0.1, 2, coupling=1.0)
      >>> params = {"w": jnp.array([[1.0, 2.0], [3.0, 6.0]])}
      >>> flatjax.replicate_eval_params(opt.init(params), params)
      {'w': Array([2., 4.], dtype=float32)}
    """
    found = _find_state(state)
    if not isinstance(found.center, optax.EmptyState):
        return found.center
    return replica_center(params, axis_name=axis_name)
