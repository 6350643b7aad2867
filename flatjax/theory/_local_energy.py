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
