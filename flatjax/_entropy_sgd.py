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
    G ← γ_t (x − μ)                            # gradient of −F at x
    x ← x + outer_optimizer(G)

The default inner optimizer is ``chain(add_decayed_weights(λ′), sgd(η′))``,
i.e. x′ ← x′ − η′ (d + λ′ x′) + ε √(2η′) ξ (SPEC.md §2); the default outer
optimizer is SGD with Nesterov momentum 0.9. Both are ordinary Optax
transforms and can be replaced.

Two drivers share ONE Langevin-step function and ONE outer-step function, so
they compute the same thing:

* :func:`entropy_sgd` (scan mode): one ``update`` call is one outer step; the
  L inner steps run as a ``jax.lax.scan`` calling ``grad_fn(walker, i)``.
* :func:`entropy_sgd_stepwise`: one ``update`` call is one Langevin step
  (``updates`` = gradient at the walker, ``params`` = walker); every L-th call
  lands the outer step. An unmodified ``TrainState.apply_gradients`` loop runs
  it; :func:`entropy_sgd_anchor` returns x for evaluation and checkpoints.

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

from flatjax._schedules import value_at_zero

__all__ = [
    "EntropySGDState",
    "entropy_sgd",
    "entropy_sgd_stepwise",
    "scale_by_entropy_sgd",
    "entropy_sgd_anchor",
    "entropy_sgd_coupling",
]

Coupling = float | Callable[[jax.Array], jax.Array]


class EntropySGDState(NamedTuple):
    """State of the Entropy-SGD transforms.

    Attributes:
      count: int32, outer steps done (t); each costs L gradient evaluations.
      inner_count: int32, Langevin steps done in the current outer step
        (stepwise mode; always 0 in scan mode between calls).
      key: PRNG key of the Langevin noise.
      coupling: float32, γ_t used by the inner steps of the current outer step
        (0 during the first outer step when γ_0 is being calibrated).
      coupling_scale: float32, c in γ_t = c · coupling(t): 1, or the factor
        found by the calibration of γ_0 after the first inner loop.
      loss_sum: float32, sum of the inner losses of the current outer step
        (stepwise mode with calibration; else 0).
      anchor: the anchor x (stepwise mode; ``None`` in scan mode, where x is
        the ``params`` the loop holds).
      average: the running average μ of the walker (stepwise mode; ``None`` in
        scan mode).
      inner_state: state of the inner optimizer (stepwise mode; ``None`` in
        scan mode, where it is re-initialised at every outer step).
      outer_state: state of the outer optimizer.
    """

    count: jax.Array
    inner_count: jax.Array
    key: jax.Array
    coupling: jax.Array
    coupling_scale: jax.Array
    loss_sum: jax.Array
    anchor: Any
    average: Any
    inner_state: Any
    outer_state: Any


