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

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from flatjax._validation import check_interval, is_real

__all__ = [
    "SGDProbe", "Measured", "measure", "probe_sgd", "stable_coupling", "stable_coupling_step",
    "learning_rate_at", "can_measure", "sgd_type", "clamp_coupling",
]

_PROBE_COUNTS = (0, 1, 10, 100, 1000)


class SGDProbe(NamedTuple):
    """What :func:`probe_sgd` measured (concrete Python numbers).

    Attributes:
      learning_rate: η at the probed step count.
      momentum: β (0 for plain SGD).
      nesterov: whether the momentum is Nesterov's.
      count: the step count at which η was read (the first with η > 0).
    """

    learning_rate: float
    momentum: float
    nesterov: bool
    count: int


class Measured(NamedTuple):
    """η, β and the kind of an optimizer at one step count, as (traceable) arrays.

    Attributes:
      learning_rate: η (meaningful where ``known``).
      momentum: β.
      nesterov: bool array.
      known: bool array, whether the optimizer is SGD-type (linear in the
        gradient, plain, heavy-ball or Nesterov momentum).
    """

    learning_rate: jax.Array
    momentum: jax.Array
    nesterov: jax.Array
    known: jax.Array


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


def measure(optimizer: optax.GradientTransformation, count=0) -> Measured:
    """Reads η, β and the momentum kind off ``optimizer`` at step ``count`` (traceable).

    Runs it on a scalar parameter at 0 (so weight decay does not show) with
    the gradients 1, 0, 0 (and 2, for linearity), every ``count`` field of
    its state pinned at ``count``: SGD gives −η, 0, 0; heavy ball −η, −ηβ,
    −ηβ²; Nesterov −η(1 + β), −ηβ², −ηβ³. Works when the hyperparameters are
    traced (``optax.inject_hyperparams``) and costs a few scalar operations.
    """
    dtype = jnp.float32
    params = jnp.zeros((), dtype)
    state = _pinned(optimizer.init(params), count)

    def step(g, s):
        u, s = optimizer.update(jnp.asarray(g, dtype), s, params)
        return jnp.asarray(u, dtype), _pinned(s, count)

    u0, s1 = step(1.0, state)
    u1, s2 = step(0.0, s1)
    u2, _ = step(0.0, s2)
    v0, _ = step(2.0, state)
    scale = jnp.abs(u0)
    linear = (u0 < 0) & (jnp.abs(v0 - 2 * u0) <= 1e-4 * scale)
    plain = jnp.abs(u1) <= 1e-5 * scale
    beta = jnp.where(plain, 0.0, u2 / jnp.where(u1 == 0, 1.0, u1))
    heavy = jnp.abs(u1 - u0 * beta) <= 1e-3 * scale
    nesterov = ~plain & ~heavy & (jnp.abs(u1 - u0 * beta**2 / (1 + beta)) <= 1e-3 * scale)
    known = linear & (plain | ((beta > 0) & (beta < 1) & (heavy | nesterov)))
    eta = jnp.where(nesterov, -u0 / (1 + beta), -u0)
    return Measured(eta, beta, nesterov, known)


def stable_coupling(optimizer: optax.GradientTransformation, count=0, *, usable=True):
    """The largest γ at which an explicit coupling step of ``optimizer`` is stable.

    b(β)/η from the table above at step ``count`` (traceable); +inf where the
    optimizer is not SGD-type or η = 0 (nothing to bound). ``usable=False``
    (an optimizer that cannot run on a scalar) gives +inf.
    """
    if not usable:
        return jnp.full((), jnp.inf, jnp.float32)
    m = measure(optimizer, count)
    bound = stable_coupling_step(m.momentum, m.nesterov)
    ok = m.known & (m.learning_rate > 0)
    return jnp.where(ok, bound / jnp.where(ok, m.learning_rate, 1.0), jnp.inf)


def can_measure(optimizer: optax.GradientTransformation) -> bool:
    """Whether ``optimizer`` runs on a scalar parameter (so :func:`measure` applies)."""
    try:
        jax.eval_shape(lambda: measure(optimizer, 0))
    except Exception:  # noqa: BLE001 - e.g. a masked optimizer bound to a tree structure
        return False
    return True


def sgd_type(optimizer: optax.GradientTransformation) -> bool | None:
    """Whether ``optimizer`` is SGD-type; None when its hyperparameters are traced."""
    if not can_measure(optimizer):
        return False
    try:
        with jax.ensure_compile_time_eval():
            return bool(measure(optimizer, 0).known)
    except jax.errors.ConcretizationTypeError:
        return None


def probe_sgd(optimizer: optax.GradientTransformation) -> SGDProbe | None:
    """Concrete η, β and kind of an SGD-type optimizer (for checks), or None.

    None when the optimizer is not SGD-type, its hyperparameters are traced,
    or its learning rate is 0 at every probed step count.

    Args:
      optimizer: an Optax transformation, e.g. ``optax.sgd(0.1, momentum=0.9, nesterov=True)``
        (chained weight decay and clipping above the update size are fine).

    Returns:
      An :class:`SGDProbe`, or None.

    Example:
      >>> import optax
      >>> from flatjax._stability import probe_sgd
      >>> p = probe_sgd(optax.sgd(0.1, momentum=0.9, nesterov=True))
      >>> round(p.learning_rate, 6), round(p.momentum, 6), p.nesterov
      (0.1, 0.9, True)
    """
    if not can_measure(optimizer):
        return None
    try:
        with jax.ensure_compile_time_eval():
            has_count = _has_count(optimizer.init(jnp.zeros(())))
            for count in _PROBE_COUNTS if has_count else (0,):
                m = measure(optimizer, count)
                if not bool(m.known):
                    return None
                if float(m.learning_rate) > 0:
                    break
            else:
                return None
            return SGDProbe(float(m.learning_rate), float(m.momentum), bool(m.nesterov), count)
    except jax.errors.ConcretizationTypeError:
        return None


def stable_coupling_step(momentum, nesterov):
    """The largest a = ηγ at which the explicit coupling step is stable (table above).

    Python numbers give a float; arrays (a :class:`Measured`) give an array.
    A Python momentum outside [0, 1) has no stable step: ``ValueError``.

    Example:
      >>> from flatjax._stability import stable_coupling_step
      >>> stable_coupling_step(0.0, False), stable_coupling_step(0.9, False)
      (2.0, 3.8)
      >>> round(stable_coupling_step(0.9, True), 4)
      1.3571
    """
    if is_real(momentum):
        check_interval("momentum", momentum, "[0, 1)")
    heavy_ball = 2.0 * (1.0 + momentum)  # β = 0 gives plain SGD's 2 in both forms
    if isinstance(nesterov, bool):
        return heavy_ball / (1.0 + 2.0 * momentum) if nesterov else heavy_ball
    return jnp.where(nesterov, heavy_ball / (1.0 + 2.0 * momentum), heavy_ball)


def clamp_coupling(requested, stable, max_coupling=None):
    """The applied γ: min(requested, stable, max_coupling), float32 (traceable)."""
    applied = jnp.minimum(jnp.asarray(requested, jnp.float32), stable)
    if max_coupling is not None:
        applied = jnp.minimum(applied, jnp.asarray(max_coupling, jnp.float32))
    return applied.astype(jnp.float32)


def learning_rate_at(optimizer, count) -> jax.Array:
    """η of an SGD-type optimizer at step ``count`` (traceable; 0 where not SGD-type)."""
    m = measure(optimizer, count)
    return jnp.where(m.known, jnp.maximum(m.learning_rate, 0.0), 0.0).astype(jnp.float32)
