r"""The two steps both Entropy-SGD drivers are built from, and the coupling they apply.

One Langevin step of the walker x′ and its running average μ, and the outer
step that moves the anchor x, with γ_t the coupling of outer step t:

.. code-block:: text

    x′ ← x′ + inner_optimizer(∇L(x′) + γ_t (x′ − x)) + ε √(2η′) ξ,   ξ: i.i.d., mean 0, cov I
    μ  ← α μ + (1 − α) x′
    x  ← x + γ_t · outer_optimizer(x − μ)       # γ(x − μ) is the gradient of −F

Scan mode runs L Langevin steps in a ``lax.scan`` and then the outer step;
stepwise mode takes one Langevin step per call and the outer step every
L-th call. Both call :meth:`EntropySGDCore.langevin_step` and
:meth:`EntropySGDCore.outer_step`, so they compute the same thing.

The applied coupling is γ_t = min(c · coupling(t), ``max_coupling``,
``clamp_fraction`` · γ_stable(t)), with γ_stable the largest γ at which the
inner and the outer steps are stable (read off the optimizers by
:mod:`flatjax._stability`) and c = 1, or γ_0 / coupling(0) once γ_0 has been
calibrated as loss / (½ ‖x − x′‖²).

References:
  Chaudhari et al., Entropy-SGD: biasing gradient descent into wide valleys,
  ICLR 2017, arXiv:1611.01838.
  Pittorino et al., Entropic gradient descent algorithms and wide flat minima,
  ICLR 2021, arXiv:2006.07897.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

from flatjax import _stability
from flatjax._esgd._noise import normal_like
from flatjax._esgd._precision import cast_like, is_low_precision, widen
from flatjax._esgd._state import EntropySGDState
from flatjax._validation import check_float_leaves

__all__ = ["EntropySGDCore"]


@dataclass(frozen=True)
class EntropySGDCore:
    """Validated hyperparameters of one Entropy-SGD optimizer, and its steps.

    Built by :func:`flatjax._esgd._hparams.make_core`, which checks the
    arguments of the public factories. Numeric fields may be traced
    (``optax.inject_hyperparams``).

    Attributes:
      outer_optimizer: the outer transform (with extra-args support).
      outer_usable: whether the outer step's stability bound applies.
      inner_optimizer: the inner transform (with extra-args support).
      raw_inner: the inner transform as given (what the stability probe reads).
      inner_usable: whether the inner step's stability bound can be measured.
      inner_eta: η′ read off the inner optimizer (``inner_coupling="update"``),
        else ``None``.
      inner_steps: L.
      coupling_fn: ``count -> coupling(count)`` in float32.
      add_noise: whether the Langevin noise is drawn at all.
      noise_std: ε √(2η′).
      average_weight: α.
      inner_coupling: ``"gradient"`` or ``"update"``.
      outer_scale: ``"coupling"``, ``"gradient"`` or ``"none"``.
      calibrate: whether γ_0 is calibrated.
      calibration_step: the outer step whose inner loop calibrates.
      max_coupling: absolute bound on γ, or ``None``.
      clamp_fraction: fraction of the stability bound γ may reach.
      seed: seed of the state's PRNG key.
      noise_generator: ``"irwin_hall"``, ``"hash"`` or ``"threefry"``.
    """

    outer_optimizer: optax.GradientTransformationExtraArgs
    outer_usable: bool
    inner_optimizer: optax.GradientTransformationExtraArgs
    raw_inner: optax.GradientTransformation
    inner_usable: bool
    inner_eta: Any
    inner_steps: int
    coupling_fn: Callable[[Any], jax.Array]
    add_noise: Any
    noise_std: Any
    average_weight: Any
    inner_coupling: str
    outer_scale: str
    calibrate: bool
    calibration_step: int
    max_coupling: Any
    clamp_fraction: Any
    seed: int
    noise_generator: str

    # ------------------------------------------------------------------ coupling

    def stable_coupling(self, count):
        """clamp_fraction × the largest γ at which the inner and outer steps are stable."""
        if self.inner_coupling == "gradient":
            stable = _stability.stable_coupling(self.raw_inner, 0, usable=self.inner_usable)
        else:  # −η′γ(x′ − x) outside the momentum: plain SGD's bound 2/η′
            eta = self.inner_eta
            stable = jnp.where(eta > 0, 2.0 / jnp.where(eta > 0, eta, 1.0), jnp.inf)
        if self.outer_scale != "none":
            outer = _stability.stable_coupling(
                self.outer_optimizer, count, usable=self.outer_usable
            )
            stable = jnp.minimum(stable, outer)
        return (self.clamp_fraction * stable).astype(jnp.float32)

    def couplings(self, scale, count):
        """(requested, applied) γ at outer step ``count`` for calibration scale ``scale``."""
        requested = scale * self.coupling_fn(count)
        if self.calibrate:
            requested = jnp.where(count > self.calibration_step, requested, 0.0)
        applied = _stability.clamp_coupling(requested, self.stable_coupling(count),
                                            self.max_coupling)
        return requested.astype(jnp.float32), applied

    def calibrated_scale(self, state, anchor, walker, loss):
        """c after the inner loop of outer step ``state.count``.

        At ``calibration_step``: γ_0 = loss / (½‖x − x′‖²) with the LAST inner
        minibatch's loss and the final walker, so c = γ_0 / coupling(0); kept
        when x′ = x exactly. Elsewhere the state's c.
        """
        scale = state.coupling_scale
        if not self.calibrate:
            return scale
        half_sq = 0.5 * optax.tree.norm(optax.tree.sub(anchor, walker), squared=True)
        gamma0 = loss / jnp.maximum(half_sq, 1e-30)
        calibrated = jnp.where(half_sq > 0, gamma0 / self.coupling_fn(0), scale)
        scale = jnp.where(state.count == self.calibration_step, calibrated, scale)
        return scale.astype(jnp.float32)

    # ------------------------------------------------------------------ state

    def init_state(self, params, stepwise: bool) -> EntropySGDState:
        check_float_leaves(params, "entropy_sgd_stepwise" if stepwise else "entropy_sgd")
        one = jnp.ones((), jnp.float32)
        requested, applied = self.couplings(one, jnp.zeros((), jnp.int32))
        wide = widen(params) if stepwise else None
        return EntropySGDState(
            count=jnp.zeros((), jnp.int32),
            inner_count=jnp.zeros((), jnp.int32),
            key=jax.random.PRNGKey(self.seed),
            coupling=applied,
            requested_coupling=requested,
            coupling_scale=one,
            loss=jnp.zeros((), jnp.float32),
            anchor=wide,
            average=widen(params) if stepwise else None,
            walker=widen(params) if stepwise and is_low_precision(params) else None,
            inner_state=self.inner_optimizer.init(wide) if stepwise else None,
            outer_state=self.outer_optimizer.init(wide if stepwise else params),
        )

    # ------------------------------------------------------------------ steps

    def langevin_step(self, grads, walker, anchor, average, inner_state, key, gamma):
        """One SGLD step of the (float32) walker and its running average.

        x′ ← x′ + inner(g + γ(x′ − x)) + ε√(2η′) ξ   (inner_coupling='gradient'), or
        x′ ← x′ + inner(g) − η′γ(x′ − x) + ε√(2η′) ξ (inner_coupling='update').
        """
        grads = cast_like(grads, walker)
        if self.inner_coupling == "gradient":
            pulled = jax.tree.map(lambda g, w, x: g + gamma * (w - x), grads, walker, anchor)
            steps, inner_state = self.inner_optimizer.update(pulled, inner_state, walker)
        else:
            steps, inner_state = self.inner_optimizer.update(grads, inner_state, walker)
            steps = jax.tree.map(
                lambda s, w, x: s - self.inner_eta * gamma * (w - x), steps, walker, anchor
            )
        key, noise_key = jax.random.split(key)
        if self.add_noise:
            xi = normal_like(noise_key, walker, self.noise_generator)
            steps = jax.tree.map(lambda s, n: s + self.noise_std * n, steps, xi)
        walker = jax.tree.map(lambda w, s: (w + s).astype(w.dtype), walker, steps)
        a = self.average_weight
        average = jax.tree.map(lambda m, w: a * m + (1 - a) * w, average, walker)
        return walker, average, inner_state, key

    def outer_step(self, state, params, anchor, average, walker, loss):
        """Lands the outer step: calibrates γ_0 if due, moves the anchor.

        ``params`` is the anchor in the loop's dtype (what the outer optimizer
        sees); ``anchor``, ``average`` and ``walker`` are the float32 copies.
        Returns (anchor updates, new outer state, new coupling_scale,
        (requested, applied) γ_{t+1}).
        """
        scale = self.calibrated_scale(state, anchor, walker, loss)
        gamma = state.coupling
        diff = jax.tree.map(lambda x, m: x - m, anchor, average)
        if self.outer_scale == "gradient":
            diff = jax.tree.map(lambda d: gamma * d, diff)
        updates, outer_state = self.outer_optimizer.update(
            cast_like(diff, params), state.outer_state, params
        )
        if self.outer_scale == "coupling":
            updates = jax.tree.map(lambda u: (gamma * u).astype(u.dtype), updates)
        return updates, outer_state, scale, self.couplings(scale, state.count + 1)
