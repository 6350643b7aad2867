r"""Empirical risk minimisers of a linear classifier, with and without ridge.

ℓ(m) of the margin m = y(w·x + b): square ½(1 − m)², logistic
log(1 + e^{−m}), hinge max(0, 1 − m); the ridge λ/2 ‖w‖² never penalises b.

References:
  Mignacco, Krzakala, Lu, Urbani, Zdeborová, The role of regularization in
  classification of high-dimensional noisy Gaussian mixture, ICML 2020,
  arXiv:2002.11544.
"""

from __future__ import annotations

import numbers
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flatjax.theory._mixture import _check_count, _check_data, gaussian_tail, training_error

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


def fit_bias(w, x, y):
    r"""The bias of a fixed direction, fitted apart: two-Gaussian (LDA) threshold on w·x.

    With u^μ = w·x^μ/‖w‖, class means μ_±, pooled within-class variance s²
    and the empirical fraction ρ̂ of labels +1, the rule sign(u − t) with

    .. math::

      t = \frac{μ_+ + μ_-}{2} − \frac{s² \log(ρ̂/(1 − ρ̂))}{μ_+ − μ_-}

    is the Bayes rule for two Gaussians of one variance; the bias returned is
    b = −t‖w‖, so that sign(w·x + b) = sign(u − t). For w ∝ v on the mixture
    (μ_± → ±1, s² → Δ) it tends to ``bayes_optimal_bias(1, Δ, ρ)``.

    Args:
      w: direction [N] (nonzero).
      x, y: data [P, N], labels ±1 [P] holding both classes, two points at least.

    Returns:
      b as a float32 jax scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> from flatjax.theory import fit_bias
      >>> x = jnp.array([[3.0], [1.0], [-1.0], [-3.0], [-2.0], [0.0]])
      >>> y = jnp.array([1.0, 1.0, -1.0, -1.0, -1.0, -1.0])
      >>> # μ± = 2, −1.5; s² = 1.75; ρ̂ = 1/3: t = 0.25 + 1.75 log 2 / 3.5, b = −2t
      >>> round(float(fit_bias(jnp.array([2.0]), x, y)), 4)
      -1.1931
    """
    x, y = _check_data(x, y)
    w = np.asarray(w, np.float64)
    if w.shape != (x.shape[1],) or not np.linalg.norm(w) > 0:
        raise ValueError(f"w must be a nonzero vector of shape ({x.shape[1]},), got {w.shape}.")
    pos, neg = y > 0, y < 0
    if pos.sum() < 1 or neg.sum() < 1 or x.shape[0] < 3:
        raise ValueError("fit_bias needs both classes and three points at least.")
    norm = float(np.linalg.norm(w))
    u = x.astype(np.float64) @ w / norm
    m_pos, m_neg = u[pos].mean(), u[neg].mean()
    var = (np.sum((u[pos] - m_pos) ** 2) + np.sum((u[neg] - m_neg) ** 2)) / (x.shape[0] - 2)
    gap = m_pos - m_neg
    if not gap > 0:  # w points against the classes: threshold at the midpoint
        gap = np.inf
    rho = pos.mean()
    t = 0.5 * (m_pos + m_neg) - var * np.log(rho / (1 - rho)) / gap
    return jnp.asarray(-t * norm, jnp.float32)


def held_out_bias(w, x, y, fit, validation, fit_direction):
    r"""The bias of w measured on held-out data: ``fit_bias`` of a refit on the other part.

    The direction is refitted on the fit part only, w' = ``fit_direction(x[fit], y[fit])``,
    its two-Gaussian threshold b' = ``fit_bias(w', x[validation], y[validation])`` is
    measured on points w' has not seen, and carried over to w at the same normalised
    threshold:

    .. math::

      b = b' \, ‖w‖ / ‖w'‖.

    The threshold of a direction fitted on all the data, measured on the same data,
    is biased towards the training set's own margins; this estimate is not.

    Args:
      w: the direction fitted on all the data [N] (nonzero).
      x, y: data [P, N], labels ±1 [P].
      fit, validation: disjoint index arrays (``train_validation_split``).
      fit_direction: ``(x, y) -> w'``, the estimator that gave w.

    Returns:
      b as a float.

    Example:
      >>> import jax
      >>> from flatjax import theory
      >>> d = theory.gaussian_mixture(jax.random.key(0), dim=50, alpha=4.0, rho=0.25)
      >>> fit, val = theory.train_validation_split(jax.random.key(1), d.x.shape[0])
      >>> w = theory.hebbian(d.x, d.y)
      >>> b = theory.held_out_bias(w, d.x, d.y, fit, val, theory.hebbian)
      >>> b < 0  # the threshold leans to the majority class y = -1
      True
    """
    w_fit = np.asarray(fit_direction(x[fit], y[fit]), np.float64)
    b_val = float(fit_bias(w_fit, x[validation], y[validation]))
    return b_val * float(np.linalg.norm(w)) / float(np.linalg.norm(w_fit))
