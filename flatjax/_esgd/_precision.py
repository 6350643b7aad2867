"""The walker's precision: the Langevin walk is kept at least in float32.

With bfloat16 params a Langevin step of size ε √(2η′) ~ 1e-3 would round
away; the walker, its average, the anchor copy and the noise are therefore
float32 (or wider) whatever the params' dtype, and cast back where the loop
sees them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["where", "widen", "is_low_precision", "cast_like"]


def where(cond, on_true, on_false):
    """Leafwise ``jnp.where`` of two pytrees of the same structure."""
    return jax.tree.map(lambda a, b: jnp.where(cond, a, b), on_true, on_false)


def _wide_dtype(dtype):
    """float32 for bfloat16/float16 leaves: the Langevin walk is kept at least in float32."""
    return jnp.promote_types(dtype, jnp.float32)


def widen(tree):
    """A float32-or-wider copy of ``tree`` (a fresh buffer even when no cast is needed)."""
    return jax.tree.map(lambda x: jnp.array(x, dtype=_wide_dtype(jnp.result_type(x))), tree)


def is_low_precision(tree) -> bool:
    """Whether any leaf of ``tree`` is narrower than float32."""
    return any(
        jnp.finfo(jnp.result_type(x)).bits < 32 for x in jax.tree.leaves(tree)
    )


def cast_like(tree, like):
    """``tree`` cast leaf by leaf to the dtypes of ``like``."""
    return jax.tree.map(lambda a, b: a.astype(jnp.result_type(b)), tree, like)
