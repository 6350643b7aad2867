r"""Where an explicit elastic coupling step stops being stable, read off the optimizer.

Both algorithms add an elastic force γ (w − c) to a gradient and hand it to an
SGD-type optimizer. On the coupling alone the distance d = w − c then follows
a linear recurrence whose stability depends only on a = ηγ and the momentum β
(optax's ``trace``, the same as PyTorch's SGD with dampening 0):

=================  ===============================  =========================
optimizer          update on a gradient g           stable while a = ηγ <
=================  ===============================  =========================
SGD                −η g                             2
heavy ball         b ← βb + g;  −η b                2 (1 + β)
Nesterov           b ← βb + g;  −η (g + βb)         2 (1 + β) / (1 + 2β)
=================  ===============================  =========================

(Jury's criterion on the characteristic polynomial; for Nesterov it is
λ² − (1 + β − a(1 + β)) λ + β(1 − a).) Nesterov 0.9 is stable only up to
ηγ ≈ 1.357, heavy ball 0.9 up to 3.8.

Nobody should have to tell flatjax the learning rate twice, so the
optimizer's η, β and kind are *measured*: :func:`probe_sgd` runs it on a
scalar parameter at 0 with the gradients 1, 0, 0 and reads the three updates
(SGD: −η, 0, 0; heavy ball: −η, −ηβ, −ηβ²; Nesterov: −η(1 + β), −ηβ², −ηβ³).
Weight decay does not show (the parameter is 0). Learning-rate schedules are
read at the step count of the update (every ``count`` field of the optimizer
state is set to it). Optimizers whose update is not linear in the gradient
(Adam, sign methods) are reported as not SGD-type: their steps are bounded
by their learning rate, and flatjax then clamps only at a user-given bound.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["SGDProbe", "probe_sgd", "stable_coupling_step", "learning_rate_at"]

_PROBE_COUNTS = (0, 1, 10, 100, 1000)


class SGDProbe(NamedTuple):
    """What :func:`probe_sgd` measured.

    Attributes:
      learning_rate: η at the probed step count.
      momentum: β (0 for plain SGD).
      nesterov: whether the momentum is Nesterov's.
      count: the step count at which η was read (the first with η > 0).
      has_count: whether the optimizer's state has ``count`` fields (a
        schedule), so η must be re-read at every step.
    """

    learning_rate: float
    momentum: float
    nesterov: bool
    count: int
    has_count: bool


def _pinned(state, count):
    try:
        return optax.tree_utils.tree_set(state, count=jnp.asarray(count, jnp.int32))
    except (KeyError, ValueError, TypeError):
        return state


def _has_count(state) -> bool:
    try:
        return bool(jax.tree.leaves(optax.tree_utils.tree_get_all_with_path(state, "count")))
    except (KeyError, ValueError, TypeError):
        return False


def _updates(optimizer, grads, count):
    """Updates of ``optimizer`` on a scalar parameter at 0, count pinned at ``count``."""
    params = jnp.zeros((), jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    state = optimizer.init(params)
    out = []
    for g in grads:
        u, state = optimizer.update(jnp.asarray(g, params.dtype), _pinned(state, count), params)
        out.append(float(u))
    return out


def probe_sgd(optimizer: optax.GradientTransformation) -> SGDProbe | None:
    """Measures η, β and the kind of an SGD-type optimizer, or None if it is not one.

    Args:
      optimizer: an Optax transformation, e.g. ``optax.sgd(0.1, 0.9, nesterov=True)``
        (chained weight decay and clipping above the update size are fine).

    Returns:
      An :class:`SGDProbe`, or None when the update is not linear in the
      gradient or is zero at every probed step count.

    Example:
      >>> import optax
      >>> from flatjax._stability import probe_sgd
      >>> p = probe_sgd(optax.sgd(0.1, momentum=0.9, nesterov=True))
      >>> round(p.learning_rate, 6), round(p.momentum, 6), p.nesterov
      (0.1, 0.9, True)
    """
    try:
        with jax.ensure_compile_time_eval():
            has_count = _has_count(optimizer.init(jnp.zeros(())))
            for count in _PROBE_COUNTS if has_count else (0,):
                u0, u1, u2 = _updates(optimizer, (1.0, 0.0, 0.0), count)
                if u0 != 0.0:
                    break
            else:
                return None
            (v0,) = _updates(optimizer, (2.0,), count)
    except Exception:  # an optimizer that cannot run on a scalar: not SGD-type here
        return None
    if not (math.isfinite(u0) and u0 < 0) or not math.isclose(v0, 2 * u0, rel_tol=1e-5):
        return None
    tol = 1e-5 * abs(u0)
    if abs(u1) <= tol:
        return SGDProbe(-u0, 0.0, False, count, has_count)
    beta = u2 / u1
    if not 0 < beta < 1:
        return None
    if math.isclose(u1, u0 * beta, rel_tol=1e-4):
        return SGDProbe(-u0, beta, False, count, has_count)
    if math.isclose(u1, u0 * beta * beta / (1 + beta), rel_tol=1e-4):
        return SGDProbe(-u0 / (1 + beta), beta, True, count, has_count)
    return None


def stable_coupling_step(momentum: float, nesterov: bool) -> float:
    """The largest a = ηγ at which the explicit coupling step is stable (table above).

    Example:
      >>> from flatjax._stability import stable_coupling_step
      >>> stable_coupling_step(0.0, False), stable_coupling_step(0.9, False)
      (2.0, 3.8)
      >>> round(stable_coupling_step(0.9, True), 4)
      1.3571
    """
    if momentum == 0:
        return 2.0
    if nesterov:
        return 2.0 * (1.0 + momentum) / (1.0 + 2.0 * momentum)
    return 2.0 * (1.0 + momentum)


def learning_rate_at(optimizer, probe: SGDProbe, count) -> jax.Array:
    """η of a probed optimizer at step ``count`` (traceable).

    For an optimizer without ``count`` fields this is the probed constant;
    otherwise one update of a fresh scalar state with its counts set to
    ``count`` is run (a few scalar operations) and divided by (1 + β) for
    Nesterov.
    """
    if not probe.has_count:
        return jnp.asarray(probe.learning_rate, jnp.float32)
    dtype = jnp.float32
    params = jnp.zeros((), dtype)
    state = optimizer.init(params)
    u, _ = optimizer.update(jnp.ones((), dtype), _pinned(state, count), params)
    scale = 1.0 + probe.momentum if probe.nesterov else 1.0
    return jnp.maximum(-u.astype(jnp.float32) / scale, 0.0)
