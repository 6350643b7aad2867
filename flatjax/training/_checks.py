"""Checks of config fields, with messages that name the field, the value and what is expected."""

from __future__ import annotations

import math
import numbers

import ml_collections

__all__ = ["fail", "choice", "positive", "unit_interval", "at_least_one", "lookup"]


def lookup(config: ml_collections.ConfigDict, name: str):
    """``config['a']['b']`` for ``name = 'a.b'``."""
    value = config
    for part in name.split("."):
        value = value[part]
    return value


def fail(name: str, value, expected: str):
    """Raises ``ValueError('config.<name> must be <expected>, got <value>.')``."""
    raise ValueError(f"config.{name} must be {expected}, got {value!r}.")


def choice(config, name: str, choices) -> None:
    """``config.<name>`` is one of ``choices``."""
    value = lookup(config, name)
    if value not in choices:
        fail(name, value, "one of " + ", ".join(repr(c) for c in choices))


def positive(config, name: str, *, integer=False, allow_zero=False, allow_none=False) -> None:
    """``config.<name>`` is a finite number (an integer) > 0 (>= 0; or None)."""
    value = lookup(config, name)
    if value is None and allow_none:
        return
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        what = "an integer" if integer else "a number"
        what += " >= 0" if allow_zero else " > 0"
        fail(name, value, what + (" or None" if allow_none else ""))


def unit_interval(config, name: str) -> None:
    """``config.<name>`` is in [0, 1)."""
    value = lookup(config, name)
    if not 0 <= value < 1:
        fail(name, value, "a number in [0, 1)")


def at_least_one(config, name: str) -> None:
    """``config.<name>`` is a number >= 1 (a growth factor)."""
    value = lookup(config, name)
    if not value >= 1:
        fail(name, value, "a number >= 1")
