r"""Flatness-maximising estimators: flatjax's optimizers on the linear classifier.

References:
  Pittorino et al., ICLR 2021, arXiv:2006.07897; Baldassi et al., PNAS 2020,
  arXiv:1905.07833; Chaudhari et al., ICLR 2017, arXiv:1611.01838.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import optax

from flatjax._esgd import entropy_sgd
from flatjax._rsgd import replica_center, replicate
from flatjax._schedules import exponential_coupling
from flatjax.theory._erm import LOSSES, margin_loss, smoothed_error
from flatjax.theory._mixture import _check_count

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


def _fit(key, x, y, make_opt, init, update, num_batches, *, num_steps, batch_size, num_points,
         coupling, coupling_factor):
    """Runs ``num_steps`` steps of ``make_opt(γ)`` (γ exponential in t) on the linear model.

    Every step draws ``num_batches`` minibatches of ``batch_size`` rows (with
    replacement) among the first ``num_points``, and calls
    ``update(opt, params, state, x_batch, y_batch)`` -> ``(updates, state)``.
    """
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
    # The optimizers check their schedule at step 0 eagerly; keep that check
    # concrete when this function is traced (jit, vmap over seeds).
    with jax.ensure_compile_time_eval():
        opt = make_opt(exponential_coupling(coupling, num_steps, factor=coupling_factor))
    k_init, k_steps = jax.random.split(key)
    params = init(k_init, x.shape[1])

    def step(carry, k):
        params, state = carry
        idx = jax.random.randint(k, (num_batches, batch_size), 0, num_points)
        updates, state = update(opt, params, state, x[idx], y[idx])
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(
        step, (params, opt.init(params)), jax.random.split(k_steps, num_steps)
    )
    return params


def replicated_sgd_fit(
    key: jax.Array, x, y, *, loss: str = "logistic", temperature: float = 1.0, bias: bool = False,
    num_replicas: int = 5, learning_rate: float = 0.1, num_steps: int = 400, batch_size: int = 64,
    coupling: float = 0.01, coupling_factor: float = 1e3, num_points=None,
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
    energy = _energy_fn(loss, temperature, bias)
    grad = jax.vmap(jax.grad(energy))

    def make_opt(gamma):
        return replicate(optax.sgd(learning_rate), num_replicas, gamma, learning_rate=learning_rate)

    def init(k, dim):
        return jax.vmap(lambda kk: _init_params(kk, dim, bias))(jax.random.split(k, num_replicas))

    def update(opt, params, state, x_batch, y_batch):
        return opt.update(grad(params, x_batch, y_batch), state, params)

    params = _fit(key, x, y, make_opt, init, update, num_replicas, num_steps=num_steps,
                  batch_size=batch_size, num_points=num_points, coupling=coupling,
                  coupling_factor=coupling_factor)
    center = replica_center(params)
    return center["w"], center.get("b", jnp.zeros(()))


def entropy_sgd_fit(
    key: jax.Array, x, y, *, loss: str = "logistic", temperature: float = 1.0, bias: bool = False,
    inner_steps: int = 5, learning_rate: float = 1.0, inner_learning_rate: float = 0.1,
    noise: float = 1e-4, num_steps: int = 400, batch_size: int = 64, coupling: float = 0.01,
    coupling_factor: float = 1e3, num_points=None,
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
      num_points: the first ``num_points`` rows only, as in ``replicated_sgd_fit``.

    Returns:
      ``(w, b)`` of the anchor (b = 0 without ``bias``).

    Example (unbalanced clusters with a bias; the exact test error is below chance, 0.3):
      >>> import jax
      >>> from flatjax import theory
      >>> d = theory.gaussian_mixture(jax.random.key(0), dim=20, alpha=4.0, rho=0.3)
      >>> w, b = theory.entropy_sgd_fit(jax.random.key(1), d.x, d.y, bias=True, num_steps=20)
      >>> bool(theory.generalization_error(w, b, d.v, rho=0.3) < 0.3)
      True

    References:
      Chaudhari et al., ICLR 2017, arXiv:1611.01838; Pittorino et al.,
      ICLR 2021, arXiv:2006.07897.
    """
    inner_steps = _check_count("inner_steps", inner_steps)
    grad = jax.grad(_energy_fn(loss, temperature, bias))

    def make_opt(gamma):
        return entropy_sgd(learning_rate, inner_steps, gamma, noise=noise,
                           inner_learning_rate=inner_learning_rate, inner_weight_decay=0.0)

    def init(k, dim):
        return _init_params(k, dim, bias)

    def update(opt, params, state, x_batch, y_batch):
        return opt.update(None, state, params,
                          grad_fn=lambda p, i: grad(p, x_batch[i], y_batch[i]))

    params = _fit(key, x, y, make_opt, init, update, inner_steps, num_steps=num_steps,
                  batch_size=batch_size, num_points=num_points, coupling=coupling,
                  coupling_factor=coupling_factor)
    return params["w"], params.get("b", jnp.zeros(()))
