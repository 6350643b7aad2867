"""The hyperparameters of every Entropy-SGD factory: checked once, built once.

:func:`entropy_sgd`, :func:`entropy_sgd_stepwise` and
:func:`scale_by_entropy_sgd` take the same Langevin hyperparameters (L, γ,
η′, ε, α, λ′, β′, the calibration and the clamp); the first two also build
the default outer SGD from (η, β, λ). :func:`make_core` checks all of them
eagerly and returns the :class:`~flatjax._esgd._core.EntropySGDCore` the
drivers run. Numeric hyperparameters may be traced
(``optax.inject_hyperparams``): they are checked when concrete and kept as
given for the computation.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import optax

from flatjax import _stability
from flatjax._esgd._core import EntropySGDCore
from flatjax._esgd._noise import NOISE_GENERATORS
from flatjax._validation import (
    check_choice,
    check_finite,
    check_int,
    check_interval,
    checkable,
    is_real,
    is_traced,
    value_at_zero,
)

__all__ = ["OUTER_SCALES", "INNER_COUPLINGS", "make_core", "derived_signature", "bind"]

OUTER_SCALES = ("coupling", "gradient", "none")
INNER_COUPLINGS = ("gradient", "update")


def make_core(hparams: Mapping[str, Any]) -> EntropySGDCore:
    """Checks a factory's arguments (its ``locals()``) and builds the core.

    With ``learning_rate`` among them (:func:`entropy_sgd`, stepwise) the outer
    optimizer is the default outer SGD or ``outer_optimizer``; without it
    (:func:`scale_by_entropy_sgd`) ``outer_optimizer`` or the identity. With
    ``unroll`` among them (scan mode) ``unroll``, ``has_aux`` and ``aux_init``
    are checked too.
    """
    h = hparams
    if "learning_rate" in h:
        outer = _outer_sgd(h["learning_rate"], h["momentum"], h["nesterov"], h["weight_decay"],
                           h["outer_optimizer"])
    elif h["outer_optimizer"] is None:
        outer = optax.identity()
    else:
        outer = optax.with_extra_args_support(h["outer_optimizer"])
    if "unroll" in h:
        _check_scan(h["unroll"], h["has_aux"], h["aux_init"])
    return _langevin_core(outer, **{
        name: h[name] for name in (
            "inner_steps", "coupling", "inner_learning_rate", "noise", "average_weight",
            "inner_weight_decay", "inner_momentum", "inner_nesterov", "inner_optimizer",
            "inner_coupling", "outer_scale", "calibrate_coupling", "calibration_step",
            "max_coupling", "clamp_fraction", "seed", "noise_generator",
        )
    })


def derived_signature(
    signature: inspect.Signature, *, without=(), defaults: Mapping[str, Any] | None = None
) -> inspect.Signature:
    """``signature`` without the parameters named in ``without``, with new ``defaults``.

    The factories that share :func:`entropy_sgd`'s hyperparameters take its
    signature this way, so each name and default is written once.
    """
    defaults = defaults or {}
    return signature.replace(parameters=[
        p.replace(default=defaults.get(p.name, p.default))
        for p in signature.parameters.values() if p.name not in without
    ])


def bind(signature: inspect.Signature, name: str, args, kwargs) -> dict[str, Any]:
    """The arguments of a call ``name(*args, **kwargs)`` by name, defaults applied."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{name}() {e}") from None
    bound.apply_defaults()
    return bound.arguments


