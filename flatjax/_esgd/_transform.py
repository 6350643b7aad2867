r"""Entropy-SGD in scan mode: one ``update`` call is one outer step.

The L inner Langevin steps run as one ``jax.lax.scan`` calling
``grad_fn(walker, i)`` for a fresh minibatch per step; the returned updates
move the anchor x by one outer step. :func:`scale_by_entropy_sgd` is the
primitive (the inner loop, then an outer transform); :func:`entropy_sgd`
wraps it around the default outer SGD.

References:
  Chaudhari et al., Entropy-SGD: biasing gradient descent into wide valleys,
  ICLR 2017, arXiv:1611.01838.
  Pittorino et al., Entropic gradient descent algorithms and wide flat minima,
  ICLR 2021, arXiv:2006.07897.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from flatjax._esgd._core import EntropySGDCore
from flatjax._esgd._hparams import bind, derived_signature, make_core
from flatjax._esgd._precision import cast_like, widen
from flatjax._validation import check_same_tree

__all__ = ["entropy_sgd", "scale_by_entropy_sgd", "scan_transform", "scan_unroll"]

Coupling = float | Callable[[jax.Array], jax.Array]


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
    noise_generator: str = "irwin_hall",
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
            x′ ← x′ − η′ nesterov_β′(d) + ε √(2η′) ξ,  ξ: i.i.d., mean 0, cov I
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
      noise_generator: the law of ξ. ``"irwin_hall"`` (default): the
        standardised sum of the four bytes of a keyed counter hash
        (MurmurHash3's finaliser, two rounds, keyed by two threefry words per
        step): i.i.d., mean 0, variance 1, zero skew, but bounded (at
        most 3.45 in magnitude) and not Gaussian; matching the normal's
        first three moments keeps the Langevin step's weak order (Kloeden &
        Platen 1992, §14.1), so the walker's averages are those of Gaussian
        noise to first order in η′. ``"hash"``: the same hash through √2 erf⁻¹, i.i.d. N(0, 1);
        ``"threefry"``: ``jax.random.normal``. Measured on a 2-core CPU,
        five draws of the 266,610 entries of an MLP 784-300-100 (fused into
        an update) cost 0.55 ms (``"irwin_hall"``) against 2.6 ms
        (``"hash"``) over a noiseless update.
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
    return scan_transform(make_core(locals()), unroll, bool(has_aux), aux_init)


def scale_by_entropy_sgd(*args, **kwargs) -> optax.GradientTransformationExtraArgs:
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
    those of :func:`entropy_sgd` without the default outer SGD's
    (``learning_rate``, ``momentum``, ``nesterov``, ``weight_decay``), and
    ``outer_scale`` defaults to ``"gradient"``.

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
    hparams = bind(_SCALE_BY_SIGNATURE, "scale_by_entropy_sgd", args, kwargs)
    return scan_transform(make_core(hparams), hparams["unroll"], bool(hparams["has_aux"]),
                          hparams["aux_init"])


# The hyperparameters and defaults of entropy_sgd, without those of its outer SGD.
_SCALE_BY_SIGNATURE = derived_signature(
    inspect.signature(entropy_sgd),
    without=("learning_rate", "momentum", "nesterov", "weight_decay"),
    defaults={"outer_scale": "gradient"},
)
scale_by_entropy_sgd.__signature__ = _SCALE_BY_SIGNATURE


def scan_unroll(unroll, length: int):
    """The ``lax.scan`` ``unroll`` that ``unroll`` means for a loop of ``length`` steps."""
    if unroll == "auto":
        return length if jax.default_backend() == "cpu" else 1
    return unroll


def scan_transform(
    core: EntropySGDCore, unroll="auto", has_aux: bool = False, aux_init=None
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
        anchor = widen(params)

        def inner(carry, grads):
            walker, average, inner_state, key, loss, aux = carry
            walker, average, inner_state, key = core.langevin_step(
                grads, walker, anchor, average, inner_state, key, state.coupling
            )
            return walker, average, inner_state, key, loss, aux

        def body(carry, i):
            walker, average, inner_state, key, loss, aux = carry
            grads, loss, aux = call_grad_fn(grad_fn, cast_like(walker, params), i, aux, loss)
            check_same_tree(grads, walker, "grad_fn(params, i)")
            return inner((walker, average, inner_state, key, loss, aux), grads), None

        carry = (anchor, anchor, core.inner_optimizer.init(anchor), state.key, state.loss, aux)
        first = 0
        if updates is not None:
            # Inner step 0 starts at x′ = x: its gradient is the caller's `updates`
            # (as in optax.contrib.sam's opaque mode), so grad_fn runs L − 1 times.
            check_same_tree(updates, params, "updates")
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
            count=state.count + 1, key=key, coupling=applied, requested_coupling=requested,
            coupling_scale=scale, loss=loss, outer_state=outer_state, aux=aux if has_aux else None,
        )
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

