r"""Softmax cross-entropy and classification error of a classifier's logits.

For logits f(x) ∈ ℝ^C and an integer class label y ∈ {0, …, C − 1},

.. math::
  ℓ(f(x), y) = −\log \operatorname{softmax}(f(x))_y
             = \log \sum_{k} e^{f(x)_k} − f(x)_y,
  \qquad
  \operatorname{err}(f(x), y) = [\arg\max_k f(x)_k ≠ y].

The per-example functions return ``[batch]`` arrays, the means are averages
over the batch (the error in percent). Cross-entropy is computed in float32
whatever the dtype of the logits (a bfloat16 network is scored in float32).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

__all__ = ["softmax_cross_entropy", "misclassified", "cross_entropy", "error_percent"]


def softmax_cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    r"""Per-example softmax cross-entropy with integer labels.

    .. math::
      ℓ_i = −\log \operatorname{softmax}(z_i)_{y_i},

    with z = ``logits`` ``[batch, classes]`` (cast to float32 first) and y =
    ``labels`` ``[batch]`` integer class indices, computed by optax's
    ``softmax_cross_entropy_with_integer_labels`` (log-sum-exp minus the
    label's logit).

    Args:
      logits: ``[batch, classes]`` unnormalised log-probabilities.
      labels: ``[batch]`` integer labels in ``[0, classes)``.

    Returns:
      ``[batch]`` float32 losses.

    Example:
      >>> import jax.numpy as jnp
      >>> from flatjax._losses import softmax_cross_entropy
      >>> softmax_cross_entropy(jnp.zeros((2, 4)), jnp.array([0, 3]))  # log 4
      Array([1.3862944, 1.3862944], dtype=float32)
    """
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def misclassified(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    r"""Per-example 0/1 error: 1 where the arg-max class is not the label.

    .. math::
      e_i = [\arg\max_k z_{ik} ≠ y_i].

    Args:
      logits: ``[batch, classes]``.
      labels: ``[batch]`` integer labels.

    Returns:
      ``[batch]`` float32 zeros and ones.

    Example:
      >>> import jax.numpy as jnp
      >>> from flatjax._losses import misclassified
      >>> misclassified(jnp.array([[2.0, 1.0], [2.0, 1.0]]), jnp.array([0, 1]))
      Array([0., 1.], dtype=float32)
    """
    return (jnp.argmax(logits, axis=-1) != labels).astype(jnp.float32)


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    r"""Mean softmax cross-entropy over the batch, (1/b) Σᵢ ℓᵢ.

    The mean of :func:`softmax_cross_entropy`.

    Args:
      logits: ``[batch, classes]``.
      labels: ``[batch]`` integer labels in ``[0, classes)``.

    Returns:
      A float32 scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> from flatjax._losses import cross_entropy
      >>> float(cross_entropy(jnp.zeros((3, 2)), jnp.array([0, 1, 1])))  # log 2
      0.6931...
    """
    return jnp.mean(softmax_cross_entropy(logits, labels))


def error_percent(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    r"""Classification error of the batch in percent, (100/b) Σᵢ eᵢ.

    100 times the mean of :func:`misclassified`.

    Args:
      logits: ``[batch, classes]``.
      labels: ``[batch]`` integer labels.

    Returns:
      A float32 scalar in [0, 100].

    Example:
      >>> import jax.numpy as jnp
      >>> from flatjax._losses import error_percent
      >>> logits = jnp.array([[2.0, 1.0], [2.0, 1.0], [0.0, 3.0], [0.0, 3.0]])
      >>> float(error_percent(logits, jnp.array([0, 1, 1, 1])))
      25.0
    """
    return 100.0 * jnp.mean(misclassified(logits, labels))
