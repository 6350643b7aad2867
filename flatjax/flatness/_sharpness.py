"""SAM sharpness: the largest loss increase within a ρ-ball (Foret et al. 2021)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from flatjax.flatness._checks import _check_positive_float, _check_positive_int
from flatjax.flatness._data import _flat_loss, _loss_parts

__all__ = ["sam_sharpness"]


def sam_sharpness(
    loss_fn: Callable[[Any], jnp.ndarray],
    params: Any,
    rho: float,
    *,
    num_steps: int = 1,
) -> jnp.ndarray:
    r"""SAM sharpness: the loss increase at the worst point of a ρ-ball, estimated.

    .. math::
      S_ρ(w) = \max_{\|ε\| ≤ ρ} L(w + ε) − L(w).

    ``num_steps = 1`` is SAM's first-order solution ε = ρ g/‖g‖, g = ∇L(w)
    (Foret et al. 2021); on L = ½wᵀHw it gives ρ‖Hw‖ + ½ρ² gᵀHg/‖g‖². With
    ``num_steps = K > 1`` it continues with K − 1 projected normalised ascent
    steps ε ← Π_ρ(ε + ρ ∇L(w+ε)/‖∇L(w+ε)‖) (Π_ρ: rescale onto the ball if
    outside) and returns the largest increase seen, so the result never
    decreases with K. Every estimate is a lower bound of S_ρ; for a quadratic
    S_ρ ≤ ρ‖g‖ + ½ρ²λ_max. A zero gradient gives ε = 0 (no NaN).

    Args:
      loss_fn: ``loss_fn(params) -> scalar``, e.g. from :func:`dataset_loss`.
      params: the point w.
      rho: radius ρ > 0 of the ball (Euclidean norm over all parameters).
      num_steps: K ≥ 1 ascent steps.

    Returns:
      The estimated S_ρ(w), a scalar.

    Example:
      >>> import flatjax
      >>> import jax.numpy as jnp
      >>> loss = lambda w: 0.5 * jnp.sum(w**2)  # g = w, H = I
      >>> float(flatjax.sam_sharpness(loss, jnp.array([3.0, 4.0]), 0.1))  # 0.1·5 + 0.005
      0.505...

    References:
      Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
      Generalization", ICLR 2021, arXiv 2010.01412.
    """
    rho = _check_positive_float("rho", rho)
    num_steps = _check_positive_int("num_steps", num_steps)
    fn, args = _loss_parts(loss_fn)
    return _sam_jit(fn, params, args, rho, num_steps=num_steps)


def _sam(loss_fn, params, loss_args, rho, *, num_steps):
    f, flat, _ = _flat_loss(loss_fn, params, loss_args)
    base = f(flat)

    def unit(g):
        norm = jnp.linalg.norm(g)
        return jnp.where(norm > 0, g / jnp.where(norm > 0, norm, 1.0), 0.0)

    eps = rho * unit(jax.grad(f)(flat))
    best = f(flat + eps) - base

    def body(_, carry):
        eps, best = carry
        eps = eps + rho * unit(jax.grad(f)(flat + eps))
        norm = jnp.linalg.norm(eps)
        eps = eps * jnp.minimum(1.0, rho / jnp.where(norm > 0, norm, 1.0))
        return eps, jnp.maximum(best, f(flat + eps) - base)

    _, best = jax.lax.fori_loop(1, num_steps, body, (eps, best))
    return best


_sam_jit = jax.jit(_sam, static_argnames=("loss_fn", "num_steps"))
