r"""Gaussian mixture classification: the analytic part of Pittorino et al.

The data model (the normalisation is ours; the paper's is unconfirmed):
P = αN points in dimension N, labels y = ±1 with P(y = +1) = ρ, inputs

.. math::

  x = y\,v + \sqrt{Δ}\,z, \qquad z \sim N(0, I_N), \qquad ‖v‖ = 1,

with v drawn uniformly on the unit sphere. A linear classifier
ŷ = sign(w·x + b) has an exact test error (``generalization_error``)

.. math::

  ε_g(w, b) = ρ\,H\Big(\frac{w·v + b}{\sqrt{Δ}\,‖w‖}\Big)
            + (1 − ρ)\,H\Big(\frac{w·v − b}{\sqrt{Δ}\,‖w‖}\Big),
  \qquad H(u) = \tfrac12 \operatorname{erfc}(u / \sqrt2),

so no test set is ever sampled: the "test error" of every estimator is this
formula. It depends on (w, b) only up to a positive rescaling.

Bayes-optimal reference (``bayes_optimal_error``). The labels being known,
the likelihood of v is ∝ exp(v·Σ_μ y^μ x^μ / Δ) on the sphere, so the
posterior depends on the data only through the Hebbian vector
S = Σ_μ y^μ x^μ, and the Bayes predictor is a threshold on x·S. As N → ∞ at
fixed α the overlap of the Hebbian direction with v concentrates on
m = √(α / (α + Δ)); the best threshold for a unit direction of overlap m is

.. math::

  b^* = \frac{Δ}{2m} \log\frac{ρ}{1 − ρ},

and ε_BO(α, Δ, ρ) = ρ H((m + b*)/√Δ) + (1 − ρ) H((m − b*)/√Δ), which for
ρ = ½ is the closed form ε_BO = H(√(α / (Δ(α + Δ)))). ``bayes_optimal_classifier``
is its finite-N, data-only version (Hebbian direction, plug-in threshold with
the asymptotic overlap); it knows Δ and ρ, as a Bayes-optimal estimator does.

Estimators. ``erm`` minimises (1/P) Σ_μ ℓ(y^μ(w·x^μ + b)) + (λ/2)‖w‖² for
the square, logistic and hinge losses (the bias is never penalised);
``select_ridge`` chooses λ on a held-out split of the training data;
``max_margin`` is the hard-margin SVM. The flatness-maximising estimators
train the same linear model with flatjax's optimizers: ``replicated_sgd_fit``
(coupled replicas, the centre is returned) and ``entropy_sgd_fit``, either on
a differentiable loss or on the smoothed error-counting loss
``smoothed_error``, which is the training error averaged over Gaussian noise
on the normalised classifier, i.e. a local energy of the classifier itself.

Randomness: every function that samples takes a ``jax.random`` key.

References:
  Pittorino, Lucibello, Feinauer, Perugini, Baldassi, Demyanenko, Zecchina,
  Entropic gradient descent algorithms and wide flat minima, ICLR 2021,
  arXiv:2006.07897.
  Mignacco, Krzakala, Lu, Urbani, Zdeborová, The role of regularization in
  classification of high-dimensional noisy Gaussian mixture, ICML 2020,
  arXiv:2002.11544.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "Mixture",
    "gaussian_tail",
    "teacher_direction",
    "sample_mixture",
    "gaussian_mixture",
    "generalization_error",
    "training_error",
    "bayes_optimal_overlap",
    "bayes_optimal_bias",
    "bayes_optimal_error",
    "hebbian",
    "bayes_optimal_classifier",
    "LOSSES",
    "margin_loss",
    "smoothed_error",
    "erm",
    "max_margin",
    "train_validation_split",
    "select_ridge",
    "classifier_local_energy",
    "replicated_sgd_fit",
    "entropy_sgd_fit",
    "fixed_norm_mse",
    "fixed_distance_replicated_mse",
]


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


LOSSES = {
    "square": lambda m: 0.5 * (1.0 - m) ** 2,
    "logistic": lambda m: jax.nn.softplus(-m),
    "hinge": lambda m: jax.nn.relu(1.0 - m),
}
"""Margin losses ℓ(m) of m = y(w·x + b): ½(1 − m)², log(1 + e^{−m}), max(0, 1 − m)."""


def margin_loss(params, x, y, loss: str):
    r"""(1/P) Σ_μ ℓ(y^μ (w·x^μ + b)) for params ``{"w": [N], "b": []}``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flatjax.theory import margin_loss
      >>> p = {"w": jnp.array([1.0]), "b": jnp.array(0.0)}
      >>> float(margin_loss(p, jnp.array([[1.0]]), jnp.array([1.0]), "hinge"))
      0.0
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}.")
    return jnp.mean(LOSSES[loss](y * (x @ params["w"] + params["b"])))


