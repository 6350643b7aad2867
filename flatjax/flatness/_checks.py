"""Argument checks of the flatness measures.

Each check raises early, naming the argument and the value given, before
anything is traced or compiled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return int(value)


def _check_positive_float(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}.") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return value


def _check_sigmas(sigmas: Any) -> np.ndarray:
    arr = np.asarray(sigmas, dtype=np.float64)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(
            f"sigmas must be a non-empty scalar or 1-D array, got shape {np.shape(sigmas)}."
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"sigmas must be finite, got {arr.tolist()}.")
    if np.any(arr < 0):
        raise ValueError(f"sigmas must be >= 0, got {arr.tolist()}.")
    return arr


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")
    return value


def _check_data(data: Any) -> tuple[jnp.ndarray, jnp.ndarray]:
    if isinstance(data, Mapping):
        if "image" not in data or "label" not in data:
            raise ValueError(f"a dict dataset needs keys 'image' and 'label', got {sorted(data)}.")
        x, y = data["image"], data["label"]
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    else:
        raise TypeError(
            "data must be a pair (x, y) or a dict {'image': x, 'label': y}, "
            f"got {type(data).__name__}."
        )
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.ndim < 1 or y.ndim != 1:
        raise ValueError(
            f"labels y must be 1-D integers and x at least 1-D, got x {x.shape}, y {y.shape}."
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must have the same length, got {x.shape[0]} inputs and {y.shape[0]} labels."
        )
    if x.shape[0] == 0:
        raise ValueError("the dataset is empty (0 examples).")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise TypeError(f"labels y must be integer class indices, got dtype {y.dtype}.")
    return x, y


def _check_variables(variables: Any) -> None:
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError(
            "variables must be a Flax variables dict with a 'params' collection, got "
            f"{type(variables).__name__}"
            + (f" with keys {sorted(variables)}" if isinstance(variables, Mapping) else "")
            + "."
        )


def _check_finite_inputs(x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return
    bad = np.asarray(~jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1))
    if bad.any():
        first = int(np.argmax(bad))
        raise ValueError(
            f"data inputs x contain NaN or inf in {int(bad.sum())} of {bad.size} examples "
            f"(first at index {first}); clean or drop them before measuring."
        )


def _uses_conv(jaxpr) -> bool:
    """Whether a jaxpr, or one nested in it (scan, cond, pjit, ...), has a convolution."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            return True
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns") and _uses_conv(sub):
                    return True
    return False


def _check_labels(apply_fn, variables, x, y) -> bool:
    """Labels must index the logits: 0 ≤ y < C, C read from one trace of ``apply_fn``.

    Returns whether the network has a convolution (from the same trace).
    """
    closed, logits = jax.make_jaxpr(apply_fn, return_shape=True)(variables, x[:1])
    if not hasattr(logits, "shape"):
        raise ValueError(f"apply_fn must return logits [batch, classes], got {logits!r}.")
    if not logits.shape:
        raise ValueError(f"apply_fn must return logits [batch, classes], got shape {logits.shape}.")
    num_classes = int(logits.shape[-1])
    lo, hi = int(jnp.min(y)), int(jnp.max(y))
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"data labels y must be class indices in [0, {num_classes}) for the "
            f"{num_classes} logits of apply_fn, got labels in [{lo}, {hi}]; remap the "
            "labels to 0..C-1 or give the network as many outputs as classes."
        )
    return _uses_conv(closed.jaxpr)


def _check_finite_params(params) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) and not bool(
            jnp.all(jnp.isfinite(leaf))
        ):
            raise ValueError(
                f"variables['params'] contain NaN or inf at {jax.tree_util.keystr(path)}."
            )


def _check_like_params(v: Any, params: Any) -> None:
    """Raises unless ``v`` has the tree structure and leaf shapes of ``params``."""
    v_tree, p_tree = jax.tree.structure(v), jax.tree.structure(params)
    if v_tree != p_tree:
        raise ValueError(
            f"v must have the tree structure and shapes of params; got v with structure "
            f"{v_tree}, params with structure {p_tree}."
        )
    paths = jax.tree_util.tree_leaves_with_path(params)
    for (path, p_leaf), v_leaf in zip(paths, jax.tree.leaves(v), strict=True):
        if jnp.shape(v_leaf) != jnp.shape(p_leaf):
            where = f" at {jax.tree_util.keystr(path)}" if path else ""
            raise ValueError(
                f"v must have the tree structure and shapes of params; v has shape "
                f"{jnp.shape(v_leaf)}{where} where params has shape {jnp.shape(p_leaf)}."
            )


def _check_key(key: Any, what: str) -> None:
    if key is None:
        raise ValueError(f"key is required: pass a jax.random key for {what}.")
