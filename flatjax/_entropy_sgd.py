r"""Entropy-SGD as Optax gradient transformations.

Entropy-SGD climbs the local entropy F(x; γ) = log ∫ dx′ exp(−L(x′) − γ/2 ‖x′ − x‖²)
of the anchor x. Its gradient, γ(⟨x′⟩ − x), is estimated with a short SGLD
chain of L steps (the walker x′) started at x and pulled back towards it.
One outer step, with γ_t the coupling at outer step t:

.. code-block:: text

    x′ ← x ;  μ ← x
    for l = 0 .. L−1:                          # one fresh minibatch per step
        d  ← ∇L_l(x′) + γ_t (x′ − x)            # data gradient + elastic pull
        x′ ← x′ + inner_optimizer(d) + ε √(2η′) ξ,   ξ ~ N(0, I)
        μ  ← α μ + (1 − α) x′                  # α weighs the OLD average
    x ← x + γ_t · outer_optimizer(x − μ)       # γ(x − μ) is the gradient of −F

The default inner optimizer is ``chain(add_decayed_weights(λ′), sgd(η′, β′,
nesterov=True))``; the default outer optimizer is SGD with Nesterov momentum
0.9 (and weight decay λ inside the γ-scaled step, as in the authors' code).
Both are ordinary Optax transforms and can be replaced. These are the rules
of Pittorino et al.'s code; :func:`entropy_sgd` maps its names (and
Chaudhari et al.'s) onto flatjax's.

Two drivers share ONE Langevin-step function and ONE outer-step function, so
they compute the same thing:

* :func:`entropy_sgd` (scan mode): one ``update`` call is one outer step; the
  L inner steps run as a ``jax.lax.scan`` calling ``grad_fn(walker, i)``.
* :func:`entropy_sgd_stepwise`: one ``update`` call is one Langevin step
  (``updates`` = gradient at the walker, ``params`` = walker); every L-th call
  lands the outer step. An unmodified ``TrainState.apply_gradients`` loop runs
  it; :func:`entropy_sgd_eval_params` returns x for evaluation and checkpoints.

Cost: one outer step costs L gradient evaluations; the state's ``count``
counts outer steps, not gradient evaluations.

References:
  Chaudhari et al., Entropy-SGD: biasing gradient descent into wide valleys,
  ICLR 2017, arXiv:1611.01838.
  Pittorino et al., Entropic gradient descent algorithms and wide flat minima,
  ICLR 2021, arXiv:2006.07897.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flatjax import _stability
from flatjax._schedules import checkable, is_traced, value_at_zero

__all__ = [
    "EntropySGDState",
    "entropy_sgd",
    "entropy_sgd_stepwise",
    "scale_by_entropy_sgd",
    "entropy_sgd_eval_params",
    "entropy_sgd_coupling",
    "entropy_sgd_aux",
]

Coupling = float | Callable[[jax.Array], jax.Array]


class EntropySGDState(NamedTuple):
    """State of the Entropy-SGD transforms.

    Attributes:
      count: int32, outer steps done (t); each costs L gradient evaluations.
      inner_count: int32, Langevin steps done in the current outer step
        (stepwise mode; always 0 in scan mode between calls).
      key: PRNG key of the Langevin noise.
      coupling: float32, γ_t applied by the inner steps of the current outer
        step, after ``max_coupling`` and the stability clamp (0 up to the
        calibration step when γ_0 is being calibrated).
      requested_coupling: float32, the schedule's γ_t before the clamp; larger
        than ``coupling`` exactly when the clamp engaged.
      coupling_scale: float32, c in γ_t = c · coupling(t): 1, or γ_0 / coupling(0)
        once γ_0 has been calibrated.
      loss: float32, the loss of the latest inner minibatch (what the
        calibration reads; 0 without calibration).
      anchor: the anchor x in float32 or wider (stepwise mode; ``None`` in scan
        mode, where x is the ``params`` the loop holds).
      average: the running average μ of the walker, float32 or wider
        (stepwise mode; ``None`` in scan mode).
      walker: the walker x′ in float32 when the params are in a lower
        precision (stepwise mode; else ``None`` and x′ is the params the loop
        holds).
      inner_state: state of the inner optimizer (stepwise mode; ``None`` in
        scan mode, where it is re-initialised at every outer step).
      outer_state: state of the outer optimizer.
      aux: scan mode with ``has_aux=True``: the auxiliary value the last inner
        step's ``grad_fn`` returned (e.g. the walker's BatchNorm statistics);
        ``None`` before the first update and without ``has_aux``.
    """

    count: jax.Array
    inner_count: jax.Array
    key: jax.Array
    coupling: jax.Array
    requested_coupling: jax.Array
    coupling_scale: jax.Array
    loss: jax.Array
    anchor: Any
    average: Any
    walker: Any
    inner_state: Any
    outer_state: Any
    aux: Any = None


_OUTER_SCALES = ("coupling", "gradient", "none")
_INNER_COUPLINGS = ("gradient", "update")


def _where(cond, on_true, on_false):
    return jax.tree.map(lambda a, b: jnp.where(cond, a, b), on_true, on_false)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_finite(x) -> bool:
    return _is_real(x) and math.isfinite(x)


def _wide_dtype(dtype):
    """float32 for bfloat16/float16 leaves: the Langevin walk is kept at least in float32."""
    return jnp.promote_types(dtype, jnp.float32)


def _widen(tree):
    """A float32-or-wider copy of ``tree`` (a fresh buffer even when no cast is needed)."""
    return jax.tree.map(lambda x: jnp.array(x, dtype=_wide_dtype(jnp.result_type(x))), tree)


def _is_low_precision(tree) -> bool:
    return any(
        jnp.finfo(jnp.result_type(x)).bits < 32 for x in jax.tree.leaves(tree)
    )


def _cast_like(tree, like):
    return jax.tree.map(lambda a, b: a.astype(jnp.result_type(b)), tree, like)


def _check_float_params(params, fn: str) -> None:
    """Langevin noise and elastic pulls are meaningless on integer leaves: reject them."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(
                f"{fn} needs floating-point params; params{jax.tree_util.keystr(path)} has "
                f"dtype {jnp.result_type(leaf)}."
            )


def _check_grads(grads, params, what: str) -> None:
    """Gradients must match the params leaf by leaf: a mismatch would broadcast silently."""
    g_def, p_def = jax.tree.structure(grads), jax.tree.structure(params)
    if g_def != p_def:
        raise ValueError(
            f"{what} must have the tree structure of params; got {g_def}, expected {p_def}."
        )
    for path, g, p in zip(
        (path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]),
        jax.tree.leaves(grads),
        jax.tree.leaves(params),
        strict=True,
    ):
        if jnp.shape(g) != jnp.shape(p):
            raise ValueError(
                f"{what}{jax.tree_util.keystr(path)} has shape {jnp.shape(g)}; the params "
                f"leaf has shape {jnp.shape(p)}."
            )


