"""The initial coupling that balances the data loss against the elastic term.

References:
  Pittorino et al., Entropic gradient descent algorithms and wide flat minima,
  ICLR 2021, arXiv:2006.07897.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flatjax._rsgd import _axis
from flatjax._validation import check_replica_axis

__all__ = ["balanced_coupling"]


def balanced_coupling(losses, params, *, axis_name=None) -> jax.Array:
    """γ₀ that balances the data term against the coupling at initialisation.

        γ₀ = 2 g₀,     g₀ = mean_a L(wᵃ) / mean_a ‖wᵃ − c‖²,     c = mean_a wᵃ

    the authors' rule (Pittorino et al. 2021, SacredDNN ``robust_dnn.py`` with
    ``g=None``): their coupling is written g‖w − c‖² (no ½) and g₀ makes it
    equal, on average, to the data loss. In flatjax's (γ/2)‖w − c‖² that is
    γ₀ = 2g₀. The authors measure L as the mean training loss over the whole
    training set with the networks in evaluation mode, before training; pass
    those per-replica means as ``losses``.

    Args:
      losses: per-replica losses, shape (y,) (local y under ``axis_name``).
      params: replicated params (leading replica axis of the same size).
      axis_name: named axis the replicas are spread over, or None.

    Returns:
      float32 scalar γ₀ (inf if all replicas coincide).

    Example:
      >>> import jax.numpy as jnp, flatjax
      >>> params = jnp.array([[0.0, 0.0], [2.0, 0.0]])  # ‖wᵃ − c‖² = 1 for both
      >>> float(flatjax.balanced_coupling(jnp.array([1.0, 3.0]), params))  # 2 · 2 / 1
      4.0
    """
    losses = jnp.asarray(losses)
    if losses.ndim != 1:
        raise ValueError(f"losses must have shape (num_replicas,), got shape {losses.shape}.")
    y_local = losses.shape[0]
    check_replica_axis(params, y_local, "params")
    if y_local == 1 and _axis._bound_axis_size(axis_name) is None:
        raise ValueError("balanced_coupling needs y >= 2 replicas: with one, ‖w − c‖² = 0.")
    center = _axis._tree_mean(params, axis_name)
    diff = jax.tree.map(lambda w, c: w - c, params, center)
    mean_loss = jnp.mean(losses.astype(jnp.float32))
    if _axis._bound_axis_size(axis_name) is not None:
        mean_loss = jax.lax.pmean(mean_loss, axis_name)
    distance = _axis._mean_sq_distance(diff, axis_name)
    # Coinciding replicas give inf (documented), also when the losses are 0 (not 0/0 = NaN).
    ratio = 2.0 * mean_loss / jnp.where(distance > 0, distance, 1.0)
    return jnp.where(distance > 0, ratio, jnp.inf)