def smoothed_error(params, x, y, temperature: float):
    r"""Error-counting loss smoothed by Gaussian noise on the normalised classifier.

    .. math::

      E_τ(w, b) = \frac1P \sum_μ H\Big(\frac{y^μ (w·x^μ + b)}{τ ‖w‖}\Big)

    H(κ/τ) is the probability that the normalised margin κ = y(w·x + b)/‖w‖
    plus noise τ g is negative, so E_τ is the training error of the
    classifier averaged over a Gaussian perturbation of its output; it is
    invariant to positive rescalings of (w, b) and tends to the training
    error as τ → 0. For τ ≫ 1 it is linear in the margins and its minimiser
    is the Hebbian direction.

    Args:
      params: ``{"w": [N], "b": []}``.
      x, y: data [P, N] and labels ±1 [P].
      temperature: τ > 0.

    Example:
      >>> import jax.numpy as jnp
      >>> from flatjax.theory import smoothed_error
      >>> p = {"w": jnp.array([2.0]), "b": jnp.array(0.0)}
      >>> round(float(smoothed_error(p, jnp.array([[1.0]]), jnp.array([1.0]), 1.0)), 4)
      0.1587
    """
    margins = y * (x @ params["w"] + params["b"]) / jnp.linalg.norm(params["w"])
    return jnp.mean(gaussian_tail(margins / temperature))


def erm(
    x,
    y,
    *,
    loss: str,
    ridge: float = 0.0,
    bias: bool = False,
    max_iter: int = 200,
):
    r"""Empirical risk minimiser of a linear classifier with optional ridge.

    .. math::

      \min_{w, b}\ \frac1P \sum_μ ℓ\big(y^μ (w·x^μ + b)\big) + \frac{λ}{2}‖w‖²

    with λ = ``ridge`` (b is never penalised, and is 0 when ``bias=False``).

    Solvers: square loss in closed form (λ = 0 gives the minimum-norm
    least-squares solution, the λ → 0⁺ limit); logistic loss with
    ``max_iter`` iterations of L-BFGS (``optax.lbfgs``, zoom line search) from
    w = 0, b = 0 (λ = 0 on separable data: the norm diverges and the run stops
    after ``max_iter`` iterations, with a direction on its way to the
    max-margin one); hinge loss with liblinear's ``LinearSVC`` (dual
    coordinate descent, tolerance 1e-4, at most ``max_iter`` epochs; λ = 0
    is replaced by λ = 1e-5, i.e. the max-margin classifier where the data
    are separable; liblinear penalises its intercept, whose feature is
    scaled by 10 to make that penalty small).

    Args:
      x, y: data [P, N], labels ±1 [P].
      loss: ``"square"``, ``"logistic"`` or ``"hinge"``.
      ridge: λ >= 0.
      bias: fit b.
      max_iter: iteration cap of the iterative solvers.

    Returns:
      ``(w, b)`` as float32 jax arrays [N] and [].

    Example:
      >>> import jax.numpy as jnp
      >>> from flatjax.theory import erm
      >>> x = jnp.array([[1.0, 0.0], [-1.0, 0.0], [2.0, 1.0], [-2.0, 1.0]])
      >>> w, b = erm(x, jnp.array([1.0, -1.0, 1.0, -1.0]), loss="square", ridge=0.0)
      >>> [round(float(c), 4) for c in w]
      [0.6, 0.0]
    """
    x, y = _check_data(x, y)
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}.")
    if isinstance(ridge, bool) or not isinstance(ridge, numbers.Real) or not ridge >= 0:
        raise ValueError(f"ridge must be a number >= 0, got {ridge!r}.")
    x, y = x.astype(np.float64), y.astype(np.float64)
    p, n = x.shape
    if loss == "square":
        if bias:
            x_mean, y_mean = x.mean(0), y.mean()
            xc, yc = x - x_mean, y - y_mean
        else:
            xc, yc = x, y
        if ridge > 0:
            w = np.linalg.solve(xc.T @ xc / p + ridge * np.eye(n), xc.T @ yc / p)
        else:
            w = np.linalg.lstsq(xc, yc, rcond=None)[0]
        b = (y_mean - x_mean @ w) if bias else 0.0
    elif loss == "logistic":
        # Pad P to a power of two with zero-weight rows: one compilation
        # serves every P up to it.
        size = 1 << (p - 1).bit_length()
        weights = np.zeros(size, np.float32)
        weights[:p] = 1.0 / p
        pad = ((0, size - p), (0, 0))
        return _logistic_lbfgs(
            jnp.asarray(np.pad(x, pad), jnp.float32),
            jnp.asarray(np.pad(y, pad[0]), jnp.float32),
            jnp.asarray(weights), jnp.float32(ridge), bias, int(max_iter),
        )
    else:
        from flatjax._extras import require

        LinearSVC = require("sklearn.svm", "the hinge-loss estimator").LinearSVC
        lam = max(ridge, 1e-5)
        model = LinearSVC(
            C=1.0 / (lam * p),
            loss="hinge",
            dual=True,
            fit_intercept=bias,
            intercept_scaling=10.0,
            max_iter=max_iter,
            tol=1e-4,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(x, y)
        w, b = model.coef_[0], (model.intercept_[0] if bias else 0.0)
    return jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)