_NOISE_GENERATORS = ("hash", "threefry")


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser: a bijective avalanche mix of uint32."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _hash_normal(key, size: int):
    """``size`` standard normals from a keyed counter hash.

    Two uint32 words k₀, k₁ are drawn from ``key`` with threefry; element i
    gets the bits b_i = fmix(fmix(i ⊕ k₀) + k₁) (MurmurHash3's finaliser),
    whose top 24 bits give a uniform u_i on (−1, 1) at the centres of 2²⁴
    bins, and z_i = √2 erf⁻¹(u_i). The tails are cut at |z| ≈ 5.3 (the last
    bin). A counter-based hash of two key words, like threefry but with two
    rounds of a cheap mixer instead of twenty of threefry's: moments, tails
    and correlations between neighbouring elements and between steps are
    those of i.i.d. normals to sampling accuracy (a test checks them), which
    is what an isotropic Langevin perturbation needs; it is not a generator
    for Monte Carlo estimates of rare events.
    """
    words = jax.random.bits(key, (2,), jnp.uint32)
    i = jax.lax.iota(jnp.uint32, size)
    bits = _fmix32(_fmix32(i ^ words[0]) + words[1])
    u = (bits >> 8).astype(jnp.float32) * (2.0 / 16777216.0) - (1.0 - 1.0 / 16777216.0)
    return jnp.sqrt(2.0).astype(jnp.float32) * jax.lax.erf_inv(u)


def _normal_like(key, tree, generator: str = "hash"):
    """Standard normals shaped like ``tree``, from ONE draw for all leaves.

    One draw of the total size, split into the leaves: the same distribution
    as a draw per leaf (i.i.d. N(0, 1) entries), at one PRNG computation per
    Langevin step instead of one per leaf, which is what compile time grows
    with (the generator is expanded into every program that draws). The draw
    is float32 and cast to each leaf's dtype. ``generator``: ``"hash"``
    (:func:`_hash_normal`) or ``"threefry"`` (``jax.random.normal``).
    """
    leaves, treedef = jax.tree.flatten(tree)
    sizes = [math.prod(jnp.shape(leaf)) for leaf in leaves]
    total = sum(sizes)
    if generator == "hash":
        flat = _hash_normal(key, total)
    else:
        flat = jax.random.normal(key, (total,), jnp.float32)
    out, offset = [], 0
    for leaf, size in zip(leaves, sizes, strict=True):
        piece = jax.lax.dynamic_slice_in_dim(flat, offset, size) if size else flat[:0]
        out.append(piece.reshape(jnp.shape(leaf)).astype(jnp.result_type(leaf)))
        offset += size
    return treedef.unflatten(out)


