"""Test loss and error of a network, of each replica and of the replicas' ensemble.

The network is run in evaluation mode (``train=False``: BatchNorm uses its
running statistics, dropout is off) over a dataset held in memory, in
batches of a fixed size (the last one padded and masked, so each function
compiles once).

For Replicated-SGD the library reports the centre c (the network of the run,
:func:`flatjax.training.eval_variables`), every replica wᵃ, and the
output-averaged ensemble p(k | x) = (1/y) Σ_a softmax(f(x; wᵃ))_k.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from flatjax._losses import misclassified, softmax_cross_entropy

__all__ = ["evaluate", "evaluate_replicas"]


def _log_probs(apply_fn, variables, x):
    return jax.nn.log_softmax(apply_fn(variables, x, train=False))


def _sums(logits, y, mask):
    """Masked sums of the cross-entropy and of the 0/1 error (``flatjax._losses``)."""
    return (jnp.sum(softmax_cross_entropy(logits, y) * mask),
            jnp.sum(misclassified(logits, y) * mask))


@functools.partial(jax.jit, static_argnums=0)
def _eval_batch(apply_fn, variables, x, y, mask):
    return _sums(_log_probs(apply_fn, variables, x), y, mask)


@functools.partial(jax.jit, static_argnums=0)
def _eval_replicas_batch(apply_fn, variables, x, y, mask):
    log_probs = jax.vmap(_log_probs, in_axes=(None, 0, None))(apply_fn, variables, x)
    per_replica = jax.vmap(_sums, in_axes=(0, None, None))(log_probs, y, mask)
    ensemble = jax.nn.logsumexp(log_probs, axis=0) - jnp.log(log_probs.shape[0])
    return per_replica, _sums(ensemble, y, mask)


def _check_inputs(x, y, batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or (
        batch_size < 1
    ):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    if len(x) != len(y):
        raise ValueError(
            f"x and y must hold the same number of examples, got x with {len(x)} and y "
            f"with {len(y)}."
        )
    dtype = y.dtype if hasattr(y, "dtype") else np.asarray(y).dtype
    if not np.issubdtype(dtype, np.integer):
        raise TypeError(f"labels y must be integer class indices, got dtype {dtype}.")


def _check_replicated(variables) -> None:
    leaves = jax.tree_util.tree_leaves_with_path(variables)
    sizes = sorted({np.shape(leaf)[0] if np.ndim(leaf) else None for _, leaf in leaves},
                   key=str)
    if len(sizes) != 1 or sizes[0] is None:
        found = ", ".join(
            f"{jax.tree_util.keystr(path)}: {tuple(np.shape(leaf))}" for path, leaf in leaves[:4]
        )
        raise ValueError(
            "evaluate_replicas needs variables with a leading replica axis of one size y on "
            f"every leaf; found leading sizes {sizes} (shapes {found}"
            f"{', ...' if len(leaves) > 4 else ''}). For one network use evaluate."
        )


def _batches(x, y, batch_size):
    _check_inputs(x, y, batch_size)
    n = len(y)
    if n == 0:
        raise ValueError("Cannot evaluate on an empty dataset.")
    size = min(int(batch_size), n)
    for start in range(0, n, size):
        xb, yb = x[start : start + size], y[start : start + size]
        pad = size - len(yb)
        mask = np.ones(size, np.float32)
        if pad:
            xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros(pad, yb.dtype)])
            mask[size - pad :] = 0.0
        yield xb, yb, mask


def evaluate(apply_fn, variables, x, y, *, batch_size: int = 1000) -> dict:
    """Mean cross-entropy and error (%) of one network on ``(x, y)``.

    loss = −(1/n) Σ_i log softmax(f(x_i))_{y_i};  error = (100/n) Σ_i [argmax f(x_i) ≠ y_i].

    Args:
      apply_fn: ``model.apply``, called as ``apply_fn(variables, x, train=False)``.
      variables: ``{'params': ..., 'batch_stats': ...}`` (no replica axis).
      x: inputs [n, ...]; y: int labels [n].
      batch_size: examples per forward pass.

    Returns:
      ``{'loss': float, 'error': float}``.

    Example:
      >>> import jax, numpy as np
      >>> from flatjax.models.mlp import MLPTiny
      >>> from flatjax.training import evaluate
      >>> model = MLPTiny(num_classes=2)
      >>> variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 3)))
      >>> x, y = np.ones((5, 3), np.float32), np.zeros(5, np.int32)
      >>> out = evaluate(model.apply, variables, x, y, batch_size=2)
      >>> out["error"] in (0.0, 100.0)
      True
    """
    loss = error = 0.0
    for xb, yb, mask in _batches(x, y, batch_size):
        s_loss, s_err = _eval_batch(apply_fn, variables, xb, yb, mask)
        loss, error = loss + float(s_loss), error + float(s_err)
    return {"loss": loss / len(y), "error": 100.0 * error / len(y)}


def evaluate_replicas(apply_fn, variables, x, y, *, batch_size: int = 1000) -> dict:
    """Loss and error (%) of each replica and of the output-averaged ensemble.

    Ensemble: p(k | x) = (1/y) Σ_a softmax(f(x; wᵃ))_k, scored like one network.

    Args:
      apply_fn: ``model.apply``.
      variables: replicated variables (leading replica axis on every leaf).
      x: inputs [n, ...]; y: int labels [n].
      batch_size: examples per forward pass.

    Returns:
      ``{'replica_loss': [y floats], 'replica_error': [y floats],
      'ensemble_loss': float, 'ensemble_error': float}``.

    Example:
      >>> import jax, numpy as np, flatjax
      >>> from flatjax.models.mlp import MLPTiny
      >>> from flatjax.training import evaluate_replicas
      >>> model = MLPTiny(num_classes=2)
      >>> v = flatjax.init_replicas(model.init, jax.random.PRNGKey(0), 3, np.zeros((1, 3)))
      >>> out = evaluate_replicas(model.apply, v, np.ones((4, 3), np.float32),
      ...                         np.zeros(4, np.int32))
      >>> len(out["replica_error"]), sorted(out)[0]
      (3, 'ensemble_error')
    """
    _check_replicated(variables)
    loss = error = 0.0
    ens_loss = ens_error = 0.0
    for xb, yb, mask in _batches(x, y, batch_size):
        (r_loss, r_err), (e_loss, e_err) = _eval_replicas_batch(apply_fn, variables, xb, yb, mask)
        loss, error = loss + np.asarray(r_loss), error + np.asarray(r_err)
        ens_loss, ens_error = ens_loss + float(e_loss), ens_error + float(e_err)
    n = len(y)
    return {
        "replica_loss": [float(v) / n for v in loss],
        "replica_error": [100.0 * float(v) / n for v in error],
        "ensemble_loss": ens_loss / n,
        "ensemble_error": 100.0 * ens_error / n,
    }