@jax.jit(static_argnums=(4, 5))
def _logistic_lbfgs(x, y, weights, ridge, bias: bool, num_iter: int):
    """L-BFGS on Σ_μ weights_μ softplus(−y(w·x + b)) + (λ/2)‖w‖², from zero."""
    params = {"w": jnp.zeros(x.shape[1]), "b": jnp.zeros(())}

    def objective(p):
        b = p["b"] if bias else 0.0
        data = weights @ jax.nn.softplus(-y * (x @ p["w"] + b))
        return data + 0.5 * ridge * p["w"] @ p["w"]

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry, _):
        p, state = carry
        value, grad = value_and_grad(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=objective)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=num_iter)
    return params["w"], params["b"] if bias else jnp.zeros(())


def max_margin(x, y, *, bias: bool = False):
    r"""Hard-margin SVM direction: max_{‖w‖=1} min_μ y^μ(w·x^μ + b).

    Solved as the hinge loss with vanishing ridge (``erm(loss="hinge",
    ridge=0)``); with ``bias=True`` liblinear's small penalty on the
    intercept makes the margin slightly suboptimal. Raises a ValueError if
    the data are not linearly separable (then the maximum margin is not
    defined; use ``erm`` for the hinge minimiser).

    Example:
      >>> import jax.numpy as jnp
      >>> from flatjax.theory import max_margin
      >>> x = jnp.array([[1.0, 5.0], [-1.0, 3.0], [2.0, -4.0], [-3.0, 1.0]])
      >>> w, b = max_margin(x, jnp.array([1.0, -1.0, 1.0, -1.0]))
      >>> round(float(w[1] / w[0]), 3)
      0.0
    """
    w, b = erm(x, y, loss="hinge", ridge=0.0, bias=bias)
    if float(training_error(w, b, jnp.asarray(x), jnp.asarray(y))) > 0:
        raise ValueError("the data are not linearly separable: the max-margin classifier "
                         "does not exist.")
    return w, b