class _EntropySGD:
    """The shared core: validated hyperparameters, the Langevin step, the outer step.

    Both drivers are built from :meth:`langevin_step` and :meth:`outer_step`,
    so scan mode is literally a scan of the stepwise update.
    """

    def __init__(
        self,
        outer_optimizer,
        inner_steps,
        coupling,
        inner_learning_rate,
        noise,
        average_weight,
        inner_weight_decay,
        inner_momentum,
        inner_nesterov,
        inner_optimizer,
        inner_coupling,
        outer_scale,
        calibrate_coupling,
        calibration_step,
        max_coupling,
        clamp_fraction,
        seed,
        noise_generator,
    ):
        # Numeric hyperparameters may be traced (optax.inject_hyperparams): they
        # are checked when concrete and kept as given for the computation.
        given = dict(
            coupling=coupling, inner_learning_rate=inner_learning_rate, noise=noise,
            average_weight=average_weight, inner_weight_decay=inner_weight_decay,
            inner_momentum=inner_momentum, max_coupling=max_coupling,
            clamp_fraction=clamp_fraction,
        )
        coupling = checkable(coupling, 1.0)
        inner_learning_rate = checkable(inner_learning_rate, 0.1)
        noise = checkable(noise, 0.0)
        average_weight = checkable(average_weight, 0.5)
        inner_weight_decay = checkable(inner_weight_decay, 0.0)
        inner_momentum = checkable(inner_momentum, 0.0)
        max_coupling = checkable(max_coupling, 1.0)
        clamp_fraction = checkable(clamp_fraction, 0.5)
        if not isinstance(inner_steps, numbers.Integral) or isinstance(inner_steps, bool):
            raise TypeError(
                f"inner_steps (L) must be an int, got {inner_steps!r} (with "
                "optax.inject_hyperparams, list it in static_args)."
            )
        if inner_steps < 1:
            raise ValueError(f"inner_steps (L) must be >= 1, got {inner_steps}.")
        if _is_real(coupling):
            if not math.isfinite(coupling) or not coupling >= 0:
                raise ValueError(f"coupling (γ) must be a finite number >= 0, got {coupling!r}.")
            value = float(coupling)
            constant = given["coupling"]
            coupling_fn = lambda count: jnp.full((), constant, jnp.float32)
        elif callable(coupling):
            coupling_fn = lambda count: jnp.asarray(coupling(count), jnp.float32)
            at_zero = value_at_zero(coupling_fn)
            value = 1.0 if at_zero is None else float(at_zero)
            if not math.isfinite(value) or not value >= 0:
                raise ValueError(
                    f"coupling (γ) must be a finite number >= 0; the schedule gives "
                    f"γ(0) = {value}."
                )
        else:
            raise TypeError(
                f"coupling (γ) must be a float or an Optax schedule, got {coupling!r}."
            )
        if calibrate_coupling and not value > 0:
            raise ValueError(
                "calibrate_coupling=True rescales the coupling so that γ matches the "
                f"calibrated γ_0 at step 0; it needs coupling(0) > 0, got {value}."
            )
        if not _is_finite(inner_learning_rate) or not inner_learning_rate > 0:
            raise ValueError(
                "inner_learning_rate (η′) must be a finite number > 0, "
                f"got {inner_learning_rate!r}."
            )
        if not _is_finite(noise) or not noise >= 0:
            raise ValueError(f"noise (ε) must be a finite number >= 0, got {noise!r}.")
        if not _is_real(average_weight) or not 0 <= average_weight < 1:
            raise ValueError(
                f"average_weight (α) must be in [0, 1), got {average_weight!r}."
            )
        if not _is_finite(inner_weight_decay) or not inner_weight_decay >= 0:
            raise ValueError(
                "inner_weight_decay (λ′) must be a finite number >= 0, "
                f"got {inner_weight_decay!r}."
            )
        if not _is_real(inner_momentum) or not 0 <= inner_momentum < 1:
            raise ValueError(f"inner_momentum must be in [0, 1), got {inner_momentum!r}.")
        if inner_coupling not in _INNER_COUPLINGS:
            raise ValueError(
                f"inner_coupling must be one of {_INNER_COUPLINGS}, got {inner_coupling!r}."
            )
        if outer_scale not in _OUTER_SCALES:
            raise ValueError(f"outer_scale must be one of {_OUTER_SCALES}, got {outer_scale!r}.")
        if not isinstance(calibration_step, numbers.Integral) or isinstance(
            calibration_step, bool
        ) or calibration_step < 0:
            raise ValueError(
                f"calibration_step (gtime) must be an int >= 0, got {calibration_step!r}."
            )
        if max_coupling is not None and (not _is_finite(max_coupling) or not max_coupling > 0):
            raise ValueError(
                f"max_coupling must be None or a finite number > 0, got {max_coupling!r}."
            )
        if not _is_real(clamp_fraction) or not 0 < clamp_fraction <= 1:
            raise ValueError(f"clamp_fraction must be a number in (0, 1], got {clamp_fraction!r}.")
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}.")
        if noise_generator not in _NOISE_GENERATORS:
            raise ValueError(
                f"noise_generator must be one of {_NOISE_GENERATORS}, got {noise_generator!r}."
            )
        if inner_optimizer is None:
            # The momentum buffer is always there (a momentum of 0 is plain SGD),
            # so the state's structure does not depend on the values.
            inner_optimizer = optax.chain(
                optax.add_decayed_weights(given["inner_weight_decay"]),
                optax.sgd(
                    given["inner_learning_rate"],
                    momentum=given["inner_momentum"],
                    nesterov=bool(inner_nesterov),
                ),
            )
        if inner_coupling == "update" and _stability.sgd_type(inner_optimizer) is False:
            raise ValueError(
                "inner_coupling='update' adds −η′γ(x′ − x) after the inner optimizer and needs "
                "an SGD-type inner optimizer whose rate can be read from it; use the default "
                "inner optimizer or inner_coupling='gradient'."
            )
        self.outer_optimizer = outer_optimizer
        # The outer step is SGD on −F with the rate η (outer_scale 'coupling' or
        # 'gradient'); −F's Hessian γI − γ²Cov is at most γ, so it is stable
        # for every loss while ηγ is below the outer optimizer's bound.
        self.outer_usable = outer_scale != "none" and _stability.can_measure(outer_optimizer)
        self.inner_optimizer = optax.with_extra_args_support(inner_optimizer)
        self.inner_usable = _stability.can_measure(inner_optimizer)
        self._raw_inner = inner_optimizer
        # η′ of the inner optimizer, read once (traceable): the 'update' pull's rate.
        self.inner_eta = (
            _stability.learning_rate_at(inner_optimizer, 0) if inner_coupling == "update" else None
        )
        self.inner_steps = int(inner_steps)
        self.coupling_fn = coupling_fn
        self.add_noise = is_traced(given["noise"]) or noise > 0
        self.noise_std = given["noise"] * jnp.sqrt(2.0 * jnp.asarray(given["inner_learning_rate"]))
        self.average_weight = given["average_weight"]
        self.inner_coupling = inner_coupling
        self.outer_scale = outer_scale
        self.calibrate = bool(calibrate_coupling)
        self.calibration_step = int(calibration_step)
        self.max_coupling = given["max_coupling"]
        self.clamp_fraction = given["clamp_fraction"]
        self.seed = int(seed)
        self.noise_generator = noise_generator

    # ------------------------------------------------------------------ coupling

    def stable_coupling(self, count):
        """clamp_fraction × the largest γ at which the inner and outer steps are stable."""
        if self.inner_coupling == "gradient":
            stable = _stability.stable_coupling(self._raw_inner, 0, usable=self.inner_usable)
        else:  # −η′γ(x′ − x) outside the momentum: plain SGD's bound 2/η′
            eta = self.inner_eta
            stable = jnp.where(eta > 0, 2.0 / jnp.where(eta > 0, eta, 1.0), jnp.inf)
        if self.outer_scale != "none":
            outer = _stability.stable_coupling(
                self.outer_optimizer, count, usable=self.outer_usable
            )
            stable = jnp.minimum(stable, outer)
        return (self.clamp_fraction * stable).astype(jnp.float32)

    def couplings(self, scale, count):
        """(requested, applied) γ at outer step ``count`` for calibration scale ``scale``."""
        requested = scale * self.coupling_fn(count)
        if self.calibrate:
            requested = jnp.where(count > self.calibration_step, requested, 0.0)
        applied = _stability.clamp_coupling(requested, self.stable_coupling(count),
                                            self.max_coupling)
        return requested.astype(jnp.float32), applied

    # ------------------------------------------------------------------ state

    def init_state(self, params, stepwise: bool) -> EntropySGDState:
        _check_float_params(params, "entropy_sgd_stepwise" if stepwise else "entropy_sgd")
        one = jnp.ones((), jnp.float32)
        requested, applied = self.couplings(one, jnp.zeros((), jnp.int32))
        wide = _widen(params) if stepwise else None
        return EntropySGDState(
            count=jnp.zeros((), jnp.int32),
            inner_count=jnp.zeros((), jnp.int32),
            key=jax.random.PRNGKey(self.seed),
            coupling=applied,
            requested_coupling=requested,
            coupling_scale=one,
            loss=jnp.zeros((), jnp.float32),
            anchor=wide,
            average=_widen(params) if stepwise else None,
            walker=_widen(params) if stepwise and _is_low_precision(params) else None,
            inner_state=self.inner_optimizer.init(wide) if stepwise else None,
            outer_state=self.outer_optimizer.init(wide if stepwise else params),
        )

    # ------------------------------------------------------------------ steps

    def langevin_step(self, grads, walker, anchor, average, inner_state, key, gamma):
        """One SGLD step of the (float32) walker and its running average.

        x′ ← x′ + inner(g + γ(x′ − x)) + ε√(2η′) ξ   (inner_coupling='gradient'), or
        x′ ← x′ + inner(g) − η′γ(x′ − x) + ε√(2η′) ξ (inner_coupling='update').
        """
        grads = _cast_like(grads, walker)
        if self.inner_coupling == "gradient":
            pulled = jax.tree.map(lambda g, w, x: g + gamma * (w - x), grads, walker, anchor)
            steps, inner_state = self.inner_optimizer.update(pulled, inner_state, walker)
        else:
            steps, inner_state = self.inner_optimizer.update(grads, inner_state, walker)
            steps = jax.tree.map(
                lambda s, w, x: s - self.inner_eta * gamma * (w - x), steps, walker, anchor
            )
        key, noise_key = jax.random.split(key)
        if self.add_noise:
            xi = _normal_like(noise_key, walker, self.noise_generator)
            steps = jax.tree.map(lambda s, n: s + self.noise_std * n, steps, xi)
        walker = jax.tree.map(lambda w, s: (w + s).astype(w.dtype), walker, steps)
        a = self.average_weight
        average = jax.tree.map(lambda m, w: a * m + (1 - a) * w, average, walker)
        return walker, average, inner_state, key

    def outer_step(self, state, params, anchor, average, walker, loss):
        """Lands the outer step: calibrates γ_0 if due, moves the anchor.

        ``params`` is the anchor in the loop's dtype (what the outer optimizer
        sees); ``anchor``, ``average`` and ``walker`` are the float32 copies.
        Returns (anchor updates, new outer state, new coupling_scale,
        (requested, applied) γ_{t+1}).
        """
        scale = state.coupling_scale
        if self.calibrate:
            # γ_0 = loss / (½‖x − x′‖²): the LAST inner minibatch's loss, the final walker.
            half_sq = 0.5 * optax.tree.norm(optax.tree.sub(anchor, walker), squared=True)
            gamma0 = loss / jnp.maximum(half_sq, 1e-30)
            calibrated = jnp.where(half_sq > 0, gamma0 / self.coupling_fn(0), scale)
            scale = jnp.where(state.count == self.calibration_step, calibrated, scale)
            scale = scale.astype(jnp.float32)
        gamma = state.coupling
        diff = jax.tree.map(lambda x, m: x - m, anchor, average)
        if self.outer_scale == "gradient":
            diff = jax.tree.map(lambda d: gamma * d, diff)
        updates, outer_state = self.outer_optimizer.update(
            _cast_like(diff, params), state.outer_state, params
        )
        if self.outer_scale == "coupling":
            updates = jax.tree.map(lambda u: (gamma * u).astype(u.dtype), updates)
        return updates, outer_state, scale, self.couplings(scale, state.count + 1)


