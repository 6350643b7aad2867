r"""Local energy of a linear classifier under Gaussian weight noise, in closed form."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from flatjax.theory._erm import LOSSES
from flatjax.theory._mixture import _check_count, gaussian_tail


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

    (additive noise: w + σ z_w, b + σ z_b; relative noise: w + σ (‖w‖/√N) z_w
    with b unperturbed), with E the training error
    (``energy="error"``, a fraction in [0, 1]) or the mean of a margin loss
    (``"square"``, ``"logistic"``, ``"hinge"``); every parameter, the bias
    included, is perturbed (but for relative noise). For a linear model the
    perturbed margin of point μ is Gaussian, y^μ(w·x^μ + b) + σ s_μ g with
    s_μ² = Σ_i w_i² (x_i^μ)² + b² (multiplicative), ‖x^μ‖² + 1 (additive) or
    ‖w‖² ‖x^μ‖² / N (relative), so no sampling is needed:

    .. math::

      E_z[\text{error}] = \frac1P \sum_μ H\Big(\frac{y^μ(w·x^μ + b)}{σ s_μ}\Big),

    and a loss is averaged over g by Gauss–Hermite quadrature with
    ``num_nodes`` nodes. Multiplicative and relative noise leave δE of the
    error invariant to positive rescalings of (w, b); relative noise moves the
    direction of w by an angle ≈ σ whatever the coordinates of w. This is the paper's local
    energy with the expectation done in closed form.

    Args:
      w, b: the classifier.
      x, y: training data [P, N], labels ±1 [P].
      sigmas: noise levels σ >= 0, a sequence.
      energy: ``"error"`` or a key of ``LOSSES``.
      noise: ``"multiplicative"``, ``"additive"`` or ``"relative"``.
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
    if noise not in ("multiplicative", "additive", "relative"):
        raise ValueError(
            f"noise must be 'multiplicative', 'additive' or 'relative', got {noise!r}."
        )
    num_nodes = _check_count("num_nodes", num_nodes)
    sigmas = np.asarray(sigmas, np.float64)
    if sigmas.ndim != 1 or np.any(sigmas < 0) or not np.all(np.isfinite(sigmas)):
        raise ValueError(f"sigmas must be a 1-d sequence of numbers >= 0, got {sigmas}.")
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    w, b = jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)
    margins = y * (x @ w + b)
    if noise == "multiplicative":
        scale = jnp.sqrt(jnp.square(x) @ jnp.square(w) + jnp.square(b))
    elif noise == "relative":
        scale = jnp.linalg.norm(w) * jnp.linalg.norm(x, axis=1) / np.sqrt(x.shape[1])
    else:
        scale = jnp.sqrt(jnp.sum(jnp.square(x), axis=1) + 1.0)
    nodes, weights = np.polynomial.hermite_e.hermegauss(num_nodes)
    weights = jnp.asarray(weights / weights.sum(), jnp.float32)
    nodes = jnp.asarray(nodes, jnp.float32)

    def mean_energy(sigma):  # sigma [S] -> mean energy [S]
        sigma = sigma[:, None]
        if energy == "error":
            # sigma = 0: H(±inf) is the unperturbed error (a zero margin is an error).
            noisy = gaussian_tail(margins / (jnp.where(sigma > 0, sigma, 1.0) * scale))
            return jnp.mean(jnp.where(sigma > 0, noisy, margins <= 0), axis=1)
        loss = LOSSES[energy]
        noisy = loss(margins[:, None] + (sigma * scale)[..., None] * nodes) @ weights
        return jnp.mean(noisy, axis=1)

    base = mean_energy(jnp.zeros(1, jnp.float32))
    return mean_energy(jnp.asarray(sigmas, jnp.float32)) - base