def train_validation_split(key: jax.Array, num_points: int, validation_fraction: float = 0.25):
    """Random split of range(num_points) into fit and validation indices.

    The validation part holds max(1, round(fraction · num_points)) indices.

    Returns:
      ``(fit, validation)``: numpy int arrays, disjoint, covering range(num_points).

    Example:
      >>> import jax
      >>> from flatjax.theory import train_validation_split
      >>> fit, val = train_validation_split(jax.random.key(0), 8)
      >>> len(fit), len(val), sorted([*fit, *val]) == list(range(8))
      (6, 2, True)
    """
    num_points = _check_count("num_points", num_points)
    if not isinstance(validation_fraction, numbers.Real) or not 0 < validation_fraction < 1:
        raise ValueError(
            f"validation_fraction must be in (0, 1), got {validation_fraction!r}."
        )
    perm = np.asarray(jax.random.permutation(key, num_points))
    n_val = max(1, round(validation_fraction * num_points))
    if n_val >= num_points:
        raise ValueError(f"cannot hold out {n_val} of {num_points} points for validation.")
    return perm[n_val:], perm[:n_val]


def select_ridge(
    key: jax.Array,
    x,
    y,
    *,
    loss: str,
    ridges,
    bias: bool = False,
    validation_fraction: float = 0.25,
):
    r"""Chooses λ by the error on a held-out split of the training data, then refits.

    The training data are split at random (``train_validation_split(key, P,
    validation_fraction)``) into a fit part and a validation part; each λ of ``ridges`` is fitted
    on the first and scored by its error on the second; the λ of least
    validation error (the first in ``ridges`` order on ties) is refitted on
    all the data. The exact test error is never looked at.

    Returns:
      ``(w, b, ridge)``.

    Example:
      >>> import jax
      >>> from flatjax.theory import gaussian_mixture, select_ridge
      >>> d = gaussian_mixture(jax.random.key(0), dim=20, alpha=2.0)
      >>> w, b, lam = select_ridge(jax.random.key(1), d.x, d.y, loss="square",
      ...                          ridges=[0.1, 1.0])
      >>> lam in (0.1, 1.0)
      True
    """
    x, y = _check_data(x, y)
    ridges = list(ridges)
    if not ridges:
        raise ValueError("ridges must hold at least one value.")
    fit, val = train_validation_split(key, x.shape[0], validation_fraction)
    scores = []
    for lam in ridges:
        w, b = erm(x[fit], y[fit], loss=loss, ridge=lam, bias=bias)
        scores.append(float(training_error(w, b, x[val], y[val])))
    best = ridges[int(np.argmin(scores))]
    w, b = erm(x, y, loss=loss, ridge=best, bias=bias)
    return w, b, best


# ----------------------------------------------------------------------------
# Flatness.


