"""Local entropy F(w̃; γ) by thermodynamic integration over the coupling γ.

The quantity Entropy-SGD and Replicated-SGD maximise (Chaudhari et al. 2017,
arXiv 1611.01838; Baldassi et al. 2020, PNAS 117(1):161), estimated with
Langevin chains on a ladder of couplings.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from flatjax.flatness._checks import (
    _check_choice,
    _check_positive_float,
    _check_positive_int,
)
from flatjax.flatness._data import _flat_loss, _loss_parts
from flatjax.flatness._hessian import hessian_top_eigenvalue

__all__ = ["LocalEntropy", "local_entropy"]


class LocalEntropy(NamedTuple):
    r"""Thermodynamic-integration estimate of the local entropy F(w̃; γ).

    Attributes:
      value: F(w̃; γ) = log ∫ dw exp(−L(w) − (γ/2)‖w − w̃‖²), un-normalised.
      normalized: F + (d/2) log(γ/2π) = log E_{w∼N(w̃, I/γ)}[e^{−L(w)}], the
        log of the average of e^{−L} over a Gaussian around w̃ (0 for a zero
        loss, → −L(w̃) as γ → ∞). Same error as ``value``.
      stderr: statistical standard error (chains and anchor samples); the
        quadrature error of the γ ladder is not included.
      couplings: the γ ladder, increasing, ``[K]``; ``couplings[0]`` is γ.
      mean_sq_distance: ⟨‖w − w̃‖²⟩_γ on each rung, ``[K]``.
      mean_sq_distance_stderr: its standard error over chains, ``[K]``.
      acceptance: mean Metropolis acceptance rate per rung (1 for ULA), ``[K]``.
      anchor: estimate of the normalised F at the top rung γ_max.
    """

    value: jnp.ndarray
    normalized: jnp.ndarray
    stderr: jnp.ndarray
    couplings: jnp.ndarray
    mean_sq_distance: jnp.ndarray
    mean_sq_distance_stderr: jnp.ndarray
    acceptance: jnp.ndarray
    anchor: jnp.ndarray


def local_entropy(
    loss_fn: Callable[[Any], jnp.ndarray],
    params: Any,
    coupling: float,
    *,
    key: jax.Array,
    gamma_max: float | None = None,
    num_rungs: int = 16,
    num_chains: int = 16,
    num_steps: int = 1000,
    burn_in: int | None = None,
    sampler: str = "mala",
    step_fraction: float | None = None,
    curvature: float | None = None,
    num_anchor_samples: int = 1000,
) -> LocalEntropy:
    r"""Local entropy of a point w̃ by thermodynamic integration over γ.

    .. math::
      F(w̃; γ) = \log \int dw\, e^{−L(w) − \frac{γ}{2}\|w − w̃\|^2},
      \qquad \frac{∂F}{∂γ} = −\tfrac12 ⟨\|w − w̃\|^2⟩_γ,

    with ⟨·⟩_γ the Gibbs measure P(w|w̃) ∝ exp(−L(w) − (γ/2)‖w − w̃‖²)
    (the definition above). Working with the normalised G(γ) = F + (d/2) log(γ/2π)
    = log E_{N(w̃, I/γ)}[e^{−L}], whose derivative vanishes as γ → ∞,

    .. math::
      G(γ) = G(γ_{\max}) − \tfrac12 \int_{\log γ}^{\log γ_{\max}}
             \big(d − γ'⟨\|w − w̃\|^2⟩_{γ'}\big)\, d\log γ'.

    - The integral runs over a ladder of K = ``num_rungs`` couplings,
      log-spaced from γ = ``coupling`` to ``gamma_max``, by the trapezoid rule
      in log γ. On each rung ``num_chains`` independent Langevin chains
      (vmapped) sample P(w|w̃) for ``num_steps`` steps, the first ``burn_in``
      discarded; ⟨‖w − w̃‖²⟩ is the average over the rest.
    - Anchor: at γ_max the Gaussian N(w̃, I/γ_max) is so narrow that L varies
      little over it, and G(γ_max) = log mean_j e^{−L(w̃ + z_j/√γ_max)} over
      ``num_anchor_samples`` draws is accurate (Laplace limit: G ≈ −L(w̃) +
      (‖∇L‖² − tr ∇²L)/(2γ_max)).
    - Sampler: ``"mala"`` (default), Metropolis-adjusted Langevin, exact for
      the target; its step size starts at η = ``step_fraction``/(γ + λ) with λ
      = ``curvature`` and adapts during burn-in towards 57% acceptance, then
      stays fixed. ``"ula"``, the unadjusted Langevin (SGLD with the full loss)
      w ← w − η∇U(w) + √(2η) ξ with η = ``step_fraction``/(γ + λ) fixed, has
      a discretisation bias: for a Gaussian target of precision A it samples
      covariance (A − ηA²/2)⁻¹, inflating ⟨‖w − w̃‖²⟩ by O(η) and F with it.
    - Error: ``stderr`` combines the chain-to-chain standard errors of the
      rung averages (propagated through the trapezoid weights) and the
      anchor's delta-method error; it assumes burn-in reached equilibrium and
      leaves out the quadrature error (raise ``num_rungs`` to check it).

    Cost: ``num_rungs × num_chains × num_steps`` gradient evaluations plus
    ``num_anchor_samples`` losses, all in one jitted call (rungs run one after
    the other, chains vmapped).

    The Gibbs measure is exp(−L) at temperature 1 with L = ``loss_fn``: for a
    network, pass the loss at the scale you mean (e.g. n × mean cross-entropy,
    or β·L). The sampler works on the flattened parameter vector (d entries).

    Args:
      loss_fn: ``loss_fn(params) -> scalar`` L, full-batch or on fixed data
        (e.g. from :func:`dataset_loss`), differentiable.
      params: the point w̃.
      coupling: γ > 0.
      key: a ``jax.random`` key.
      gamma_max: top of the ladder (> γ). Default: max(100γ, 100‖∇L(w̃)‖²,
        10√d λ), so that L varies by ≲ 0.1 over N(w̃, I/γ_max).
      num_rungs: K ≥ 2 couplings in the ladder.
      num_chains: chains per rung (≥ 2, for the error estimate).
      num_steps: Langevin steps per chain, burn-in included.
      burn_in: steps discarded; default ``num_steps // 2``.
      sampler: ``"mala"`` or ``"ula"``.
      step_fraction: η·(γ + λ), in (0, 2); default 0.5 for MALA (the
        starting point of the adaptation) and 0.01 for ULA (small, to keep
        its O(η) bias down: on a quadratic ULA overestimates F by up to
        step_fraction·d/4 nats per unit of log γ on the ladder).
      curvature: λ, the scale of ∇²L (its top eigenvalue); default
        the absolute value of :func:`hessian_top_eigenvalue` at w̃ (50 iterations).
      num_anchor_samples: Gaussian draws for the anchor at γ_max (≥ 2).

    Returns:
      :class:`LocalEntropy`; ``value`` is F, ``normalized`` is F + (d/2)
      log(γ/2π).

    Example:
      >>> import flatjax
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda w: 0.5 * jnp.sum(w**2)  # F = log(2π/(1+γ)) for d = 2
      >>> res = flatjax.local_entropy(loss, jnp.zeros(2), 1.0, key=jax.random.PRNGKey(0),
      ...                             num_rungs=8, num_steps=200)
      >>> abs(float(res.value) - float(jnp.log(jnp.pi))) < 0.1
      True

    References:
      Baldassi et al., "Shaping the learning landscape in neural networks
      around wide flat minima", PNAS 117(1):161, 2020; Chaudhari et al.,
      "Entropy-SGD", arXiv 1611.01838; Roberts & Tweedie, "Exponential
      convergence of Langevin distributions", Bernoulli 2(4), 1996 (MALA).
    """
    coupling = _check_positive_float("coupling", coupling)
    num_rungs = _check_positive_int("num_rungs", num_rungs)
    if num_rungs < 2:
        raise ValueError(f"num_rungs must be >= 2, got {num_rungs}.")
    num_chains = _check_positive_int("num_chains", num_chains)
    if num_chains < 2:
        raise ValueError(f"num_chains must be >= 2 (for the error estimate), got {num_chains}.")
    num_steps = _check_positive_int("num_steps", num_steps)
    burn_in = num_steps // 2 if burn_in is None else burn_in
    if (
        isinstance(burn_in, bool)
        or not isinstance(burn_in, (int, np.integer))
        or not (0 <= burn_in < num_steps)
    ):
        raise ValueError(
            f"burn_in must be an integer in [0, num_steps={num_steps}), got {burn_in!r}."
        )
    _check_choice("sampler", sampler, ("mala", "ula"))
    if step_fraction is None:
        step_fraction = 0.5 if sampler == "mala" else 0.01
    step_fraction = _check_positive_float("step_fraction", step_fraction)
    if step_fraction >= 2:
        raise ValueError(f"step_fraction must be in (0, 2) for a stable step, got {step_fraction}.")
    num_anchor_samples = _check_positive_int("num_anchor_samples", num_anchor_samples)
    if num_anchor_samples < 2:
        raise ValueError(f"num_anchor_samples must be >= 2, got {num_anchor_samples}.")
    if key is None:
        raise ValueError("key is required: pass a jax.random key for the chains.")

    key_eig, key_run = jax.random.split(key)
    if curvature is None:
        eig = hessian_top_eigenvalue(loss_fn, params, key=key_eig, num_iters=50, tol=1e-3)
        curvature = float(jnp.abs(eig.eigenvalue))
    else:
        curvature = float(curvature)
        if not math.isfinite(curvature) or curvature < 0:
            raise ValueError(f"curvature must be a finite number >= 0, got {curvature}.")
    flat, _ = ravel_pytree(params)
    dim = flat.size
    if gamma_max is None:
        grad_sq = float(_grad_sq_jit(*_loss_parts(loss_fn), params))
        gamma_max = max(100.0 * coupling, 100.0 * grad_sq, 10.0 * math.sqrt(dim) * curvature)
    gamma_max = _check_positive_float("gamma_max", gamma_max)
    if gamma_max <= coupling:
        raise ValueError(f"gamma_max must exceed coupling={coupling}, got {gamma_max}.")
    couplings = np.geomspace(coupling, gamma_max, num_rungs)
    fn, loss_args = _loss_parts(loss_fn)
    return _local_entropy_jit(
        fn,
        params,
        loss_args,
        jnp.asarray(couplings, jnp.float32),
        key_run,
        jnp.float32(curvature),
        jnp.float32(step_fraction),
        num_chains=num_chains,
        num_steps=num_steps,
        burn_in=int(burn_in),
        sampler=sampler,
        num_anchor_samples=num_anchor_samples,
    )


def _grad_sq(loss_fn, loss_args, params):
    return jnp.sum(ravel_pytree(jax.grad(loss_fn)(params, *loss_args))[0] ** 2)


_grad_sq_jit = jax.jit(_grad_sq, static_argnums=0)


def _local_entropy(
    loss_fn,
    params,
    loss_args,
    couplings,
    key,
    curvature,
    step_fraction,
    *,
    num_chains,
    num_steps,
    burn_in,
    sampler,
    num_anchor_samples,
):
    f, center, _ = _flat_loss(loss_fn, params, loss_args)
    dim = center.size
    mala = sampler == "mala"
    target_accept = 0.574

    def run_rung(args):
        gamma, rung_key = args
        potential = lambda w: f(w) + 0.5 * gamma * jnp.sum((w - center) ** 2)
        value_and_grad = jax.value_and_grad(potential)
        init_key, chain_key = jax.random.split(rung_key)
        w0 = center + jax.random.normal(init_key, (num_chains, dim)) / jnp.sqrt(gamma + curvature)
        u0, g0 = jax.vmap(value_and_grad)(w0)
        log_eta0 = jnp.log(step_fraction / (gamma + curvature))

        def step(carry, t):
            w, u, g, log_eta, sq_sum, acc_sum = carry
            eta = jnp.exp(log_eta)
            k_noise, k_accept = jax.random.split(jax.random.fold_in(chain_key, t))
            xi = jax.random.normal(k_noise, w.shape)
            prop = w - eta * g + jnp.sqrt(2 * eta) * xi
            u_p, g_p = jax.vmap(value_and_grad)(prop)
            if mala:
                fwd = jnp.sum((prop - w + eta * g) ** 2, axis=1)
                bwd = jnp.sum((w - prop + eta * g_p) ** 2, axis=1)
                log_alpha = u - u_p + (fwd - bwd) / (4 * eta)
                log_alpha = jnp.where(jnp.isfinite(log_alpha), log_alpha, -jnp.inf)
                accept = jnp.log(jax.random.uniform(k_accept, (num_chains,))) < log_alpha
                alpha = jnp.exp(jnp.minimum(log_alpha, 0.0))
                w = jnp.where(accept[:, None], prop, w)
                u = jnp.where(accept, u_p, u)
                g = jnp.where(accept[:, None], g_p, g)
                # Robbins-Monro on log η during burn-in only; frozen afterwards so the
                # sampling phase is a fixed, exact Markov kernel.
                rate = jnp.where(t < burn_in, 1.0 / jnp.sqrt(t + 1.0), 0.0)
                log_eta = log_eta + rate * (jnp.mean(alpha) - target_accept)
            else:
                w, u, g, alpha = prop, u_p, g_p, jnp.ones((num_chains,))
            keep = (t >= burn_in).astype(w.dtype)
            sq_sum = sq_sum + keep * jnp.sum((w - center) ** 2, axis=1)
            acc_sum = acc_sum + keep * jnp.mean(alpha)
            return (w, u, g, log_eta, sq_sum, acc_sum), None

        init = (w0, u0, g0, log_eta0, jnp.zeros((num_chains,)), jnp.zeros(()))
        (_, _, _, _, sq_sum, acc_sum), _ = jax.lax.scan(step, init, jnp.arange(num_steps))
        per_chain = sq_sum / (num_steps - burn_in)
        return (
            jnp.mean(per_chain),
            jnp.std(per_chain, ddof=1) / math.sqrt(num_chains),
            acc_sum / (num_steps - burn_in),
        )

    anchor_key, rungs_key = jax.random.split(key)
    rung_keys = jax.random.split(rungs_key, couplings.shape[0])
    msd, msd_se, acceptance = jax.lax.map(run_rung, (couplings, rung_keys))

    # Anchor: G(γ_max) = log E_{N(w̃, I/γ_max)} e^{−L}, by log-mean-exp.
    gamma_max = couplings[-1]
    z = jax.random.normal(anchor_key, (num_anchor_samples, dim))
    neg_loss = -jax.lax.map(
        f, center + z / jnp.sqrt(gamma_max), batch_size=min(64, num_anchor_samples)
    )
    anchor = jax.nn.logsumexp(neg_loss) - math.log(num_anchor_samples)
    ratio = jnp.exp(neg_loss - jnp.max(neg_loss))
    anchor_se = jnp.std(ratio, ddof=1) / (jnp.mean(ratio) * math.sqrt(num_anchor_samples))

    # G(γ) = G(γ_max) − ½ ∫ (d − γ'⟨‖Δ‖²⟩) d log γ', trapezoid on the ladder.
    log_g = jnp.log(couplings)
    widths = jnp.diff(log_g)
    weights = jnp.zeros_like(log_g).at[:-1].add(widths / 2).at[1:].add(widths / 2)
    integrand = 0.5 * (dim - couplings * msd)
    normalized = anchor - jnp.sum(weights * integrand)
    stderr = jnp.sqrt(jnp.sum((weights * 0.5 * couplings * msd_se) ** 2) + anchor_se**2)
    value = normalized - 0.5 * dim * jnp.log(couplings[0] / (2 * jnp.pi))
    return LocalEntropy(value, normalized, stderr, couplings, msd, msd_se, acceptance, anchor)


_local_entropy_jit = jax.jit(
    _local_entropy,
    static_argnames=(
        "loss_fn",
        "num_chains",
        "num_steps",
        "burn_in",
        "sampler",
        "num_anchor_samples",
    ),
)