def _langevin_core(
    outer_optimizer, *, inner_steps, coupling, inner_learning_rate, noise, average_weight,
    inner_weight_decay, inner_momentum, inner_nesterov, inner_optimizer, inner_coupling,
    outer_scale, calibrate_coupling, calibration_step, max_coupling, clamp_fraction, seed,
    noise_generator,
) -> EntropySGDCore:
    check_int("inner_steps (L)", inner_steps, minimum=1, static=True)
    coupling_fn = _coupling_fn(coupling, calibrate_coupling)
    check_finite("inner_learning_rate (η′)", checkable(inner_learning_rate, 0.1), strict=True)
    check_finite("noise (ε)", checkable(noise, 0.0))
    check_interval("average_weight (α)", checkable(average_weight, 0.5))
    check_finite("inner_weight_decay (λ′)", checkable(inner_weight_decay, 0.0))
    check_interval("inner_momentum", checkable(inner_momentum, 0.0))
    check_choice("inner_coupling", inner_coupling, INNER_COUPLINGS)
    check_choice("outer_scale", outer_scale, OUTER_SCALES)
    if not isinstance(calibration_step, numbers.Integral) or isinstance(
        calibration_step, bool
    ) or calibration_step < 0:
        raise ValueError(
            f"calibration_step (gtime) must be an int >= 0, got {calibration_step!r}."
        )
    check_finite("max_coupling", checkable(max_coupling, 1.0), strict=True, optional=True)
    check_interval("clamp_fraction", checkable(clamp_fraction, 0.5), "(0, 1]")
    check_int("seed", seed)
    check_choice("noise_generator", noise_generator, NOISE_GENERATORS)
    if inner_optimizer is None:
        # The momentum buffer is always there (a momentum of 0 is plain SGD),
        # so the state's structure does not depend on the values.
        inner_optimizer = optax.chain(
            optax.add_decayed_weights(inner_weight_decay),
            optax.sgd(inner_learning_rate, momentum=inner_momentum,
                      nesterov=bool(inner_nesterov)),
        )
    if inner_coupling == "update" and _stability.sgd_type(inner_optimizer) is False:
        raise ValueError(
            "inner_coupling='update' adds −η′γ(x′ − x) after the inner optimizer and needs "
            "an SGD-type inner optimizer whose rate can be read from it; use the default "
            "inner optimizer or inner_coupling='gradient'."
        )
    return EntropySGDCore(
        outer_optimizer=outer_optimizer,
        # The outer step is SGD on −F with the rate η (outer_scale 'coupling' or
        # 'gradient'); −F's Hessian γI − γ²Cov is at most γ, so it is stable
        # for every loss while ηγ is below the outer optimizer's bound.
        outer_usable=outer_scale != "none" and _stability.can_measure(outer_optimizer),
        inner_optimizer=optax.with_extra_args_support(inner_optimizer),
        raw_inner=inner_optimizer,
        inner_usable=_stability.can_measure(inner_optimizer),
        # η′ of the inner optimizer, read once (traceable): the 'update' pull's rate.
        inner_eta=(
            _stability.learning_rate_at(inner_optimizer, 0) if inner_coupling == "update" else None
        ),
        inner_steps=int(inner_steps),
        coupling_fn=coupling_fn,
        add_noise=is_traced(noise) or checkable(noise, 0.0) > 0,
        noise_std=noise * jnp.sqrt(2.0 * jnp.asarray(inner_learning_rate)),
        average_weight=average_weight,
        inner_coupling=inner_coupling,
        outer_scale=outer_scale,
        calibrate=bool(calibrate_coupling),
        calibration_step=int(calibration_step),
        max_coupling=max_coupling,
        clamp_fraction=clamp_fraction,
        seed=int(seed),
        noise_generator=noise_generator,
    )


def _coupling_fn(coupling, calibrate: bool):
    """``count -> γ(count)`` in float32 from a float or a schedule, checked at step 0."""
    value = checkable(coupling, 1.0)
    if is_real(value):
        check_finite("coupling (γ)", value)
        coupling_fn = lambda count: jnp.full((), coupling, jnp.float32)
        value = float(value)
    elif callable(value):
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
    if calibrate and not value > 0:
        raise ValueError(
            "calibrate_coupling=True rescales the coupling so that γ matches the "
            f"calibrated γ_0 at step 0; it needs coupling(0) > 0, got {value}."
        )
    return coupling_fn


def _outer_sgd(learning_rate, momentum, nesterov, weight_decay, outer_optimizer):
    """The outer optimizer: ``outer_optimizer``, or the default outer SGD (η, β, λ)."""
    if outer_optimizer is not None:
        if learning_rate is not None:
            raise ValueError(
                "Give either learning_rate (the default outer SGD) or outer_optimizer, "
                f"not both; got learning_rate={learning_rate!r} and an outer_optimizer."
            )
        return optax.with_extra_args_support(outer_optimizer)
    if learning_rate is None:
        raise ValueError("learning_rate (η, outer step) is required without outer_optimizer.")
    lr = checkable(learning_rate, 0.1)
    if not is_real(lr) and not callable(lr):
        raise TypeError(
            f"learning_rate (η) must be a number or an Optax schedule, got {learning_rate!r}."
        )
    if is_real(lr):
        check_finite("learning_rate (η)", lr, strict=True)
    check_interval("momentum", checkable(momentum, 0.0))
    check_finite("weight_decay", checkable(weight_decay, 0.0))
    # Weight decay and momentum buffer always present: the state's structure
    # does not depend on the values (a decay or momentum of 0 changes nothing).
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=momentum, nesterov=bool(nesterov)),
    )


def _check_scan(unroll, has_aux, aux_init) -> None:
    ok = unroll == "auto" or isinstance(unroll, bool) or (
        isinstance(unroll, numbers.Integral) and unroll >= 1
    )
    if not ok:
        raise ValueError(f"unroll must be 'auto', a bool or an int >= 1, got {unroll!r}.")
    if aux_init is not None and not has_aux:
        raise ValueError("aux_init is the initial state.aux of has_aux=True; set has_aux=True.")
