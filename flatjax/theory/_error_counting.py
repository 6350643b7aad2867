r"""Flatness of the classifier itself: the error-counting loss at a fixed distance.

A classifier sign(w·x + b) does not depend on ‖w‖, so its flatness is
measured on the unit sphere: the configurations at normalised overlap q with
a centre ŵ (‖ŵ‖ = 1) are w = q ŵ + √(1 − q²) t, t a unit vector ⊥ ŵ, at
distance d = √(2(1 − q)). Two estimators take the centre as the classifier:

* ``fixed_distance_error_fit`` minimises the *local energy at distance d*,
  the mean training error of all the configurations of that shell (t uniform:
  the limit of infinitely many replicas held at overlap q), i.e. it maximises
  the flatness of the error-counting loss at that distance;
* ``fixed_distance_replicated_error`` is the replicated scheme with y replicas
  tᵃ that are optimised with the centre (Baldassi et al. 2020 with the smoothed
  error-counting loss in place of the square loss).

Both share the replicas' bias b; the centre's own bias is b/q, so that the
centre predicts sign(q ŵ·x + b), the replicas' mean field.

References:
  Baldassi, Malatesta, Negri, Zecchina, Wide flat minima and optimal
  generalization in classifying high-dimensional Gaussian mixtures, J. Stat.
  Mech. 2020, arXiv:2010.14761; Baldassi et al., Shaping the learning landscape
  in neural networks around wide flat minima, PNAS 2020, arXiv:1905.07833.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flatjax.theory._mixture import _check_count, _check_data, gaussian_tail


def _check_overlap(overlap, temperature) -> tuple[float, float]:
    if isinstance(overlap, bool) or not isinstance(overlap, numbers.Real) or not 0 < overlap <= 1:
        raise ValueError(f"overlap (q) must be a number in (0, 1], got {overlap!r}.")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not (
        temperature >= 0
    ):
        raise ValueError(f"temperature (τ) must be a number >= 0, got {temperature!r}.")
    if overlap == 1 and temperature == 0:
        raise ValueError("overlap q = 1 with temperature τ = 0 is the bare error count, which "
                         "has no gradient: use q < 1 or τ > 0.")
    return float(overlap), float(temperature)


def _shell_energy(w, b, x, y, q, tau):
    """fixed_distance_local_energy on jax arrays (no checks)."""
    w = w / jnp.linalg.norm(w)
    proj = x @ w
    perp2 = jnp.maximum(jnp.sum(jnp.square(x), axis=1) - jnp.square(proj), 0.0)
    width = jnp.sqrt(tau**2 + (1.0 - q**2) * perp2 / (x.shape[1] - 1))
    return jnp.mean(gaussian_tail(y * (q * proj + b) / width))


def fixed_distance_local_energy(w, b, x, y, overlap: float, *, temperature: float = 0.0):
    r"""Mean training error of the shell of classifiers at overlap q with the centre ŵ.

    .. math::

      E_q(ŵ, b) = \frac1P \sum_μ H\Big(\frac{y^μ (q\, ŵ·x^μ + b)}
                  {\sqrt{τ² + (1 − q²)\, ‖x^μ_⊥‖² / (N − 1)}}\Big),
      \qquad ‖x^μ_⊥‖² = ‖x^μ‖² − (ŵ·x^μ)²,

    the average over t uniform on the unit sphere ⊥ ŵ of the smoothed error
    (``smoothed_error`` at temperature τ; τ = 0 is the error count) of
    w = q ŵ + √(1 − q²) t with bias b. It uses the large-N law
    t·x ~ N(0, ‖x_⊥‖²/(N − 1)) (exact mean and variance). q = 1 gives
    ``smoothed_error`` of (ŵ, b); E_q does not depend on ‖w‖.

    Args:
      w: the centre [N] (normalised inside), b: the replicas' bias.
      x, y: data [P, N], labels ±1 [P].
      overlap: q in (0, 1]; temperature: τ >= 0 (τ > 0 if q = 1).

    Returns:
      E_q as a float32 scalar array in [0, 1].

    Example:
      >>> import jax.numpy as jnp
      >>> from flatjax.theory import fixed_distance_local_energy
      >>> x = jnp.array([[1.0, 0.0, 0.0]]); y = jnp.array([1.0])
      >>> # margin q = 0.6, width √(0.64 · 0 / 2): the whole shell classifies x right
      >>> float(fixed_distance_local_energy(jnp.array([1.0, 0.0, 0.0]), 0.0, x, y, 0.6))
      0.0
    """
    q, tau = _check_overlap(overlap, temperature)
    x, y = _check_data(x, y)
    w = jnp.asarray(w, jnp.float32)
    if w.shape != (x.shape[1],) or not float(jnp.linalg.norm(w)) > 0:
        raise ValueError(f"w must be a nonzero vector of shape ({x.shape[1]},), got {w.shape}.")
    return _shell_energy(w, jnp.float32(b), jnp.asarray(x, jnp.float32),
                         jnp.asarray(y, jnp.float32), q, tau)


def _init_centre(key, init, dim: int):
    if init is None:
        return jax.random.normal(key, (dim,))
    init = jnp.asarray(init, jnp.float32)
    if init.shape != (dim,) or not float(jnp.linalg.norm(init)) > 0:
        raise ValueError(f"init must be a nonzero vector of shape ({dim},), got {init.shape}.")
    return init


def _adam_descent(loss, params, project, num_steps: int, learning_rate: float):
    """Adam with a cosine-decayed step, and a projection after every step; returns params."""
    opt = optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps))
    grad = jax.grad(loss)

    def step(carry, _):
        p, state = carry
        updates, state = opt.update(grad(p), state, p)
        return (project(optax.apply_updates(p, updates)), state), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=num_steps)
    return params


def _unit(w):
    return w / jnp.linalg.norm(w, axis=-1, keepdims=True)


@functools.partial(jax.jit, static_argnums=(6, 7))
def _shell_fit(c, x, y, b0, q, tau, bias, num_steps, learning_rate):
    def loss(p):
        return _shell_energy(p["w"], p["b"] if bias else 0.0, x, y, q, tau)

    def project(p):
        return {"w": _unit(p["w"]), "b": p["b"]}

    p = _adam_descent(loss, {"w": _unit(c), "b": b0}, project, num_steps, learning_rate)
    return p["w"], (p["b"] / q if bias else jnp.zeros(()))


def _check_fit(x, y, overlap, temperature, num_steps, learning_rate):
    q, tau = _check_overlap(overlap, temperature)
    x, y = _check_data(x, y)
    if not np.all(np.isfinite(x)):
        raise ValueError("x holds NaN or infinite values.")
    num_steps = _check_count("num_steps", num_steps)
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, numbers.Real) or not (
        learning_rate > 0
    ):
        raise ValueError(f"learning_rate must be a positive number, got {learning_rate!r}.")
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), q, tau, num_steps


def fixed_distance_error_fit(
    key: jax.Array, x, y, overlap: float, *, temperature: float = 0.0, bias: bool = False,
    num_steps: int = 500, learning_rate: float = 0.02, init=None,
):
    r"""The centre of least local energy of the error count at distance d = √(2(1 − q)).

    Minimises ``fixed_distance_local_energy`` E_q(ŵ, b) over the unit centre ŵ
    (and the replicas' bias b) by Adam (step ``learning_rate``, cosine-decayed
    to 0 over ``num_steps``) with ŵ renormalised after every step, from
    ``init`` or a random direction drawn with ``key``. As q → 0 the width of
    every term grows, H is linear over the margins and, without bias, the
    minimiser is the Hebbian direction; q = 1 (τ > 0) minimises the smoothed
    training error of the centre itself.

    Args:
      key: ``jax.random`` key (the random initial direction).
      x, y: data [P, N], labels ±1 [P].
      overlap: q in (0, 1]; temperature: τ >= 0 (τ > 0 if q = 1).
      bias: fit the bias (otherwise b = 0).
      num_steps, learning_rate: the optimizer's budget and step.
      init: initial centre [N] (any nonzero norm), default random.

    Returns:
      ``(ŵ, b/q)``: the unit centre and its bias, float32 [N] and [].

    Example:
      >>> import jax
      >>> from flatjax import theory
      >>> d = theory.gaussian_mixture(jax.random.key(0), dim=30, alpha=3.0)
      >>> w, b = theory.fixed_distance_error_fit(jax.random.key(1), d.x, d.y, 0.3)
      >>> h = theory.hebbian(d.x, d.y)
      >>> bool(w @ h / jax.numpy.linalg.norm(h) > 0.95)  # far shells: the Hebbian direction
      True
    """
    x, y, q, tau, num_steps = _check_fit(x, y, overlap, temperature, num_steps, learning_rate)
    c = _init_centre(key, init, x.shape[1])
    return _shell_fit(c, x, y, jnp.zeros(()), q, tau, bool(bias), num_steps, float(learning_rate))


@functools.partial(jax.jit, static_argnums=(6, 7))
def _replicated_fit(c, t, x, y, q, tau, bias, num_steps, learning_rate):
    s = jnp.sqrt(jnp.maximum(1.0 - q * q, 0.0))

    def replicas(p):
        centre = _unit(p["c"])
        t = p["t"] - (p["t"] @ centre)[:, None] * centre
        return q * centre + s * _unit(t)

    def loss(p):
        margins = y * (replicas(p) @ x.T + (p["b"] if bias else 0.0))
        return jnp.mean(gaussian_tail(margins / tau))

    def project(p):
        return {"c": _unit(p["c"]), "t": _unit(p["t"]), "b": p["b"]}

    p0 = {"c": _unit(c), "t": _unit(t), "b": jnp.zeros(())}
    p = _adam_descent(loss, p0, project, num_steps, learning_rate)
    return p["c"], (p["b"] / q if bias else jnp.zeros(())), replicas(p)


def fixed_distance_replicated_error(
    key: jax.Array, x, y, overlap: float, *, num_replicas: int = 3, temperature: float = 0.1,
    bias: bool = False, num_steps: int = 500, learning_rate: float = 0.02, init=None,
    return_replicas: bool = False,
):
    r"""Replicated scheme on the smoothed error count: y replicas at exact overlap q.

    The replicas wᵃ = q ŵ + √(1 − q²) tᵃ/‖tᵃ‖, tᵃ projected ⊥ ŵ, ‖ŵ‖ = 1,
    hold the constraint wᵃ·ŵ = q exactly; Σ_a ``smoothed_error``(wᵃ, b) at
    temperature τ > 0 is minimised over the centre ŵ, the tᵃ and the shared
    bias b by Adam as in ``fixed_distance_error_fit``. With y replicas left
    free the minimum puts them all near the best unit classifier, and the
    centre anywhere on the cone of overlap q around it: only the spread of
    the replicas at the start and the finite run select a centre. q = 1 is
    the same problem as ``fixed_distance_error_fit`` at q = 1.

    Args:
      key: ``jax.random`` key (initial centre and replicas).
      x, y: data [P, N], labels ±1 [P].
      overlap: q in (0, 1]; temperature: τ > 0.
      num_replicas: y >= 1.
      bias, num_steps, learning_rate, init: as in ``fixed_distance_error_fit``.
      return_replicas: also return the replicas [y, N].

    Returns:
      ``(ŵ, b/q)`` of the centre (and the replicas when ``return_replicas``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flatjax import theory
      >>> d = theory.gaussian_mixture(jax.random.key(0), dim=30, alpha=3.0)
      >>> w, b, reps = theory.fixed_distance_replicated_error(
      ...     jax.random.key(1), d.x, d.y, 0.7, num_steps=50, return_replicas=True)
      >>> [round(float(r @ w), 4) for r in reps]  # the constraint holds exactly
      [0.7, 0.7, 0.7]
    """
    if not temperature > 0:
        raise ValueError(f"temperature (τ) must be positive, got {temperature!r}.")
    x, y, q, tau, num_steps = _check_fit(x, y, overlap, temperature, num_steps, learning_rate)
    num_replicas = _check_count("num_replicas", num_replicas)
    k_c, k_t = jax.random.split(key)
    c = _init_centre(k_c, init, x.shape[1])
    t = jax.random.normal(k_t, (num_replicas, x.shape[1]))
    w, b, reps = _replicated_fit(c, t, x, y, q, tau, bool(bias), num_steps,
                                 float(learning_rate))
    return (w, b, reps) if return_replicas else (w, b)