def classifier_local_energy(
    w,
    b,
    x,
    y,
    sigmas,
    *,
    energy: str = "error",
    noise: str = "multiplicative",
    num_nodes: int = 40,
):
    r"""Local energy of a linear classifier under Gaussian weight noise, exactly.

    .. math::

      δE(σ) = E_z\big[E(w ⊙ (1 + σ z_w),\ b (1 + σ z_b))\big] − E(w, b),
      \qquad z \sim N(0, I)

    (additive noise: w + σ z_w, b + σ z_b), with E the training error
    (``energy="error"``, a fraction in [0, 1]) or the mean of a margin loss
    (``"square"``, ``"logistic"``, ``"hinge"``); every parameter, the bias
    included, is perturbed. For a linear model the perturbed margin of point
    μ is Gaussian, y^μ(w·x^μ + b) + σ s_μ g with s_μ² = Σ_i w_i² (x_i^μ)² + b²
    (multiplicative) or ‖x^μ‖² + 1 (additive), so no sampling is needed:

    .. math::

      E_z[\text{error}] = \frac1P \sum_μ H\Big(\frac{y^μ(w·x^μ + b)}{σ s_μ}\Big),

    and a loss is averaged over g by Gauss–Hermite quadrature with
    ``num_nodes`` nodes. Multiplicative noise leaves δE of the error
    invariant to positive rescalings of (w, b). This is the paper's local
    energy with the expectation done in closed form.

    Args:
      w, b: the classifier.
      x, y: training data [P, N], labels ±1 [P].
      sigmas: noise levels σ >= 0, a sequence.
      energy: ``"error"`` or a key of ``LOSSES``.
      noise: ``"multiplicative"`` or ``"additive"``.
      num_nodes: Gauss–Hermite nodes for the losses.

    Returns:
      δE at each σ, float32 [len(sigmas)].

    Example:
      >>> import jax.numpy as jnp
      >>> from flatjax.theory import classifier_local_energy
      >>> x = jnp.array([[1.0, 0.0]]); y = jnp.array([1.0])
      >>> # margin 1, s = σ·1: δE = H(1/σ) − 0
      >>> [round(float(e), 4) for e in classifier_local_energy(jnp.array([1.0, 5.0]), 0.0,
      ...                                                      x, y, [0.0, 1.0])]
      [0.0, 0.1587]
    """
    if energy != "error" and energy not in LOSSES:
        raise ValueError(f"energy must be 'error' or one of {sorted(LOSSES)}, got {energy!r}.")
    if noise not in ("multiplicative", "additive"):
        raise ValueError(f"noise must be 'multiplicative' or 'additive', got {noise!r}.")
    num_nodes = _check_count("num_nodes", num_nodes)
    sigmas = np.asarray(sigmas, np.float64)
    if sigmas.ndim != 1 or np.any(sigmas < 0) or not np.all(np.isfinite(sigmas)):
        raise ValueError(f"sigmas must be a 1-d sequence of numbers >= 0, got {sigmas}.")
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    w, b = jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)
    margins = y * (x @ w + b)
    if noise == "multiplicative":
        scale = jnp.sqrt(jnp.square(x) @ jnp.square(w) + jnp.square(b))
    else:
        scale = jnp.sqrt(jnp.sum(jnp.square(x), axis=1) + 1.0)
    nodes, weights = np.polynomial.hermite_e.hermegauss(num_nodes)
    weights = jnp.asarray(weights / weights.sum(), jnp.float32)
    nodes = jnp.asarray(nodes, jnp.float32)

    def mean_energy(sigma):
        if energy == "error":
            # sigma = 0: H(±inf) is the unperturbed error (a zero margin is an error).
            noisy = gaussian_tail(margins / (sigma * scale))
            return jnp.mean(jnp.where(sigma > 0, noisy, margins <= 0))
        loss = LOSSES[energy]
        noisy = loss(margins[:, None] + sigma * scale[:, None] * nodes) @ weights
        return jnp.mean(noisy)

    base = mean_energy(jnp.float32(0.0))
    return jnp.stack([mean_energy(jnp.float32(s)) - base for s in sigmas])


# ----------------------------------------------------------------------------
# Flatness-maximising estimators (flatjax's optimizers on the linear model).


_ENERGIES = ("error", *LOSSES)


def _energy_fn(loss: str, temperature, bias: bool):
    """(params, x, y) -> training energy of the linear model (mean over the batch)."""
    if loss not in _ENERGIES:
        raise ValueError(f"loss must be 'error' or one of {sorted(LOSSES)}, got {loss!r}.")
    if isinstance(temperature, numbers.Real) and not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}.")

    def energy(params, x, y):
        p = params if bias else {"w": params["w"], "b": jnp.zeros(())}
        if loss == "error":
            return smoothed_error(p, x, y, temperature)
        return margin_loss(p, x, y, loss)

    return energy


def _init_params(key, dim: int, bias: bool):
    """w ~ N(0, I/N) (norm ≈ 1, the scale at which the margins are O(1)); b = 0."""
    params = {"w": jax.random.normal(key, (dim,)) / math.sqrt(dim)}
    if bias:
        params["b"] = jnp.zeros(())
    return params


def _check_fit_args(x, y, num_steps, batch_size, num_points):
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"expected x [P, N] and y [P], got {x.shape} and {y.shape}.")
    num_steps = _check_count("num_steps", num_steps)
    batch_size = _check_count("batch_size", batch_size)
    if num_points is None:
        num_points = x.shape[0]
    elif isinstance(num_points, numbers.Integral) and not 1 <= num_points <= x.shape[0]:
        raise ValueError(f"num_points must be in [1, {x.shape[0]}], got {num_points!r}.")
    return x, y, num_steps, batch_size, num_points


