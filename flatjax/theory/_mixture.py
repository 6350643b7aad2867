r"""Gaussian mixture data, exact test and training errors, the Bayes-optimal reference.

Data model: P = αN points in dimension N, labels y = ±1 with P(y = +1) = ρ,
inputs x = y v + √Δ z, z ~ N(0, I_N), v uniform on the unit sphere. See
``flatjax.theory`` for the formulas and references.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------
# Argument checks.


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}.")
    return float(value)


def _check_rho(rho) -> float:
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real) or not 0 < rho < 1:
        raise ValueError(f"rho = P(y = +1) must be a number in (0, 1), got {rho!r}.")
    return float(rho)


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return int(value)


def _check_data(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] < 1:
        raise ValueError(
            f"expected x of shape [P, N] and y of shape [P] with P >= 1, got "
            f"x {x.shape} and y {y.shape}."
        )
    if not np.all(np.abs(y) == 1):
        found = np.unique(y)
        raise ValueError(
            f"labels y must be +1 or -1, found values {found[:10].tolist()}"
            f"{' ...' if found.size > 10 else ''} (map {{0, 1}} labels with y = 2 * label - 1)."
        )
    return x, y


# ----------------------------------------------------------------------------
# Data and exact errors.


class Mixture(NamedTuple):
    """A training set of the Gaussian mixture.

    Attributes:
      x: inputs, float32 [P, N].
      y: labels ±1, float32 [P].
      v: the cluster direction, float32 [N], ‖v‖ = 1.
    """

    x: jax.Array
    y: jax.Array
    v: jax.Array


def gaussian_tail(u):
    r"""H(u) = ½ erfc(u/√2) = P(g > u) for g ~ N(0, 1).

    Example:
      >>> from flatjax.theory import gaussian_tail
      >>> round(float(gaussian_tail(0.0)), 4), round(float(gaussian_tail(1.0)), 4)
      (0.5, 0.1587)
    """
    return 0.5 * jax.scipy.special.erfc(jnp.asarray(u) / math.sqrt(2.0))


def teacher_direction(key: jax.Array, dim: int) -> jax.Array:
    """v uniform on the unit sphere of R^dim (a normalised Gaussian vector).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flatjax.theory import teacher_direction
      >>> v = teacher_direction(jax.random.key(0), 50)
      >>> v.shape, round(float(jnp.linalg.norm(v)), 5)
      ((50,), 1.0)
    """
    dim = _check_count("dim (N)", dim)
    v = jax.random.normal(key, (dim,))
    return v / jnp.linalg.norm(v)


def sample_mixture(
    key: jax.Array, v, num_samples: int, *, delta: float = 1.0, rho: float = 0.5
) -> tuple[jax.Array, jax.Array]:
    r"""Draws ``num_samples`` pairs (x, y): y = +1 w.p. ρ, x = y v + √Δ z.

    Args:
      key: a ``jax.random`` key; the same key gives the same samples.
      v: the cluster direction [N].
      num_samples: P >= 1.
      delta: Δ > 0, the noise variance per coordinate.
      rho: ρ in (0, 1), the probability of the label +1.

    Returns:
      ``(x, y)``: float32 arrays [P, N] and [P] (labels ±1).

    Example:
      >>> import jax
      >>> from flatjax.theory import sample_mixture, teacher_direction
      >>> v = teacher_direction(jax.random.key(0), 20)
      >>> x, y = sample_mixture(jax.random.key(1), v, 8, rho=0.25)
      >>> x.shape, y.shape
      ((8, 20), (8,))
    """
    num_samples = _check_count("num_samples (P)", num_samples)
    delta = _check_positive("delta (Δ)", delta)
    rho = _check_rho(rho)
    v = jnp.asarray(v, jnp.float32)
    if v.ndim != 1:
        raise ValueError(f"v must be a vector [N], got shape {v.shape}.")
    k_label, k_noise = jax.random.split(key)
    y = jnp.where(jax.random.uniform(k_label, (num_samples,)) < rho, 1.0, -1.0)
    z = jax.random.normal(k_noise, (num_samples, v.shape[0]))
    return y[:, None] * v + math.sqrt(delta) * z, y


def gaussian_mixture(
    key: jax.Array, dim: int, alpha: float, *, delta: float = 1.0, rho: float = 0.5
) -> Mixture:
    r"""A training set of P = round(αN) points of the mixture, with its v.

    Args:
      key: a ``jax.random`` key (split into one for v and one for the data).
      dim: N >= 1.
      alpha: α > 0, the sample ratio P/N.
      delta: Δ > 0.
      rho: ρ in (0, 1).

    Returns:
      A ``Mixture(x, y, v)``.

    Example:
      >>> import jax
      >>> from flatjax.theory import gaussian_mixture
      >>> data = gaussian_mixture(jax.random.key(0), dim=10, alpha=2.0)
      >>> data.x.shape, data.y.shape, data.v.shape
      ((20, 10), (20,), (10,))
    """
    dim = _check_count("dim (N)", dim)
    alpha = _check_positive("alpha (α)", alpha)
    num_samples = max(1, round(alpha * dim))
    k_v, k_data = jax.random.split(key)
    v = teacher_direction(k_v, dim)
    x, y = sample_mixture(k_data, v, num_samples, delta=delta, rho=rho)
    return Mixture(x, y, v)


def generalization_error(w, b, v, *, delta: float = 1.0, rho: float = 0.5):
    r"""Exact test error of sign(w·x + b) on the mixture.

    .. math::

      ε_g = ρ H\Big(\frac{w·v + b}{\sqrt{Δ}‖w‖}\Big)
          + (1 − ρ) H\Big(\frac{w·v − b}{\sqrt{Δ}‖w‖}\Big)

    A point of class +1 is misclassified when w·v + b + √Δ‖w‖g < 0, one of
    class −1 when −w·v + b + √Δ‖w‖g > 0, g ~ N(0, 1).

    Args:
      w: weights [N] (any nonzero norm: the error depends on the direction).
      b: bias, a scalar.
      v: the cluster direction [N], ‖v‖ = 1.
      delta: Δ > 0.
      rho: ρ in (0, 1).

    Returns:
      ε_g as a float32 scalar array in [0, 1].

    Example:
      >>> import jax.numpy as jnp
      >>> from flatjax.theory import generalization_error
      >>> v = jnp.array([1.0, 0.0])
      >>> round(float(generalization_error(v, 0.0, v)), 4)  # H(1)
      0.1587
      >>> round(float(generalization_error(-v, 0.0, v)), 4)  # H(-1)
      0.8413
    """
    delta = _check_positive("delta (Δ)", delta)
    rho = _check_rho(rho)
    w, v = jnp.asarray(w, jnp.float32), jnp.asarray(v, jnp.float32)
    if w.ndim != 1 or w.shape != v.shape:
        raise ValueError(f"w and v must be vectors of one shape, got {w.shape} and {v.shape}.")
    if not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError("w holds NaN or infinite values.")
    if not bool(jnp.all(jnp.isfinite(jnp.asarray(b)))):
        raise ValueError(f"b must be finite, got {b!r}.")
    if float(jnp.linalg.norm(w)) == 0.0:
        raise ValueError("w is the zero vector: sign(w·x + b) has no direction, ε_g is undefined.")
    scale = math.sqrt(delta) * jnp.linalg.norm(w)
    overlap = w @ v
    return rho * gaussian_tail((overlap + b) / scale) + (1 - rho) * gaussian_tail(
        (overlap - b) / scale
    )


def training_error(w, b, x, y):
    """Fraction of points misclassified by sign(w·x + b) (ties and NaNs count as errors).

    Example:
      >>> import jax.numpy as jnp
      >>> from flatjax.theory import training_error
      >>> x = jnp.array([[1.0], [2.0], [-1.0]]); y = jnp.array([1.0, -1.0, -1.0])
      >>> float(training_error(jnp.array([1.0]), 0.0, x, y))
      0.3333333432674408
    """
    x, w, y = jnp.asarray(x), jnp.asarray(w), jnp.asarray(y)
    if x.ndim != 2 or w.shape != (x.shape[1],) or y.shape != (x.shape[0],):
        raise ValueError(
            f"expected w of shape [N], x of shape [P, N] and y of shape [P], got "
            f"w {w.shape}, x {x.shape} and y {y.shape}."
        )
    if not bool(jnp.all(jnp.isfinite(w))):
        raise ValueError("w holds NaN or infinite values.")
    return jnp.mean(~(y * (x @ w + b) > 0))


def bayes_optimal_overlap(alpha: float, delta: float = 1.0) -> float:
    r"""m = √(α/(α + Δ)): the overlap of the Hebbian direction with v as N → ∞.

    Example:
      >>> from flatjax.theory import bayes_optimal_overlap
      >>> bayes_optimal_overlap(1.0, 1.0) ** 2
      0.5000000000000001
    """
    alpha = _check_positive("alpha (α)", alpha)
    delta = _check_positive("delta (Δ)", delta)
    return math.sqrt(alpha / (alpha + delta))


def bayes_optimal_bias(overlap: float, delta: float = 1.0, rho: float = 0.5) -> float:
    r"""b* = Δ log(ρ/(1−ρ)) / (2m): the error-minimising bias of a unit direction.

    For a unit vector ŵ with overlap m = ŵ·v > 0 the projection ŵ·x is
    N(y m, Δ) given y, and sign(ŵ·x + b*) is the Bayes rule on it.

    Example:
      >>> from flatjax.theory import bayes_optimal_bias
      >>> bayes_optimal_bias(0.5, 1.0, 0.5)
      0.0
      >>> round(bayes_optimal_bias(0.5, 1.0, 0.25), 4)  # log(1/3)
      -1.0986
    """
    overlap = _check_positive("overlap (m)", overlap)
    delta = _check_positive("delta (Δ)", delta)
    rho = _check_rho(rho)
    return delta * math.log(rho / (1 - rho)) / (2 * overlap)


def bayes_optimal_error(alpha: float, delta: float = 1.0, rho: float = 0.5) -> float:
    r"""Bayes-optimal test error of the mixture as N → ∞ at fixed α = P/N.

    .. math::

      ε_{BO} = ρ H\Big(\frac{m + b^*}{\sqrt{Δ}}\Big)
             + (1 − ρ) H\Big(\frac{m − b^*}{\sqrt{Δ}}\Big), \quad
      m = \sqrt{\frac{α}{α + Δ}}, \quad b^* = \frac{Δ}{2m}\log\frac{ρ}{1−ρ},

    which for ρ = ½ is H(√(α / (Δ(α + Δ)))).

    Args:
      alpha: α > 0.
      delta: Δ > 0.
      rho: ρ in (0, 1) (½: balanced clusters).

    Returns:
      ε_BO as a Python float.

    Example:
      >>> from flatjax.theory import bayes_optimal_error
      >>> [round(bayes_optimal_error(a), 3) for a in (0.5, 2.0, 5.0)]
      [0.282, 0.207, 0.181]
    """
    m = bayes_optimal_overlap(alpha, delta)
    b = bayes_optimal_bias(m, delta, rho)
    s = math.sqrt(delta)
    tail = lambda u: 0.5 * math.erfc(u / math.sqrt(2.0))
    return rho * tail((m + b) / s) + (1 - rho) * tail((m - b) / s)


# ----------------------------------------------------------------------------
# Estimators.


def hebbian(x, y) -> jax.Array:
    r"""The Hebbian vector w = (1/P) Σ_μ y^μ x^μ (the Bayes-optimal direction).

    Example:
      >>> import jax.numpy as jnp
      >>> from flatjax.theory import hebbian
      >>> hebbian(jnp.array([[1.0, 2.0], [3.0, 1.0]]), jnp.array([1.0, -1.0]))
      Array([-1. ,  0.5], dtype=float32)
    """
    x, y = _check_data(x, y)
    return jnp.asarray(y, jnp.float32) @ jnp.asarray(x, jnp.float32) / x.shape[0]


def bayes_optimal_classifier(x, y, *, delta: float = 1.0, rho: float = 0.5):
    r"""Finite-N Bayes-optimal classifier: Hebbian direction, plug-in threshold.

    w = (1/P) Σ y x and b = ‖w‖ Δ log(ρ/(1−ρ)) / (2m) with m = √(α/(α+Δ)),
    α = P/N: the threshold ``bayes_optimal_bias`` at the asymptotic overlap.
    For ρ = ½ the bias is 0. It uses the model's Δ and ρ (a Bayes-optimal
    estimator knows the prior), never v.

    Returns:
      ``(w, b)``.

    Example:
      >>> import jax
      >>> from flatjax.theory import bayes_optimal_classifier, gaussian_mixture
      >>> data = gaussian_mixture(jax.random.key(0), dim=10, alpha=2.0)
      >>> w, b = bayes_optimal_classifier(data.x, data.y)
      >>> w.shape, float(b)
      ((10,), 0.0)
    """
    x, y = _check_data(x, y)
    w = hebbian(x, y)
    m = bayes_optimal_overlap(x.shape[0] / x.shape[1], delta)
    return w, float(jnp.linalg.norm(w)) * bayes_optimal_bias(m, delta, rho)
