"""Shared test problems with known answers.

Every test module draws its problems from here, so that a closed form is
written once: a quadratic with a known Hessian, and a tiny MLP classifier on
a synthetic, linearly separable-ish dataset.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class Quadratic(NamedTuple):
    """L(w) = ½ (w − w*)ᵀ H (w − w*) with H symmetric positive definite."""

    hessian: jnp.ndarray
    minimum: jnp.ndarray

    def loss(self, w):
        d = w - self.minimum
        return 0.5 * d @ self.hessian @ d

    def grad(self, w):
        return self.hessian @ (w - self.minimum)


def quadratic(dim: int = 5, seed: int = 0, condition: float = 10.0, centred: bool = True):
    """A random SPD quadratic with eigenvalues spread over [1, condition]."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    eig = np.geomspace(1.0, condition, dim)
    h = (q * eig) @ q.T
    w_star = np.zeros(dim) if centred else rng.normal(size=dim)
    return Quadratic(jnp.asarray(h, jnp.float32), jnp.asarray(w_star, jnp.float32))


class TinyMLP(nn.Module):
    """Two-layer ReLU network, the smallest model with a rescaling symmetry."""

    hidden: int = 16
    num_classes: int = 2

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


def blobs(n: int = 256, dim: int = 8, num_classes: int = 2, seed: int = 0, noise: float = 1.0):
    """Gaussian blobs around random class means: (x float32 [n, dim], y int32 [n])."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes, dim)) * 2.0
    y = rng.integers(0, num_classes, size=n)
    x = means[y] + noise * rng.normal(size=(n, dim))
    return x.astype(np.float32), y.astype(np.int32)


def tiny_mlp_problem(seed: int = 0, n: int = 256, dim: int = 8, hidden: int = 16):
    """(model, params, x, y, loss_fn) for a tiny MLP on blobs.

    ``loss_fn(params, x, y)`` is the mean softmax cross-entropy.
    """
    x, y = blobs(n=n, dim=dim, seed=seed)
    model = TinyMLP(hidden=hidden)
    params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, dim)))["params"]

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    return model, params, jnp.asarray(x), jnp.asarray(y), loss_fn


class TinyBNMLP(nn.Module):
    """TinyMLP with a BatchNorm after the hidden layer (running stats in ``batch_stats``)."""

    hidden: int = 16
    num_classes: int = 2

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(self.hidden)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(self.num_classes)(nn.relu(x))