def _where(cond, on_true, on_false):
    return jax.tree.map(lambda a, b: jnp.where(cond, a, b), on_true, on_false)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_finite(x) -> bool:
    return _is_real(x) and math.isfinite(x)


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
        inner_optimizer,
        calibrate_coupling,
        seed,
    ):
        if not isinstance(inner_steps, numbers.Integral) or isinstance(inner_steps, bool):
            raise TypeError(f"inner_steps (L) must be an int, got {inner_steps!r}.")
        if inner_steps < 1:
            raise ValueError(f"inner_steps (L) must be >= 1, got {inner_steps}.")
        if _is_real(coupling):
            if not math.isfinite(coupling) or not coupling >= 0:
                raise ValueError(f"coupling (γ) must be a finite number >= 0, got {coupling!r}.")
            value = float(coupling)
            coupling_fn = lambda count: jnp.full((), value, jnp.float32)
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
                "calibrate_coupling=True rescales the coupling so that γ_0 matches the "
                f"calibration; it needs coupling(0) > 0, got {value}."
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
        if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}.")
        if inner_optimizer is None:
            inner_optimizer = optax.chain(
                optax.add_decayed_weights(inner_weight_decay),
                optax.sgd(inner_learning_rate, momentum=inner_momentum or None),
            )
        self.outer_optimizer = outer_optimizer
        self.inner_optimizer = optax.with_extra_args_support(inner_optimizer)
        self.inner_steps = int(inner_steps)
        self.coupling_fn = coupling_fn
        self.noise_std = float(noise) * math.sqrt(2.0 * inner_learning_rate)
        self.average_weight = float(average_weight)
        self.calibrate = bool(calibrate_coupling)
        self.seed = int(seed)

    def init_state(self, params, stepwise: bool) -> EntropySGDState:
        _check_float_params(params, "entropy_sgd_stepwise" if stepwise else "entropy_sgd")
        gamma0 = jnp.zeros((), jnp.float32) if self.calibrate else self.coupling_fn(0)
        return EntropySGDState(
            count=jnp.zeros((), jnp.int32),
            inner_count=jnp.zeros((), jnp.int32),
            key=jax.random.PRNGKey(self.seed),
            coupling=gamma0,
            coupling_scale=jnp.ones((), jnp.float32),
            loss_sum=jnp.zeros((), jnp.float32),
            anchor=params if stepwise else None,
            average=params if stepwise else None,
            inner_state=self.inner_optimizer.init(params) if stepwise else None,
            outer_state=self.outer_optimizer.init(params),
        )

    def langevin_step(self, grads, walker, anchor, average, inner_state, key, gamma):
        """One SGLD step of the walker, and the running average: the shared inner step."""
        pulled = jax.tree.map(
            lambda g, w, x: g + gamma.astype(g.dtype) * (w - x), grads, walker, anchor
        )
        steps, inner_state = self.inner_optimizer.update(pulled, inner_state, walker)
        key, noise_key = jax.random.split(key)
        if self.noise_std > 0:
            xi = optax.tree.random_like(noise_key, walker, jax.random.normal)
            steps = jax.tree.map(lambda s, n: s + self.noise_std * n, steps, xi)
        walker = jax.tree.map(lambda w, s: (w + s).astype(w.dtype), walker, steps)
        a = self.average_weight
        average = jax.tree.map(lambda m, w: a * m + (1 - a) * w, average, walker)
        return walker, average, inner_state, key

    def outer_step(self, state, anchor, average, walker, loss_sum):
        """Lands the outer step: calibrates γ_0 if asked, applies G = γ_t (x − μ).

        Returns (anchor updates, new outer state, new coupling_scale, γ_{t+1}).
        """
        scale = state.coupling_scale
        if self.calibrate:
            # γ_0 = loss / (½‖x − x′‖²), the loss averaged over the first inner loop.
            half_sq = 0.5 * optax.tree.norm(optax.tree.sub(anchor, walker), squared=True)
            gamma0 = (loss_sum / self.inner_steps) / jnp.maximum(half_sq, 1e-30)
            calibrated = jnp.where(half_sq > 0, gamma0 / self.coupling_fn(0), scale)
            scale = jnp.where(state.count == 0, calibrated, scale).astype(jnp.float32)
        gamma = scale * self.coupling_fn(state.count)
        g = jax.tree.map(lambda x, m: gamma.astype(x.dtype) * (x - m), anchor, average)
        updates, outer_state = self.outer_optimizer.update(g, state.outer_state, anchor)
        next_gamma = scale * self.coupling_fn(state.count + 1)
        return updates, outer_state, scale, next_gamma


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
    if not _is_real(learning_rate) and not callable(learning_rate):
        raise TypeError(
            f"learning_rate (η) must be a number or an Optax schedule, got {learning_rate!r}."
        )
    if _is_real(learning_rate) and not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate (η) must be a finite number > 0, got {learning_rate!r}.")
    if not _is_real(momentum) or not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
    if not _is_finite(weight_decay) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}.")
    sgd = optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov and momentum > 0)
    if weight_decay > 0:
        return optax.chain(optax.add_decayed_weights(weight_decay), sgd)
    return sgd


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


