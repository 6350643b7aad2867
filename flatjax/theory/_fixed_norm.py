r"""Fixed-norm square loss and its constrained local entropy.

Baldassi, Malatesta, Negri, Zecchina, Wide flat minima and optimal
generalization in classifying high-dimensional Gaussian mixtures,
J. Stat. Mech. 2020, arXiv:2010.14761: the weight norm R is a control
parameter, and replicas held at a fixed distance from a centre probe the
flatness of the square loss around it.
"""

from __future__ import annotations

import math
import numbers

import jax.numpy as jnp
import numpy as np

from flatjax.theory._mixture import _check_count, _check_data, _check_positive


def _centred(x, y, bias: bool):
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if bias:
        return x - x.mean(0), y - y.mean(), x.mean(0), y.mean()
    return x, y, np.zeros(x.shape[1]), 0.0


def fixed_norm_mse(x, y, radius, *, bias: bool = True):
    r"""Square-loss minimiser on the sphere ‖w‖ = R (exact, secular equation).

    Minimises Σ_μ (y^μ − w·x^μ − b)² subject to ‖w‖ = R. In the paper's
    normalisation the weights are W = √N w with ‖W‖² = R²N and the output is
    W·x/√N; here w = W/√N so that sign(w·x + b) is the classifier used by
    ``generalization_error``. With a bias, b is eliminated in closed form
    (centre x and y); the remaining problem is a trust-region problem on the
    sphere whose global minimiser is w(λ) = (XᵀX + λI)⁻¹Xᵀy with λ ≥ −s_min
    (s_min the smallest eigenvalue of XᵀX) chosen so that ‖w(λ)‖ = R; λ < 0
    for R above the unconstrained least-squares norm. In the "hard case"
    (R beyond the norm reachable with λ > −s_min, e.g. P < N) a component
    along the bottom eigenvector completes the norm.

    Args:
      x: inputs [P, N]; y: labels ±1 [P]; radius: R > 0; bias: fit b.

    Returns:
      (w [N] float32 with ‖w‖ = R, b float32 scalar).

    Example:
      >>> import numpy as np
      >>> from flatjax.theory import fixed_norm_mse
      >>> x = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.5]]); y = np.array([1.0, -1.0, -1.0])
      >>> w, b = fixed_norm_mse(x, y, 2.0)
      >>> round(float(np.linalg.norm(w)), 4)
      2.0
    """
    x, y = _check_data(x, y)
    if not (np.all(np.isfinite(x))):
        raise ValueError("x holds NaN or infinite values.")
    radius = _check_positive("radius (R)", radius)
    xc, yc, xm, ym = _centred(x, y, bias)
    s, e = np.linalg.eigh(xc.T @ xc)
    c = e.T @ (xc.T @ yc)
    scale = max(float(s[-1]), 1.0)
    live = np.abs(c) > 1e-10 * max(float(np.abs(c).max()), 1e-300)
    lo = -float(s[0])

    def norm2(lam):
        return float(np.sum(c[live] ** 2 / (s[live] + lam) ** 2))

    edge = lo + 1e-12 * scale
    if not live.any():
        coef = np.zeros_like(c)
        coef[0] = radius
    elif norm2(edge) >= radius**2:
        hi = lo + max(scale, float(np.sqrt(np.sum(c**2))) / radius) * 2 + 1.0
        a, bnd = edge, hi
        for _ in range(200):
            mid = 0.5 * (a + bnd)
            if norm2(mid) > radius**2:
                a = mid
            else:
                bnd = mid
        lam = 0.5 * (a + bnd)
        coef = np.where(live, c / (s + lam), 0.0)
    else:  # hard case: λ = −s_min, complete the norm along the bottom eigenvector
        gap = s - s[0]
        coef = np.where(live & (gap > 1e-12 * scale), c / np.where(gap > 0, gap, 1.0), 0.0)
        coef[0] += math.sqrt(max(radius**2 - float(np.sum(coef**2)), 0.0))
    w = e @ coef
    w *= radius / np.linalg.norm(w)
    b = ym - float(xm @ w) if bias else 0.0
    return jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)