def _defaults_outer(learning_rate, momentum, nesterov, weight_decay, outer_optimizer):
    if outer_optimizer is not None:
        if learning_rate is not None:
            raise ValueError(
                "Give either learning_rate (the default outer SGD) or outer_optimizer, "
                f"not both; got learning_rate={learning_rate!r} and an outer_optimizer."
            )
        return optax.with_extra_args_support(outer_optimizer)
    if learning_rate is None:
        raise ValueError("learning_rate (η, outer step) is required without outer_optimizer.")
    lr, beta, wd = (checkable(learning_rate, 0.1), checkable(momentum, 0.0),
                    checkable(weight_decay, 0.0))
    if not _is_real(lr) and not callable(lr):
        raise TypeError(
            f"learning_rate (η) must be a number or an Optax schedule, got {learning_rate!r}."
        )
    if _is_real(lr) and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"learning_rate (η) must be a finite number > 0, got {learning_rate!r}.")
    if not _is_real(beta) or not 0 <= beta < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
    if not _is_finite(wd) or not wd >= 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}.")
    # Weight decay and momentum buffer always present: the state's structure
    # does not depend on the values (a decay or momentum of 0 changes nothing).
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=momentum, nesterov=bool(nesterov)),
    )


def _check_unroll(unroll) -> None:
    ok = unroll == "auto" or isinstance(unroll, bool) or (
        isinstance(unroll, numbers.Integral) and unroll >= 1
    )
    if not ok:
        raise ValueError(f"unroll must be 'auto', a bool or an int >= 1, got {unroll!r}.")


def scan_unroll(unroll, length: int):
    """The ``lax.scan`` ``unroll`` that ``unroll`` means for a loop of ``length`` steps."""
    if unroll == "auto":
        return length if jax.default_backend() == "cpu" else 1
    return unroll