def _scan_transform(core: _EntropySGD, unroll="auto") -> optax.GradientTransformationExtraArgs:
    def init_fn(params):
        return core.init_state(params, stepwise=False)

    def update_fn(updates, state, params=None, *, grad_fn=None, **extra_args):
        del updates, extra_args
        if grad_fn is None:
            raise ValueError(
                "entropy_sgd's update needs grad_fn=: update(updates, state, params, "
                "grad_fn=f) with f(params, i) -> grads (or (grads, loss) when "
                "calibrate_coupling=True) for inner step i."
            )
        if params is None:
            raise ValueError("entropy_sgd's update needs params (the anchor x).")

        def body(carry, i):
            walker, average, inner_state, key, loss_sum = carry
            out = grad_fn(walker, i)
            if core.calibrate:
                grads, loss = out
                loss_sum = loss_sum + jnp.asarray(loss, jnp.float32)
            else:
                grads = out
            _check_grads(grads, walker, "grad_fn(params, i)")
            walker, average, inner_state, key = core.langevin_step(
                grads, walker, params, average, inner_state, key, state.coupling
            )
            return (walker, average, inner_state, key, loss_sum), None

        carry = (params, params, core.inner_optimizer.init(params), state.key, state.loss_sum)
        (walker, average, _, key, loss_sum), _ = jax.lax.scan(
            body, carry, jnp.arange(core.inner_steps, dtype=jnp.int32),
            unroll=scan_unroll(unroll, core.inner_steps),
        )
        updates, outer_state, scale, next_gamma = core.outer_step(
            state, params, average, walker, loss_sum
        )
        new_state = state._replace(
            count=state.count + 1,
            key=key,
            coupling=next_gamma,
            coupling_scale=scale,
            outer_state=outer_state,
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
        # The first inner step starts exactly at the anchor, not at params ≈ x.
        walker = _where(state.inner_count == 0, state.anchor, params)
        walker, average, inner_state, key = core.langevin_step(
            updates, walker, state.anchor, state.average, state.inner_state, state.key,
            state.coupling,
        )
        loss_sum = state.loss_sum
        if core.calibrate:
            loss_sum = loss_sum + jnp.asarray(value, jnp.float32)

        anchor_updates, outer_state, scale, next_gamma = core.outer_step(
            state, state.anchor, average, walker, loss_sum
        )
        new_anchor = optax.apply_updates(state.anchor, anchor_updates)
        landing = state.inner_count == core.inner_steps - 1
        new_params = _where(landing, new_anchor, walker)
        fresh_inner = core.inner_optimizer.init(new_anchor)
        new_state = EntropySGDState(
            count=state.count + landing.astype(jnp.int32),
            inner_count=jnp.where(landing, 0, state.inner_count + 1).astype(jnp.int32),
            key=key,
            coupling=jnp.where(landing, next_gamma, state.coupling),
            coupling_scale=jnp.where(landing, scale, state.coupling_scale),
            loss_sum=jnp.where(landing, 0.0, loss_sum).astype(jnp.float32),
            anchor=_where(landing, new_anchor, state.anchor),
            average=_where(landing, new_anchor, average),
            inner_state=_where(landing, fresh_inner, inner_state),
            outer_state=_where(landing, outer_state, state.outer_state),
        )
        step = jax.tree.map(lambda n, p: (n - p).astype(p.dtype), new_params, params)
        return step, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _build(mode, learning_rate, inner_steps, coupling, inner_learning_rate, noise,
           average_weight, inner_weight_decay, inner_momentum, momentum, nesterov,
           weight_decay, seed, calibrate_coupling, outer_optimizer, inner_optimizer,
           unroll="auto"):
    outer = _defaults_outer(learning_rate, momentum, nesterov, weight_decay, outer_optimizer)
    core = _EntropySGD(
        outer, inner_steps, coupling, inner_learning_rate, noise, average_weight,
        inner_weight_decay, inner_momentum, inner_optimizer, calibrate_coupling, seed,
    )
    return _scan_transform(core, unroll) if mode == "scan" else _stepwise_transform(core)


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
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    seed: int = 0,
    calibrate_coupling: bool = False,
    unroll: int | bool | str = "auto",
    outer_optimizer: optax.GradientTransformation | None = None,
    inner_optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Entropy-SGD, one outer step per ``update`` call (jitted inner loop).

    One outer step (γ_t = ``coupling`` at outer step t, L = ``inner_steps``):

    .. code-block:: text

        x′ ← x ;  μ ← x
        for l = 0 .. L−1:
            x′ ← x′ − η′ (∇L_l(x′) + γ_t (x′ − x) + λ′ x′) + ε √(2η′) ξ,  ξ ~ N(0, I)
            μ  ← α μ + (1 − α) x′
        x ← x + outer_optimizer(G),  G = γ_t (x − μ)     # SGD, lr η, Nesterov 0.9

    Symbols: η = ``learning_rate``, L = ``inner_steps``, γ = ``coupling``,
    η′ = ``inner_learning_rate``, ε = ``noise``, α = ``average_weight``
    (weight of the OLD average), λ′ = ``inner_weight_decay``. Defaults are
    those of the authors' code, except L, whose per-experiment value in the
    paper is unconfirmed (flatjax uses L = 5), and γ = 0.03 (Chaudhari et
    al.'s default). The outer step is scaled by γ_t (the authors' "gscale"),
    unlike Chaudhari's PyTorch port. The explicit inner step is stable only
    while η′ (γ_t + λ′ + curvature) < 2: when γ grows by a large factor,
    cap it (``max_value`` of the coupling schedules) below about 2/η′.

    Call: ``update(updates, state, params, *, grad_fn)``. ``params`` is the
    anchor x; ``updates`` is ignored; ``grad_fn(walker, i)`` returns the
    minibatch gradient at the walker for inner step i = 0..L−1 (the caller
    closes over L stacked minibatches and picks batch i, as in
    ``optax.contrib.sam(opaque_mode=True)``), or ``(grads, loss)`` when
    ``calibrate_coupling=True``. The L inner steps run as one
    ``jax.lax.scan`` of the same Langevin step :func:`entropy_sgd_stepwise`
    takes; the returned updates move x by one outer step.

    Calibration (``calibrate_coupling=True``): the first inner loop runs with
    γ = 0, then γ_0 = loss / (½ ‖x − x′‖²), with the loss averaged over that
    loop's L minibatches and x′ the final walker, and the whole coupling
    schedule is rescaled by γ_0 / coupling(0) (its shape, and its cap, scale
    with it). If x′ = x exactly (zero gradient, no noise) the coupling is kept.

    BatchNorm: this transform is model-agnostic. Running statistics are
    handled by the training step (``flatjax.training``) in one of two
    documented modes: 'walker' (the authors' code: statistics keep updating
    during the inner steps, carried through a ``lax.scan`` of
    :func:`entropy_sgd_stepwise` updates) or 'anchor' (clean: only a forward
    pass at the anchor x updates them).

    Args:
      learning_rate: η, learning rate of the default outer SGD (float or Optax
        schedule over outer steps); ``None`` when ``outer_optimizer`` is given.
      inner_steps: L >= 1, Langevin steps (gradient evaluations) per outer step.
      coupling: γ >= 0, a float or an Optax schedule over outer steps (e.g.
        :func:`flatjax.exponential_coupling`).
      inner_learning_rate: η′ > 0 of the default inner SGD; it also sets the
        noise standard deviation ε √(2η′).
      noise: ε >= 0, Langevin noise scale.
      average_weight: α in [0, 1), weight of the old value in μ.
      inner_weight_decay: λ′ >= 0, weight decay of the default inner SGD.
      inner_momentum: momentum in [0, 1) of the default inner SGD.
      momentum: momentum in [0, 1) of the default outer SGD.
      nesterov: whether the default outer SGD uses Nesterov momentum.
      weight_decay: weight decay of the default outer SGD (adds it · x to G).
      seed: seed of the PRNG key kept in the state.
      calibrate_coupling: calibrate γ_0 after the first inner loop (above).
      unroll: ``unroll`` of the inner ``lax.scan`` (an int, or True for all L
        steps). ``"auto"`` unrolls all L steps on CPU and keeps the rolled
        loop elsewhere: XLA:CPU runs a rolled loop body markedly slower (five
        LeNet-5 SGD steps in a rolled scan took 2.3× five separate calls on
        this project's CPU, 1.06× unrolled), at a compile time that grows
        with L.
      outer_optimizer: replaces the default outer SGD; it receives G at x.
      inner_optimizer: replaces ``chain(add_decayed_weights(λ′), sgd(η′,
        inner_momentum))``; it receives ∇L(x′) + γ (x′ − x) at the walker x′,
        its state is reset at every outer step, and the noise is added after it.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      :class:`EntropySGDState`.

    Example:
      >>> import jax.numpy as jnp, optax, flatjax
      >>> grad_fn = lambda w, i: 2.0 * w                  # L(w) = ‖w‖²
      >>> opt = flatjax.entropy_sgd(1.0, inner_steps=3, coupling=1.0)
      >>> params = jnp.ones(2)
      >>> state = opt.init(params)
      >>> updates, state = opt.update(None, state, params, grad_fn=grad_fn)
      >>> bool(jnp.all(optax.apply_updates(params, updates) < params))
      True

    References:
      Chaudhari et al., ICLR 2017, arXiv:1611.01838;
      Pittorino et al., ICLR 2021, arXiv:2006.07897.
    """
    _check_unroll(unroll)
    return _build(
        "scan", learning_rate, inner_steps, coupling, inner_learning_rate, noise,
        average_weight, inner_weight_decay, inner_momentum, momentum, nesterov,
        weight_decay, seed, calibrate_coupling, outer_optimizer, inner_optimizer,
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
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    seed: int = 0,
    calibrate_coupling: bool = False,
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
    :func:`entropy_sgd_anchor`, not the params the loop holds. ``value`` (the
    minibatch loss at the walker) is needed only with
    ``calibrate_coupling=True``. The first inner step starts from the anchor
    stored in the state (``params`` there equals it up to rounding).

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
      >>> int(state.count), bool(jnp.all(flatjax.entropy_sgd_anchor(walker, state) < 1.0))
      (1, True)

    References:
      Chaudhari et al., ICLR 2017, arXiv:1611.01838;
      Pittorino et al., ICLR 2021, arXiv:2006.07897.
    """
    return _build(
        "stepwise", learning_rate, inner_steps, coupling, inner_learning_rate, noise,
        average_weight, inner_weight_decay, inner_momentum, momentum, nesterov,
        weight_decay, seed, calibrate_coupling, outer_optimizer, inner_optimizer,
    )


def scale_by_entropy_sgd(
    inner_steps: int = 5,
    coupling: Coupling = 0.03,
    *,
    inner_learning_rate: float = 0.1,
    noise: float = 1e-4,
    average_weight: float = 0.75,
    inner_weight_decay: float = 1e-4,
    inner_momentum: float = 0.0,
    seed: int = 0,
    calibrate_coupling: bool = False,
    inner_optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The Entropy-SGD primitive: returns G = γ_t (x − μ), the gradient of −F at x.

    Same call as :func:`entropy_sgd` (``update(updates, state, params, *,
    grad_fn)``, ``params`` = anchor x) but without an outer optimizer: chain
    it with one, e.g. ``optax.chain(scale_by_entropy_sgd(), optax.sgd(1.0))``.
    The arguments are those of :func:`entropy_sgd`.
    """
    return _scan_transform(
        _EntropySGD(
            optax.identity(), inner_steps, coupling, inner_learning_rate, noise,
            average_weight, inner_weight_decay, inner_momentum, inner_optimizer,
            calibrate_coupling, seed,
        )
    )


def _find_state(state) -> EntropySGDState:
    is_esgd = lambda s: isinstance(s, EntropySGDState)
    found = [s for s in jax.tree.leaves(state, is_leaf=is_esgd) if is_esgd(s)]
    if len(found) != 1:
        raise ValueError(
            f"Expected exactly one EntropySGDState inside the optimizer state, found {len(found)}."
        )
    return found[0]


def entropy_sgd_anchor(params, state):
    """The anchor x, the network to evaluate and checkpoint, in either mode.

    In scan mode (:func:`entropy_sgd`, :func:`scale_by_entropy_sgd`) the
    params the loop holds are x; in stepwise mode they are the walker x′ and
    x lives in the state. ``state`` may be the Entropy-SGD state or any
    Optax state containing exactly one (e.g. from ``optax.chain``).

    Args:
      params: the params the training loop holds.
      state: the optimizer state.

    Returns:
      The anchor x, a pytree like ``params``.

    Example:
      >>> import jax.numpy as jnp, flatjax
      >>> opt = flatjax.entropy_sgd_stepwise(0.1, inner_steps=2, noise=0.0)
      >>> params = jnp.ones(3)
      >>> state = opt.init(params)
      >>> step, state = opt.update(jnp.ones(3), state, params)
      >>> flatjax.entropy_sgd_anchor(params + step, state)   # x has not moved yet
      Array([1., 1., 1.], dtype=float32)
    """
    esgd = _find_state(state)
    return params if esgd.anchor is None else esgd.anchor


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