def replicated_sgd_fit(
    key: jax.Array,
    x,
    y,
    *,
    loss: str = "logistic",
    temperature: float = 1.0,
    bias: bool = False,
    num_replicas: int = 5,
    num_steps: int = 400,
    batch_size: int = 64,
    learning_rate: float = 0.1,
    coupling: float = 0.01,
    coupling_factor: float = 1e3,
    num_points=None,
):
    r"""Linear classifier trained by Replicated-SGD; returns the centre.

    y = ``num_replicas`` replicas wᵃ, each drawn as N(0, I/N), run SGD on
    their own minibatches (``batch_size`` points drawn with replacement) of
    the energy E plus the elastic term (γ_t/2)‖wᵃ − c‖², c the replicas'
    mean, through ``flatjax.replicate`` (exact proximal coupling step) with
    γ_t = ``coupling`` · ``coupling_factor``^{t/T} (``flatjax.exponential_coupling``,
    T = ``num_steps``). E is ``margin_loss(loss)`` (no ridge) or, with
    ``loss="error"``, the smoothed error-counting loss ``smoothed_error`` at
    temperature τ = ``temperature``, which is norm-free.

    Cost: ``num_steps`` × y minibatch gradients.

    Args:
      key: ``jax.random`` key (initialisation and minibatches).
      x, y: training data [P, N], labels ±1 [P].
      loss: ``"error"`` or a key of ``LOSSES``.
      temperature: τ > 0 of the smoothed error (ignored for other losses).
      bias: fit b (it is part of every replica and of the centre).
      num_replicas: y >= 1.
      num_steps: T, SGD steps of every replica.
      batch_size: minibatch size of every replica.
      learning_rate: SGD learning rate η.
      coupling: γ_0 > 0.
      coupling_factor: total growth of γ over the run (>= 1).
      num_points: train on the first ``num_points`` rows of x, y only (an int,
        or a traced integer, default all): problems of different sizes padded
        to one shape can then share one compiled, vmapped call.

    Returns:
      ``(w, b)`` of the centre (b = 0 without ``bias``).

    Example:
      >>> import jax
      >>> from flatjax.theory import gaussian_mixture, replicated_sgd_fit
      >>> d = gaussian_mixture(jax.random.key(0), dim=20, alpha=2.0)
      >>> w, b = replicated_sgd_fit(jax.random.key(1), d.x, d.y, num_steps=20)
      >>> w.shape, float(b)
      ((20,), 0.0)

    References:
      Pittorino et al., ICLR 2021, arXiv:2006.07897; Baldassi et al., PNAS
      2020, arXiv:1905.07833.
    """
    import flatjax  # the package imports this module's siblings; import it lazily

    x, y, num_steps, batch_size, num_points = _check_fit_args(
        x, y, num_steps, batch_size, num_points
    )
    energy = _energy_fn(loss, temperature, bias)
    # The optimizer checks its schedule at step 0 eagerly; keep that check
    # concrete when this function is traced (jit, vmap over seeds).
    with jax.ensure_compile_time_eval():
        gamma = flatjax.exponential_coupling(coupling, num_steps, factor=coupling_factor)
        opt = flatjax.replicate(
            optax.sgd(learning_rate), num_replicas, gamma, learning_rate=learning_rate
        )
    k_init, k_steps = jax.random.split(key)
    params = jax.vmap(lambda k: _init_params(k, x.shape[1], bias))(
        jax.random.split(k_init, num_replicas)
    )
    grad = jax.vmap(jax.grad(energy))

    def step(carry, k):
        params, state = carry
        idx = jax.random.randint(k, (num_replicas, batch_size), 0, num_points)
        updates, state = opt.update(grad(params, x[idx], y[idx]), state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(
        step, (params, opt.init(params)), jax.random.split(k_steps, num_steps)
    )
    center = flatjax.replica_center(params)
    return center["w"], center.get("b", jnp.zeros(()))


def entropy_sgd_fit(
    key: jax.Array,
    x,
    y,
    *,
    loss: str = "logistic",
    temperature: float = 1.0,
    bias: bool = False,
    inner_steps: int = 5,
    num_steps: int = 400,
    batch_size: int = 64,
    learning_rate: float = 1.0,
    inner_learning_rate: float = 0.1,
    coupling: float = 0.01,
    coupling_factor: float = 1e3,
    noise: float = 1e-4,
    num_points=None,
):
    r"""Linear classifier trained by Entropy-SGD; returns the anchor.

    ``flatjax.entropy_sgd`` in scan mode: each of the T = ``num_steps`` outer
    steps runs L = ``inner_steps`` Langevin steps on fresh minibatches
    (``batch_size`` points drawn with replacement) of the energy E, pulled
    towards the anchor x with γ_t = ``coupling`` · ``coupling_factor``^{t/T},
    then moves x by SGD (Nesterov 0.9, lr η) along γ_t (x − μ). No weight
    decay anywhere (no ridge); E as in ``replicated_sgd_fit``.

    Cost: ``num_steps`` × L minibatch gradients (the same as
    ``replicated_sgd_fit`` with y = L replicas and as many steps).

    Args:
      key: ``jax.random`` key (initialisation and minibatches).
      x, y: training data [P, N], labels ±1 [P].
      loss: ``"error"`` or a key of ``LOSSES``.
      temperature: τ > 0 of the smoothed error.
      bias: fit b.
      inner_steps: L >= 1.
      num_steps: outer steps T.
      batch_size: minibatch size of every Langevin step.
      learning_rate: outer learning rate η.
      inner_learning_rate: Langevin step η′.
      coupling: γ_0 > 0.
      coupling_factor: total growth of γ over the run (>= 1).
      noise: Langevin noise ε (the noise key is flatjax's default seed 0).
      num_points: train on the first ``num_points`` rows of x, y only (an int,
        or a traced integer, default all): problems of different sizes padded
        to one shape can then share one compiled, vmapped call.

    Returns:
      ``(w, b)`` of the anchor (b = 0 without ``bias``).

    Example:
      >>> import jax
      >>> from flatjax.theory import entropy_sgd_fit, gaussian_mixture
      >>> d = gaussian_mixture(jax.random.key(0), dim=20, alpha=2.0)
      >>> w, b = entropy_sgd_fit(jax.random.key(1), d.x, d.y, num_steps=5)
      >>> w.shape
      (20,)

    References:
      Chaudhari et al., ICLR 2017, arXiv:1611.01838; Pittorino et al.,
      ICLR 2021, arXiv:2006.07897.
    """
    import flatjax

    x, y, num_steps, batch_size, num_points = _check_fit_args(
        x, y, num_steps, batch_size, num_points
    )
    inner_steps = _check_count("inner_steps", inner_steps)
    energy = _energy_fn(loss, temperature, bias)
    with jax.ensure_compile_time_eval():
        gamma = flatjax.exponential_coupling(coupling, num_steps, factor=coupling_factor)
        opt = flatjax.entropy_sgd(
            learning_rate,
            inner_steps,
            gamma,
            inner_learning_rate=inner_learning_rate,
            noise=noise,
            inner_weight_decay=0.0,
        )
    k_init, k_steps = jax.random.split(key)
    params = _init_params(k_init, x.shape[1], bias)
    grad = jax.grad(energy)

    def step(carry, k):
        params, state = carry
        idx = jax.random.randint(k, (inner_steps, batch_size), 0, num_points)
        xb, yb = x[idx], y[idx]
        updates, state = opt.update(
            None, state, params, grad_fn=lambda p, i: grad(p, xb[i], yb[i])
        )
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(
        step, (params, opt.init(params)), jax.random.split(k_steps, num_steps)
    )
    return params["w"], params.get("b", jnp.zeros(()))


# ----------------------------------------------------------------------------
# Fixed-norm square loss (Baldassi, Malatesta, Negri, Zecchina, J. Stat. Mech.
# 2020, arXiv 2010.14761): the weight norm R is a control parameter.


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
    exactly; projected gradient descent (step 1/‖2XᵀX/P‖) runs on (w̃, t_a).
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
        centre = centre - lr * q * g.sum(0) / num_replicas
        centre *= radius / np.linalg.norm(centre)
        if s > 0:
            t = orth(t - lr * s * radius * g / radius**2, centre)
    b = ym - float(xm @ centre) if bias else 0.0
    return jnp.asarray(centre, jnp.float32), jnp.asarray(b, jnp.float32)