def fixed_distance_replicated_mse(
    x,
    y,
    radius,
    overlap,
    *,
    num_replicas: int = 3,
    num_steps: int = 2000,
    bias: bool = True,
    seed: int = 0,
    init=None,
):
    r"""Constrained local entropy of the fixed-norm square loss: replicas at fixed overlap.

    y replicas w_a and a centre w̃, all on the sphere ‖·‖ = R, each replica at
    normalised overlap w_a·w̃ / R² = q with the centre (distance
    d² = ‖w_a − w̃‖²/R² = 2(1 − q)), minimise Σ_a L(w_a) with
    L(w) = min_b (1/P) Σ_μ (y^μ − w·x^μ − b)². The parametrisation
    w_a = q w̃ + √(1 − q²) R t_a, t_a ⊥ w̃, ‖t_a‖ = 1, holds the constraints
    exactly; projected gradient descent (step 1/‖2XᵀX/P‖) runs on (w̃, t_a),
    with the centre's gradient Σ_a [q ∇L(w_a) − √(1 − q²) (∇L(w_a)·w̃/R) t_a]
    that accounts for the tangents turning with the centre.
    The centre is the estimator (its bias is the square-loss optimal one).
    q → 1 reduces to ``fixed_norm_mse``. Baldassi et al., arXiv 2010.14761.

    Returns:
      (w̃ [N] float32, b float32 scalar).

    Example:
      >>> import numpy as np
      >>> from flatjax.theory import fixed_distance_replicated_mse
      >>> rng = np.random.default_rng(0); x = rng.normal(size=(40, 5)); y = np.sign(x[:, 0])
      >>> w, b = fixed_distance_replicated_mse(x, y, 1.0, 0.9, num_steps=200)
      >>> round(float(np.linalg.norm(w)), 4)
      1.0
    """
    x, y = _check_data(x, y)
    if not np.all(np.isfinite(x)):
        raise ValueError("x holds NaN or infinite values.")
    radius = _check_positive("radius (R)", radius)
    if isinstance(overlap, bool) or not isinstance(overlap, numbers.Real) or not -1 < overlap <= 1:
        raise ValueError(f"overlap (q) must be a number in (-1, 1], got {overlap!r}.")
    num_replicas = _check_count("num_replicas", num_replicas)
    num_steps = _check_count("num_steps", num_steps)
    xc, yc, xm, ym = _centred(x, y, bias)
    p, n = xc.shape
    a = xc.T @ xc / p
    cvec = xc.T @ yc / p
    lr = 1.0 / (2.0 * float(np.linalg.eigvalsh(a)[-1]) + 1e-12)
    rng = np.random.default_rng(seed)
    centre = np.asarray(init, np.float64) if init is not None else cvec.copy()
    if centre.shape != (n,) or not np.all(np.isfinite(centre)) or not np.linalg.norm(centre) > 0:
        centre = rng.normal(size=n)
    centre *= radius / np.linalg.norm(centre)
    q = float(overlap)
    s = math.sqrt(max(1.0 - q * q, 0.0))

    def orth(t, c):
        u = c / np.linalg.norm(c)
        t = t - np.outer(t @ u, u)
        return t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-300)

    t = orth(rng.normal(size=(num_replicas, n)), centre)
    for _ in range(num_steps):
        reps = q * centre + s * radius * t
        g = 2.0 * (reps @ a - cvec)  # ∇L(w_a), rows
        # The tangents follow the centre (t_a ⊥ centre): moving the centre by δ
        # tilts t_a by −(t_a·δ) centre/R², hence the second term.
        grad_centre = q * g - s * (g @ centre / radius)[:, None] * t
        centre = centre - lr * grad_centre.sum(0) / num_replicas
        centre *= radius / np.linalg.norm(centre)
        if s > 0:
            t = orth(t - lr * s * radius * g / radius**2, centre)
    b = ym - float(xm @ centre) if bias else 0.0
    return jnp.asarray(centre, jnp.float32), jnp.asarray(b, jnp.float32)
