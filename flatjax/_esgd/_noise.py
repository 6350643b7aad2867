"""Langevin noise: standard normals shaped like the params, one draw per step.

The Langevin step adds ε √(2η′) ξ with ξ ~ N(0, I) of the size of all the
params together. One draw per step, split into the leaves, is what keeps
the generator out of every leaf's program; :func:`hash_normal` is a keyed
counter hash that draws it at a fraction of threefry's cost.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["NOISE_GENERATORS", "hash_normal", "normal_like"]

NOISE_GENERATORS = ("hash", "threefry")


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser: a bijective avalanche mix of uint32."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def hash_normal(key, size: int):
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


def normal_like(key, tree, generator: str = "hash"):
    """Standard normals shaped like ``tree``, from ONE draw for all leaves.

    One draw of the total size, split into the leaves: the same distribution
    as a draw per leaf (i.i.d. N(0, 1) entries), at one PRNG computation per
    Langevin step instead of one per leaf, which is what compile time grows
    with (the generator is expanded into every program that draws). The draw
    is float32 and cast to each leaf's dtype. ``generator``: ``"hash"``
    (:func:`hash_normal`) or ``"threefry"`` (``jax.random.normal``).
    """
    leaves, treedef = jax.tree.flatten(tree)
    sizes = [math.prod(jnp.shape(leaf)) for leaf in leaves]
    total = sum(sizes)
    if generator == "hash":
        flat = hash_normal(key, total)
    else:
        flat = jax.random.normal(key, (total,), jnp.float32)
    out, offset = [], 0
    for leaf, size in zip(leaves, sizes, strict=True):
        piece = jax.lax.dynamic_slice_in_dim(flat, offset, size) if size else flat[:0]
        out.append(piece.reshape(jnp.shape(leaf)).astype(jnp.result_type(leaf)))
        offset += size
    return treedef.unflatten(out)
