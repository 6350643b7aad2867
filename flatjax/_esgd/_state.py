"""The Entropy-SGD state, and the accessors that read it from any Optax state.

In stepwise mode the params a loop holds are the walker x′, not the network
to evaluate: :func:`entropy_sgd_eval_params` returns the anchor x in both
modes, as ``optax.contrib.schedule_free_eval_params`` does for schedule-free
optimizers. The accessors take the Entropy-SGD state or any Optax state
containing exactly one (``optax.chain``, ``inject_hyperparams``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from flatjax._esgd._precision import cast_like

__all__ = ["EntropySGDState", "entropy_sgd_eval_params", "entropy_sgd_aux", "entropy_sgd_coupling"]


class EntropySGDState(NamedTuple):
    """State of the Entropy-SGD transforms.

    Attributes:
      count: int32, outer steps done (t); each costs L gradient evaluations.
      inner_count: int32, Langevin steps done in the current outer step
        (stepwise mode; always 0 in scan mode between calls).
      key: PRNG key of the Langevin noise.
      coupling: float32, γ_t applied by the inner steps of the current outer
        step, after ``max_coupling`` and the stability clamp (0 up to the
        calibration step when γ_0 is being calibrated).
      requested_coupling: float32, the schedule's γ_t before the clamp; larger
        than ``coupling`` exactly when the clamp engaged.
      coupling_scale: float32, c in γ_t = c · coupling(t): 1, or γ_0 / coupling(0)
        once γ_0 has been calibrated.
      loss: float32, the loss of the latest inner minibatch (what the
        calibration reads; 0 without calibration).
      anchor: the anchor x in float32 or wider (stepwise mode; ``None`` in scan
        mode, where x is the ``params`` the loop holds).
      average: the running average μ of the walker, float32 or wider
        (stepwise mode; ``None`` in scan mode).
      walker: the walker x′ in float32 when the params are in a lower
        precision (stepwise mode; else ``None`` and x′ is the params the loop
        holds).
      inner_state: state of the inner optimizer (stepwise mode; ``None`` in
        scan mode, where it is re-initialised at every outer step).
      outer_state: state of the outer optimizer.
      aux: scan mode with ``has_aux=True``: the auxiliary value the last inner
        step's ``grad_fn`` returned (e.g. the walker's BatchNorm statistics);
        ``None`` before the first update and without ``has_aux``.
    """

    count: jax.Array
    inner_count: jax.Array
    key: jax.Array
    coupling: jax.Array
    requested_coupling: jax.Array
    coupling_scale: jax.Array
    loss: jax.Array
    anchor: Any
    average: Any
    walker: Any
    inner_state: Any
    outer_state: Any
    aux: Any = None


def _find_state(state) -> EntropySGDState:
    """The one :class:`EntropySGDState` inside ``state`` (``ValueError`` if not exactly one)."""
    is_esgd = lambda s: isinstance(s, EntropySGDState)
    found = [s for s in jax.tree.leaves(state, is_leaf=is_esgd) if is_esgd(s)]
    if len(found) != 1:
        raise ValueError(
            f"Expected exactly one EntropySGDState inside the optimizer state, found {len(found)}."
        )
    return found[0]


def entropy_sgd_eval_params(state, params):
    """The anchor x, the network to evaluate and checkpoint, in either mode.

    In scan mode (:func:`entropy_sgd`, :func:`scale_by_entropy_sgd`) the
    params the loop holds are x; in stepwise mode they are the walker x′ and
    x lives in the state. ``state`` may be the Entropy-SGD state or any
    Optax state containing exactly one (e.g. from ``optax.chain``).

    The argument order is optax's (``optax.contrib.schedule_free_eval_params(state,
    params)``).

    Args:
      state: the optimizer state.
      params: the params the training loop holds.

    Returns:
      The anchor x, a pytree like ``params``.

    Example:
      >>> import jax.numpy as jnp, flatjax
      >>> opt = flatjax.entropy_sgd_stepwise(0.1, inner_steps=2, noise=0.0)
      >>> params = jnp.ones(3)
      >>> state = opt.init(params)
      >>> step, state = opt.update(jnp.ones(3), state, params)
      >>> flatjax.entropy_sgd_eval_params(state, params + step)   # x has not moved yet
      Array([1., 1., 1.], dtype=float32)
    """
    esgd = _find_state(state)
    return params if esgd.anchor is None else cast_like(esgd.anchor, params)


def entropy_sgd_aux(state):
    """The auxiliary value of the last inner step (scan mode with ``has_aux=True``).

    Args:
      state: the Entropy-SGD state, or an Optax state containing exactly one.

    Returns:
      What the last ``grad_fn`` call returned as ``aux`` (``None`` before the
      first update).

    Example:
      >>> import jax, jax.numpy as jnp, flatjax
      >>> f = lambda w, i, n: (jnp.sum(w ** 2), n + 1)     # aux: a call counter
      >>> opt = flatjax.entropy_sgd(0.1, inner_steps=3, has_aux=True)
      >>> w = jnp.ones(2)
      >>> (loss, n), g = jax.value_and_grad(f, has_aux=True)(w, 0, 0)
      >>> _, state = opt.update(g, opt.init(w), w, grad_fn=jax.value_and_grad(f, has_aux=True),
      ...                       value=loss, aux=n)
      >>> int(flatjax.entropy_sgd_aux(state))            # inner steps 0, 1, 2
      3
    """
    return _find_state(state).aux


def entropy_sgd_coupling(state) -> jax.Array:
    """γ_t, the coupling the inner steps of the current outer step use (for logging).

    Args:
      state: the Entropy-SGD state, or an Optax state containing exactly one.

    Returns:
      A float32 scalar (0 during the first outer step when calibrating γ_0).

    Example:
      >>> import jax.numpy as jnp, flatjax
      >>> opt = flatjax.entropy_sgd(0.1, coupling=flatjax.exponential_coupling(0.5, 10))
      >>> float(flatjax.entropy_sgd_coupling(opt.init(jnp.zeros(2))))
      0.5
    """
    return _find_state(state).coupling