def _scan_transform(
    core: _EntropySGD, unroll="auto", has_aux: bool = False, aux_init=None
) -> optax.GradientTransformationExtraArgs:
    def init_fn(params):
        state = core.init_state(params, stepwise=False)
        if aux_init is None:
            return state
        return state._replace(aux=aux_init(params) if callable(aux_init) else aux_init)

    def call_grad_fn(grad_fn, walker, i, aux, loss):
        """One inner gradient: (grads, loss, aux) whatever grad_fn's form."""
        if has_aux:
            out = grad_fn(walker, i, aux)
            try:
                (loss, aux), grads = out
            except (TypeError, ValueError):
                raise ValueError(
                    "with has_aux=True, grad_fn(walker, i, aux) must return ((loss, aux), "
                    "grads), what jax.value_and_grad(f, has_aux=True) returns for "
                    "f(walker, i, aux) -> (loss, aux)."
                ) from None
            return grads, jnp.asarray(loss, jnp.float32), aux
        out = grad_fn(walker, i)
        if core.calibrate:
            grads, loss = out
            return grads, jnp.asarray(loss, jnp.float32), aux
        return out, loss, aux

    def update_fn(updates, state, params=None, *, grad_fn=None, value=None, aux=None,
                  **extra_args):
        del extra_args
        if grad_fn is None:
            form = ("f(walker, i, aux) -> ((loss, aux), grads)" if has_aux else
                    "f(walker, i) -> grads (or (grads, loss) when calibrate_coupling=True)")
            raise ValueError(
                "entropy_sgd's update needs grad_fn=: update(grads, state, params, "
                f"grad_fn=f) with grads the minibatch gradient at params (inner step 0) and "
                f"{form} for inner steps i = 1..L−1."
            )
        if params is None:
            raise ValueError("entropy_sgd's update needs params (the anchor x).")
        if has_aux and aux is None:
            raise ValueError(
                "with has_aux=True, update needs aux=: the auxiliary value after inner "
                "step 0 (e.g. the BatchNorm statistics of the forward pass that gave grads), "
                "or the starting value when grads is None."
            )
        anchor = _widen(params)

        def inner(carry, grads):
            walker, average, inner_state, key, loss, aux = carry
            walker, average, inner_state, key = core.langevin_step(
                grads, walker, anchor, average, inner_state, key, state.coupling
            )
            return walker, average, inner_state, key, loss, aux

        def body(carry, i):
            walker, average, inner_state, key, loss, aux = carry
            grads, loss, aux = call_grad_fn(grad_fn, _cast_like(walker, params), i, aux, loss)
            _check_grads(grads, walker, "grad_fn(params, i)")
            return inner((walker, average, inner_state, key, loss, aux), grads), None

        carry = (anchor, anchor, core.inner_optimizer.init(anchor), state.key, state.loss, aux)
        first = 0
        if updates is not None:
            # Inner step 0 starts at x′ = x: its gradient is the caller's `updates`
            # (as in optax.contrib.sam's opaque mode), so grad_fn runs L − 1 times.
            _check_grads(updates, params, "updates")
            if value is not None and (core.calibrate or has_aux):
                carry = (*carry[:4], jnp.asarray(value, jnp.float32), aux)
            elif core.calibrate and core.inner_steps == 1:
                raise ValueError(
                    "calibrate_coupling=True with inner_steps=1 reads the loss of the only "
                    "inner minibatch: update(grads, state, params, grad_fn=f, value=loss)."
                )
            carry = inner(carry, updates)
            first = 1
        (walker, average, _, key, loss, aux), _ = jax.lax.scan(
            body, carry, jnp.arange(first, core.inner_steps, dtype=jnp.int32),
            unroll=scan_unroll(unroll, max(1, core.inner_steps - first)),
        )
        updates, outer_state, scale, (requested, applied) = core.outer_step(
            state, params, anchor, average, walker, loss
        )
        new_state = state._replace(
            count=state.count + 1,
            key=key,
            coupling=applied,
            requested_coupling=requested,
            coupling_scale=scale,
            loss=loss,
            outer_state=outer_state,
            aux=aux if has_aux else None,
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _stepwise_transform(core: _EntropySGD) -> optax.GradientTransformationExtraArgs:
    def init_fn(params):
        return core.init_state(params, stepwise=True)

    def update_fn(updates, state, params=None, *, value=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("entropy_sgd_stepwise's update needs params (the walker x′).")
        if core.calibrate and value is None:
            raise ValueError(
                "calibrate_coupling=True needs the minibatch loss: "
                "update(grads, state, params, value=loss)."
            )
        _check_grads(updates, params, "updates")
        # The first inner step starts exactly at the anchor; later ones at the
        # float32 walker (kept in the state for low-precision params).
        current = _widen(params) if state.walker is None else state.walker
        walker = _where(state.inner_count == 0, state.anchor, current)
        walker, average, inner_state, key = core.langevin_step(
            updates, walker, state.anchor, state.average, state.inner_state, state.key,
            state.coupling,
        )
        loss = jnp.asarray(value, jnp.float32) if core.calibrate else state.loss

        landing = state.inner_count == core.inner_steps - 1

        def land(_):
            # The L-th call: the outer step moves x; walker, average and the
            # inner optimizer restart at the new anchor.
            anchor_updates, outer_state, scale, (requested, applied) = core.outer_step(
                state, state.anchor, state.anchor, average, walker, loss
            )
            new_anchor = optax.apply_updates(state.anchor, anchor_updates)
            return (state.count + 1, jnp.zeros((), jnp.int32), applied, requested, scale,
                    new_anchor, new_anchor, new_anchor,
                    core.inner_optimizer.init(new_anchor), outer_state)

        def stay(_):
            return (state.count, state.inner_count + 1, state.coupling,
                    state.requested_coupling, state.coupling_scale, state.anchor, average,
                    walker, inner_state, state.outer_state)

        # Only the landing call pays for the outer step (a cond, not a select).
        (count, inner_count, coupling, requested, scale, anchor, average, new_walker,
         inner_state, outer_state) = jax.lax.cond(landing, land, stay, None)
        new_state = EntropySGDState(
            count=count.astype(jnp.int32),
            inner_count=inner_count.astype(jnp.int32),
            key=key,
            coupling=coupling,
            requested_coupling=requested,
            coupling_scale=scale,
            loss=loss,
            anchor=anchor,
            average=average,
            walker=None if state.walker is None else new_walker,
            inner_state=inner_state,
            outer_state=outer_state,
        )
        step = jax.tree.map(lambda n, p: (n - p).astype(p.dtype), new_walker, params)
        return step, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


_HPARAM_NAMES = (
    "inner_steps", "coupling", "inner_learning_rate", "noise", "average_weight",
    "inner_weight_decay", "inner_momentum", "inner_nesterov", "inner_optimizer",
    "inner_coupling", "outer_scale", "calibrate_coupling", "calibration_step",
    "max_coupling", "clamp_fraction", "seed", "noise_generator",
)


def _core(outer, hparams) -> _EntropySGD:
    return _EntropySGD(outer, *(hparams[name] for name in _HPARAM_NAMES))


def entropy_sgd(
    learning_rate: float | optax.Schedule | None,
    inner_steps: int = 5,
    coupling: Coupling = 0.03,
    *,
    inner_learning_rate: float = 0.1,
    noise: float = 1e-4,
    average_weight: float = 0.75,
    inner_weight_decay: float = 1e-4,
    inner_momentum: float = 0.0,
    inner_nesterov: bool = True,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    outer_scale: str = "coupling",
    inner_coupling: str = "gradient",
    calibrate_coupling: bool = False,
    calibration_step: int = 1,
    max_coupling: float | None = None,
    clamp_fraction: float = 0.5,
    seed: int = 0,
    noise_generator: str = "hash",
    unroll: int | bool | str = "auto",
    has_aux: bool = False,
    aux_init: Any = None,
    outer_optimizer: optax.GradientTransformation | None = None,
    inner_optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Entropy-SGD, one outer step per ``update`` call (jitted inner loop).

    One outer step (γ_t = ``coupling`` at outer step t, L = ``inner_steps``),
    with the defaults, which are the rules of Pittorino et al.'s code:

    .. code-block:: text

        x′ ← x ;  μ ← x
        for l = 0 .. L−1:
            d  ← ∇L_l(x′) + γ_t (x′ − x) + λ′ x′           # into the inner momentum
            x′ ← x′ − η′ nesterov_β′(d) + ε √(2η′) ξ,  ξ ~ N(0, I)
            μ  ← α μ + (1 − α) x′
        x ← x − η γ_t · nesterov_β((x − μ) + λ x)        # outer_scale="coupling"

    Symbols: η = ``learning_rate``, λ = ``weight_decay``, β = ``momentum``,
    L = ``inner_steps``, γ = ``coupling``, η′ = ``inner_learning_rate``,
    ε = ``noise``, α = ``average_weight`` (weight of the OLD average),
    λ′ = ``inner_weight_decay``, β′ = ``inner_momentum`` (Nesterov unless
    ``inner_nesterov=False``). The outer step is scaled by γ_t with the
    weight decay inside it (the authors' ``gscale``): their effective outer
    decay η γ_t λ grows with γ. ``outer_scale="gradient"`` instead feeds
    G = γ_t (x − μ), the gradient of −F, to the outer optimizer (decay
    unscaled); ``"none"`` feeds x − μ (Chaudhari et al.'s port).

    Map from the authors' SacredDNN ``EntropySGD`` (and ``esgd_dnn.py``):
    ``lr`` → ``learning_rate``; ``L`` → ``inner_steps``; ``g`` (they write
    g (x′ − x), so g = γ) → ``coupling``; ``g0 = 0`` → ``calibrate_coupling``;
    ``gtime`` → ``calibration_step``; ``g1``/``grate`` and ``gmax`` (a total
    growth factor, not a cap: their min(g, gmax) is commented out) →
    ``flatjax.exponential_coupling(1.0, T, factor=gmax)`` with T the run's
    outer steps, γ_1 = gmax^{1/T} − 1; ``gscale`` → ``outer_scale="coupling"``;
    ``sgld_lr`` → ``inner_learning_rate``; ``alpha_arg`` → ``average_weight``;
    ``eps`` → ``noise``; ``momentum_sgld`` → ``inner_momentum``;
    ``weight_decay`` → both ``weight_decay`` and ``inner_weight_decay``.
    Chaudhari et al.'s ``python/optim.py``: ``g0`` → a constant ``coupling``
    (his scoping counter never advances), ``momentum`` → both ``momentum`` and
    ``inner_momentum``, ``inner_coupling="update"`` (he adds the pull after
    the momentum), ``outer_scale="none"``; his outer momentum buffer starts at
    ∇f(x₀) rather than 0.

    Calibration (``calibrate_coupling=True``, the authors' ``g0 = 0``): γ = 0
    for the outer steps t ≤ ``calibration_step`` (with ``outer_scale=
    "coupling"`` these have size zero while the momentum accumulates); after
    the inner loop of step t = ``calibration_step``, γ_0 = loss / (½ ‖x − x′‖²)
    with the loss of that loop's LAST minibatch and x′ its final walker; from
    then on γ_t = γ_0 · coupling(t) / coupling(0). If x′ = x exactly the
    schedule is kept unscaled.

    Stability (never silent): the explicit inner step is stable only while
    η′(γ + λ′ + curvature) < b′, b = 2 for SGD, 2(1 + β)/(1 + 2β) for
    Nesterov, 2(1 + β) for heavy ball (η′ and β′ are read from the inner
    optimizer). The outer step is a step of rate η on −F, whose Hessian
    γI − γ² Cov(x′) is at most γ: it is stable for every loss while ηγ < b
    (β, η read from the outer optimizer at the current step; ``"none"``
    needs no bound). The applied γ_t is min(γ_t, ``max_coupling``,
    ``clamp_fraction`` · b′/η′, ``clamp_fraction`` · b/η); ``max_coupling`` is
    an absolute bound, never rescaled by the calibration. ``state.coupling``
    is the applied γ and ``state.requested_coupling`` the schedule's, so a
    clamp shows in the logs. Optimizers that are not SGD-type contribute no
    bound (``max_coupling`` still applies).

    Precision: the walker, its average, the anchor copy and the noise are
    float32 (or wider) whatever the params' dtype; ``grad_fn`` receives the
    walker cast to the params' dtype. So with bfloat16 params the Langevin
    noise keeps its standard deviation ε √(2η′).

    Call: ``update(grads, state, params, *, grad_fn, value=None, aux=None)``.
    ``params`` is the anchor x and ``grads`` the minibatch gradient at x:
    the first inner step starts at x′ = x, so that is its gradient (what any
    Optax loop computes anyway; a transform chained before this one acts on
    it, as in ``optax.contrib.sam(opaque_mode=True)``). ``grad_fn(walker, i)``
    returns the minibatch gradient at the walker for inner steps
    i = 1..L−1 (the caller closes over L stacked minibatches and picks batch
    i), or ``(grads, loss)`` when ``calibrate_coupling=True``; so it runs
    L − 1 times per outer step. ``value`` is the loss at x, needed only to
    calibrate with L = 1. With ``grads=None`` ``grad_fn`` also computes
    inner step 0. The inner steps run as one ``jax.lax.scan`` of the same
    Langevin step :func:`entropy_sgd_stepwise` takes; the returned updates
    move x by one outer step.

    Auxiliary values (``has_aux=True``): ``grad_fn(walker, i, aux)`` returns
    ``((loss, aux), grads)``, exactly what ``jax.value_and_grad(f,
    has_aux=True)`` returns for ``f(walker, i, aux) -> (loss, aux)``; ``aux``
    is threaded through the inner steps, starting from the ``aux=`` of the
    call (the value after inner step 0, e.g. the BatchNorm statistics of the
    forward pass that gave ``grads``), and the last one is kept in
    ``state.aux`` (read it with :func:`entropy_sgd_aux`). ``state.loss`` is
    then the last inner minibatch's loss. ``state.aux`` starts as
    ``aux_init`` (a pytree, or a function of the params giving one); give it
    wherever the state's structure must not change (``nnx.Optimizer``, a
    ``lax.scan`` over steps, donation). Without it ``state.aux`` is ``None``
    until the first update.

    BatchNorm: with ``has_aux=True`` and the statistics as ``aux`` they keep
    updating at the walker through the inner steps, as in the authors' code
    (where the model's running statistics follow every forward pass); the
    anchor then carries the walker's statistics. The alternative ('anchor'
    statistics: a forward pass at the new x only) needs no aux. Both modes
    are in ``flatjax.training`` (``esgd.batch_norm``).

    Args:
      learning_rate: η of the default outer SGD (float or Optax schedule over
        outer steps); ``None`` when ``outer_optimizer`` is given.
      inner_steps: L >= 1, Langevin steps (gradient evaluations) per outer step.
      coupling: γ >= 0, a float or an Optax schedule over outer steps (e.g.
        :func:`flatjax.exponential_coupling`; with calibration only its shape
        counts, give the cap as ``max_coupling``).
      inner_learning_rate: η′ > 0 of the default inner SGD; it also sets the
        noise standard deviation ε √(2η′).
      noise: ε >= 0, Langevin noise scale.
      average_weight: α in [0, 1), weight of the old value in μ.
      inner_weight_decay: λ′ >= 0, weight decay of the default inner SGD.
      inner_momentum: β′ in [0, 1) of the default inner SGD.
      inner_nesterov: whether that inner momentum is Nesterov's (authors: yes).
      momentum: β in [0, 1) of the default outer SGD.
      nesterov: whether the default outer SGD uses Nesterov momentum.
      weight_decay: λ, weight decay of the default outer SGD.
      outer_scale: ``"coupling"``, ``"gradient"`` or ``"none"`` (above).
      inner_coupling: ``"gradient"`` (the pull enters the inner optimizer) or
        ``"update"`` (added as −η′γ(x′ − x) after it, Chaudhari's port).
      calibrate_coupling: calibrate γ_0 (above).
      calibration_step: the outer step t (>= 0) whose inner loop calibrates.
      max_coupling: optional absolute bound on γ_t.
      clamp_fraction: in (0, 1], fraction of the stability bound γ may reach.
      seed: seed of the PRNG key kept in the state.
      noise_generator: ``"hash"`` (default) draws the Langevin noise with a
        keyed counter hash (MurmurHash3's finaliser, two rounds, keyed by two
        threefry words per step); ``"threefry"`` with ``jax.random.normal``.
        Both give i.i.d. N(0, 1) to sampling accuracy. Measured on a 2-core
        CPU, the hash draws the 266,610 normals of an MLP 784-300-100 in
        0.9 ms against threefry's 2.5 ms (about the cost of that MLP's
        gradient at batch 128), and compiles to a smaller program.
      has_aux: whether ``grad_fn`` takes and returns an auxiliary value (above).
      aux_init: the initial ``state.aux`` with ``has_aux=True``: a pytree, or
        a function ``params -> pytree`` (``None``: ``state.aux`` is ``None``
        until the first update).
      unroll: ``unroll`` of the inner ``lax.scan`` (an int, or True for all L
        steps). ``"auto"`` unrolls all L steps on CPU and keeps the rolled
        loop elsewhere: XLA:CPU runs a rolled loop body markedly slower (five
        LeNet-5 SGD steps in a rolled scan took 2.3× five separate calls on
        this project's CPU, 1.06× unrolled), at a compile time that grows
        with L.
      outer_optimizer: replaces the default outer SGD; it receives x − μ (or
        G, per ``outer_scale``) at x.
      inner_optimizer: replaces ``chain(add_decayed_weights(λ′), sgd(η′, β′,
        nesterov))``; it receives ∇L(x′) + γ (x′ − x) at the walker x′ (or
        ∇L(x′) with ``inner_coupling="update"``), its state is reset at every
        outer step, and the noise is added after it.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      :class:`EntropySGDState`.

    Example:
      >>> import jax.numpy as jnp, optax, flatjax
      >>> grad_fn = lambda w, i: 2.0 * w                  # L(w) = ‖w‖²
      >>> opt = flatjax.entropy_sgd(1.0, inner_steps=3, coupling=1.0)
      >>> params = jnp.ones(2)
      >>> state = opt.init(params)
      >>> updates, state = opt.update(grad_fn(params, 0), state, params, grad_fn=grad_fn)
      >>> bool(jnp.all(optax.apply_updates(params, updates) < params))
      True

    References:
      Chaudhari et al., ICLR 2017, arXiv:1611.01838;
      Pittorino et al., ICLR 2021, arXiv:2006.07897.
    """
    outer = _defaults_outer(learning_rate, momentum, nesterov, weight_decay, outer_optimizer)
    return scale_by_entropy_sgd(
        inner_steps, coupling, inner_learning_rate=inner_learning_rate, noise=noise,
        average_weight=average_weight, inner_weight_decay=inner_weight_decay,
        inner_momentum=inner_momentum, inner_nesterov=inner_nesterov,
        inner_coupling=inner_coupling, calibrate_coupling=calibrate_coupling,
        calibration_step=calibration_step, max_coupling=max_coupling,
        clamp_fraction=clamp_fraction, seed=seed, noise_generator=noise_generator,
        inner_optimizer=inner_optimizer,
        outer_optimizer=outer, outer_scale=outer_scale, has_aux=has_aux, aux_init=aux_init,
        unroll=unroll,
    )


def entropy_sgd_stepwise(
    learning_rate: float | optax.Schedule | None,
    inner_steps: int = 5,
    coupling: Coupling = 0.03,
    *,
    inner_learning_rate: float = 0.1,
    noise: float = 1e-4,
    average_weight: float = 0.75,
    inner_weight_decay: float = 1e-4,
    inner_momentum: float = 0.0,
    inner_nesterov: bool = True,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    outer_scale: str = "coupling",
    inner_coupling: str = "gradient",
    calibrate_coupling: bool = False,
    calibration_step: int = 1,
    max_coupling: float | None = None,
    clamp_fraction: float = 0.5,
    seed: int = 0,
    noise_generator: str = "hash",
    outer_optimizer: optax.GradientTransformation | None = None,
    inner_optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Entropy-SGD, one Langevin step per ``update`` call.

    The same algorithm, hyperparameters and defaults as :func:`entropy_sgd`,
    driven differently. Call: ``update(grads, state, params, *,
    value=None)``, where ``params`` is the walker x′ the loop holds and
    ``grads`` the minibatch gradient at it. Calls 1..L−1 of each outer step
    move the walker by one Langevin step; the L-th call also lands the outer
    step and moves ``params`` to the new anchor x. So an unmodified
    ``flax.training.train_state.TrainState.apply_gradients`` loop runs
    Entropy-SGD, and the update is a pure function of ``(grads, state,
    params)`` that runs inside a ``jax.lax.scan`` (how ``flatjax.training``
    carries BatchNorm statistics in 'walker' mode). Evaluate and checkpoint
    :func:`entropy_sgd_eval_params`, not the params the loop holds. ``value`` (the
    minibatch loss at the walker) is needed only with
    ``calibrate_coupling=True``. The anchor and the average live in the state
    in float32 (or wider), and so does the walker when the params are in a
    lower precision (the params then hold it rounded).

    Args:
      learning_rate, inner_steps, coupling, ...: as in :func:`entropy_sgd`;
        ``inner_steps`` is the number of ``update`` calls per outer step.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      :class:`EntropySGDState` (it holds x, μ and the inner optimizer state).

    Example:
      >>> import jax.numpy as jnp, optax, flatjax
      >>> opt = flatjax.entropy_sgd_stepwise(1.0, inner_steps=2, coupling=1.0)
      >>> walker = jnp.ones(2)
      >>> state = opt.init(walker)
      >>> for _ in range(2):                      # L = 2 calls: one outer step
      ...     updates, state = opt.update(2.0 * walker, state, walker)
      ...     walker = optax.apply_updates(walker, updates)
      >>> int(state.count), bool(jnp.all(flatjax.entropy_sgd_eval_params(state, walker) < 1.0))
      (1, True)

    References:
      Chaudhari et al., ICLR 2017, arXiv:1611.01838;
      Pittorino et al., ICLR 2021, arXiv:2006.07897.
    """
    hparams = dict(locals())
    outer = _defaults_outer(learning_rate, momentum, nesterov, weight_decay, outer_optimizer)
    return _stepwise_transform(_core(outer, hparams))


def scale_by_entropy_sgd(
    inner_steps: int = 5,
    coupling: Coupling = 0.03,
    *,
    inner_learning_rate: float = 0.1,
    noise: float = 1e-4,
    average_weight: float = 0.75,
    inner_weight_decay: float = 1e-4,
    inner_momentum: float = 0.0,
    inner_nesterov: bool = True,
    inner_coupling: str = "gradient",
    calibrate_coupling: bool = False,
    calibration_step: int = 1,
    max_coupling: float | None = None,
    clamp_fraction: float = 0.5,
    seed: int = 0,
    noise_generator: str = "hash",
    inner_optimizer: optax.GradientTransformation | None = None,
    outer_optimizer: optax.GradientTransformation | None = None,
    outer_scale: str = "gradient",
    has_aux: bool = False,
    aux_init: Any = None,
    unroll: int | bool | str = "auto",
) -> optax.GradientTransformationExtraArgs:
    """The Entropy-SGD primitive: the inner Langevin loop, then an outer transform.

    With no ``outer_optimizer`` it returns G = γ_t (x − μ), the gradient of −F
    at x, and chains with any Optax optimizer like the ``scale_by_*``
    transforms do: ``optax.chain(scale_by_entropy_sgd(...), optax.sgd(η))`` is
    :func:`entropy_sgd` with ``outer_scale="gradient"`` (a test checks they
    agree), except that a chained optimizer is not seen by the stability
    clamp of the outer step. With ``outer_optimizer`` it wraps it, as
    ``optax.lookahead`` wraps its fast optimizer: the optimizer receives
    x − μ (or G, per ``outer_scale``) and, for ``outer_scale="coupling"``
    (the authors' γ-scaled step, which no chain of stateless transforms can
    express, since γ_t multiplies the momentum's output), its update is then
    scaled by γ_t. :func:`entropy_sgd` is this primitive wrapping
    ``chain(add_decayed_weights(λ), sgd(η, β, nesterov))``.

    Same call as :func:`entropy_sgd` (``update(updates, state, params, *,
    grad_fn, value=None, aux=None)``, ``params`` = anchor x); the arguments are
    those of :func:`entropy_sgd`.

    Example:
      >>> import jax.numpy as jnp, optax, flatjax
      >>> opt = optax.chain(flatjax.scale_by_entropy_sgd(3, coupling=1.0), optax.sgd(0.5))
      >>> params = jnp.ones(2)
      >>> state = opt.init(params)
      >>> grad_fn = lambda w, i: 2.0 * w                  # L(w) = ‖w‖²
      >>> updates, state = opt.update(grad_fn(params, 0), state, params, grad_fn=grad_fn)
      >>> bool(jnp.all(optax.apply_updates(params, updates) < params))
      True
    """
    _check_unroll(unroll)
    if aux_init is not None and not has_aux:
        raise ValueError("aux_init is the initial state.aux of has_aux=True; set has_aux=True.")
    hparams = dict(locals())
    outer = optax.identity() if outer_optimizer is None else optax.with_extra_args_support(
        outer_optimizer
    )
    return _scan_transform(_core(outer, hparams), unroll, bool(has_aux), aux_init)


def _find_state(state) -> EntropySGDState:
    is_esgd = lambda s: isinstance(s, EntropySGDState)
    found = [s for s in jax.tree.leaves(state, is_leaf=is_esgd) if is_esgd(s)]
    if len(found) != 1:
        raise ValueError(
            f"Expected exactly one EntropySGDState inside the optimizer state, found {len(found)}."
        )
    return found[0]


def entropy_sgd_eval_params(state, params):
    """The anchor x, the network to evaluate and checkpoint, in either mode.

    In scan mode (:func:`entropy_sgd`, :func:`scale_by_entropy_sgd`) the
    params the loop holds are x; in stepwise mode they are the walker x′ and
    x lives in the state. ``state`` may be the Entropy-SGD state or any
    Optax state containing exactly one (e.g. from ``optax.chain``).

    The argument order is optax's (``optax.contrib.schedule_free_eval_params(state,
    params)``).

    Args:
      state: the optimizer state.
      params: the params the training loop holds.

    Returns:
      The anchor x, a pytree like ``params``.

    Example:
      >>> import jax.numpy as jnp, flatjax
      >>> opt = flatjax.entropy_sgd_stepwise(0.1, inner_steps=2, noise=0.0)
      >>> params = jnp.ones(3)
      >>> state = opt.init(params)
      >>> step, state = opt.update(jnp.ones(3), state, params)
      >>> flatjax.entropy_sgd_eval_params(state, params + step)   # x has not moved yet
      Array([1., 1., 1.], dtype=float32)
    """
    esgd = _find_state(state)
    return params if esgd.anchor is None else _cast_like(esgd.anchor, params)


def entropy_sgd_aux(state):
    """The auxiliary value of the last inner step (scan mode with ``has_aux=True``).

    Args:
      state: the Entropy-SGD state, or an Optax state containing exactly one.

    Returns:
      What the last ``grad_fn`` call returned as ``aux`` (``None`` before the
      first update).

    Example:
      >>> import jax, jax.numpy as jnp, flatjax
      >>> f = lambda w, i, n: (jnp.sum(w ** 2), n + 1)     # aux: a call counter
      >>> opt = flatjax.entropy_sgd(0.1, inner_steps=3, has_aux=True)
      >>> w = jnp.ones(2)
      >>> (loss, n), g = jax.value_and_grad(f, has_aux=True)(w, 0, 0)
      >>> _, state = opt.update(g, opt.init(w), w, grad_fn=jax.value_and_grad(f, has_aux=True),
      ...                       value=loss, aux=n)
      >>> int(flatjax.entropy_sgd_aux(state))            # inner steps 0, 1, 2
      3
    """
    return _find_state(state).aux


def entropy_sgd_coupling(state) -> jax.Array:
    """γ_t, the coupling the inner steps of the current outer step use (for logging).

    Args:
      state: the Entropy-SGD state, or an Optax state containing exactly one.

    Returns:
      A float32 scalar (0 during the first outer step when calibrating γ_0).

    Example:
      >>> import jax.numpy as jnp, flatjax
      >>> opt = flatjax.entropy_sgd(0.1, coupling=flatjax.exponential_coupling(0.5, 10))
      >>> float(flatjax.entropy_sgd_coupling(opt.init(jnp.zeros(2))))
      0.5
    """
    return _find_state(state).coupling
