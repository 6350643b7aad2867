"""Eager checks of hyperparameters and pytrees, with messages that say what to do.

A bad hyperparameter of an optimizer otherwise fails silently (a negative
coupling that pushes the replicas apart, a momentum of 1 that never decays)
or obscurely (a broadcast between a gradient and a params leaf of another
shape, an integer leaf that rounds every Langevin step away). Each check
raises at construction or at the first ``init``/``update`` with a message
that names the argument, the value given and what is expected.

Values traced under ``jit`` (``optax.inject_hyperparams``) cannot be checked
eagerly: :func:`checkable` turns them into a placeholder, and they are used
as given.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "is_traced",
    "checkable",
    "value_at_zero",
    "is_real",
    "is_finite",
    "check_int",
    "check_finite",
    "check_interval",
    "check_choice",
    "check_nonnegative_or_schedule",
    "check_optimizer",
    "check_float_leaves",
    "check_same_tree",
    "check_replica_axis",
    "leading_size",
]

_STATIC_HINT = " (with optax.inject_hyperparams, list it in static_args)"
_INTERVALS = {
    "[0, 1)": lambda v: 0 <= v < 1,
    "(0, 1]": lambda v: 0 < v <= 1,
}


# ------------------------------------------------------------------ traced values


def is_traced(x) -> bool:
    """Whether ``x`` is a traced value (e.g. a hyperparameter injected by
    ``optax.inject_hyperparams`` inside ``jit``): such values are checked
    when they are concrete and otherwise left to run."""
    return isinstance(x, jax.core.Tracer)


def checkable(x, placeholder):
    """``x`` as a Python number for eager checks, or ``placeholder`` if it is traced.

    0-d concrete arrays become floats (so ``entropy_sgd(jnp.array(0.1))``
    is checked like ``entropy_sgd(0.1)``); other values pass unchanged.
    """
    if is_traced(x):
        return placeholder
    if isinstance(x, (jax.Array, np.ndarray)) and np.ndim(x) == 0:
        return float(x)
    return x


def value_at_zero(schedule):
    """``schedule(0)`` evaluated eagerly, for checks at construction time.

    Optimizers are often built inside a jitted function; evaluating the
    schedule under ``jax.ensure_compile_time_eval`` keeps the check concrete
    there too. Returns ``None`` when the schedule itself closes over traced
    values, where no eager check is possible.
    """
    with jax.ensure_compile_time_eval():
        value = schedule(0)
    if isinstance(value, jax.core.Tracer):
        return None
    return value


# ------------------------------------------------------------------ numbers


def is_real(x) -> bool:
    """A real Python number; ``True``/``False`` are not (``bool`` subclasses ``int``)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def is_finite(x) -> bool:
    return is_real(x) and math.isfinite(x)


def check_int(name: str, value, *, minimum: int | None = None, static: bool = False) -> None:
    """``value`` is an int (not a bool) and, with ``minimum``, at least ``minimum``.

    ``static=True``: the value sets a shape or a loop length, so under
    ``optax.inject_hyperparams`` it must be a static argument; the message says so.
    """
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        hint = _STATIC_HINT if static else ""
        raise TypeError(f"{name} must be an int, got {value!r}{hint}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")


def check_finite(
    name: str, value, *, minimum: float = 0, strict: bool = False, optional: bool = False
) -> None:
    """``value`` is a finite real number >= ``minimum`` (> with ``strict``).

    ``optional=True`` also accepts ``None``.
    """
    if optional and value is None:
        return
    if is_finite(value) and (value > minimum if strict else value >= minimum):
        return
    none = "None or " if optional else ""
    raise ValueError(
        f"{name} must be {none}a finite number {'>' if strict else '>='} {minimum:g}, "
        f"got {value!r}."
    )


def check_interval(name: str, value, interval: str = "[0, 1)") -> None:
    """``value`` is a real number in ``interval``, ``"[0, 1)"`` or ``"(0, 1]"``."""
    if not is_real(value) or not _INTERVALS[interval](value):
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}.")


def check_choice(name: str, value, choices: Sequence[str]) -> None:
    """``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}.")


def check_nonnegative_or_schedule(name: str, value, *, positive: bool = False) -> None:
    """A float or an Optax schedule ``step -> float`` that is >= 0 (> 0) and finite.

    A schedule is checked at step 0. Traced values (``optax.inject_hyperparams``
    under ``jit``), and schedules closing over them, are left to run.
    """
    schedule = callable(value)
    at_zero = value_at_zero(value) if schedule else checkable(value, None)
    if at_zero is None:
        return
    # Strings and bools would pass float(); only numbers (or 0-d arrays) are accepted.
    if isinstance(at_zero, (str, bytes, bool)):
        at_zero = None
    try:
        v = float(at_zero)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be a non-negative float or an Optax schedule step -> float, "
            f"got {value!r}."
        ) from None
    where = " (the schedule's value at step 0)" if schedule else ""
    if not (v > 0 if positive else v >= 0):
        raise ValueError(f"{name} must be {'positive' if positive else '>= 0'}; got {v!r}{where}.")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite; got {v!r}{where}.")


def check_optimizer(name: str, value, *, optional: bool = False) -> None:
    """``value`` is an ``optax.GradientTransformation`` (or ``None`` with ``optional``)."""
    if optional and value is None:
        return
    if not isinstance(value, optax.GradientTransformation):
        none = "None or " if optional else ""
        raise TypeError(f"{name} must be {none}an optax.GradientTransformation, got {value!r}.")


# ------------------------------------------------------------------ pytrees


def check_float_leaves(tree, fn: str, what: str = "params") -> None:
    """Noise and elastic pulls are meaningless on integer leaves: reject them."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(
                f"{fn} needs floating-point params; {what}{jax.tree_util.keystr(path)} has "
                f"dtype {jnp.result_type(leaf)}."
            )


def check_same_tree(tree, params, what: str) -> None:
    """``tree`` matches ``params`` leaf by leaf: a mismatch would broadcast silently."""
    t_def, p_def = jax.tree.structure(tree), jax.tree.structure(params)
    if t_def != p_def:
        raise ValueError(
            f"{what} must have the tree structure of params; got {t_def}, expected {p_def}."
        )
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for path, t, p in zip(paths, jax.tree.leaves(tree), jax.tree.leaves(params), strict=True):
        if jnp.shape(t) != jnp.shape(p):
            raise ValueError(
                f"{what}{jax.tree_util.keystr(path)} has shape {jnp.shape(t)}; the params "
                f"leaf has shape {jnp.shape(p)}."
            )


def leading_size(tree: Any) -> int:
    """The size of the leading axis of ``tree``'s first leaf."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError("expected a pytree with array leaves, got no leaves.")
    shape = jnp.shape(leaves[0])
    if not shape:
        raise ValueError("every leaf needs a leading replica axis; found a scalar leaf.")
    return shape[0]


def check_replica_axis(tree, expected: int, what: str) -> None:
    """Every leaf of ``tree`` has a leading (replica) axis of size ``expected``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not leaves:
        raise ValueError(f"{what} has no array leaves.")
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        if not shape or shape[0] != expected:
            found = "a scalar" if not shape else f"leading axis {shape[0]} (shape {shape})"
            raise ValueError(
                f"{what}{jax.tree_util.keystr(path)} has {found}; every leaf needs a "
                f"leading replica axis of size {expected}."
            )
