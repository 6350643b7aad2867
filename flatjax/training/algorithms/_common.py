"""Pieces the training steps of every algorithm share: the loss, the key split, the NaN guard."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from flatjax._losses import cross_entropy, error_percent

__all__ = ["loss_fn", "value_and_grad", "forward_stats", "guard", "split_key", "lr_schedule",
           "minibatch_step"]


def loss_fn(apply_fn, params, batch_stats, batch, key):
    """Training-mode mean cross-entropy; returns ``(loss, (error %, new batch_stats))``.

    One forward pass gives the loss, the minibatch error and, for BatchNorm
    models, the updated running statistics.
    """
    if batch_stats:
        logits, mutated = apply_fn(
            {"params": params, "batch_stats": batch_stats},
            batch["image"],
            train=True,
            rngs={"dropout": key},
            mutable=["batch_stats"],
        )
        batch_stats = mutated["batch_stats"]
    else:
        logits = apply_fn({"params": params}, batch["image"], train=True, rngs={"dropout": key})
    loss = cross_entropy(logits, batch["label"])
    return loss, (error_percent(logits, batch["label"]), batch_stats)


# ``(loss, (error, batch_stats)), grads`` with respect to the params.
value_and_grad = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)


def forward_stats(apply_fn, params, batch_stats, batch, key):
    """BatchNorm statistics after one training-mode forward pass at ``params``."""
    if not batch_stats:
        return batch_stats
    return loss_fn(apply_fn, params, batch_stats, batch, key)[1][1]


def guard(old, new, metrics: dict, policy: str):
    """Adds ``param_norm`` and ``finite`` to ``metrics``; 'skip' keeps ``old`` where not finite.

    ``finite`` covers the loss, the gradient norm, the new params' norm and,
    when present, the replicas' distance to their centre. The step counter
    and the key still advance on a skipped step, so the data stream stays
    aligned.
    """
    metrics["param_norm"] = optax.global_norm(new.params)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    finite &= jnp.isfinite(metrics["param_norm"])
    if "replica_distance" in metrics:
        finite &= jnp.isfinite(metrics["replica_distance"])
    metrics["finite"] = finite
    if policy == "skip":
        kept = old.replace(step=new.step, rng=new.rng)
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, kept)
    return new, metrics


def split_key(state):
    """``(state with a fresh rng, a key for this step)``."""
    rng, key = jax.random.split(state.rng)
    return state.replace(rng=rng), key


def lr_schedule(config, total_steps: int):
    """The learning rate: constant, or cosine-decayed over ``total_steps``."""
    if config.lr_schedule == "cosine":
        return optax.cosine_decay_schedule(config.learning_rate, total_steps)
    return config.learning_rate


def minibatch_step(policy: str, *, pass_value: bool = False, stats_params=None, coupling=None):
    """One minibatch and one gradient per step: SGD's step, and Entropy-SGD's stepwise one.

    Args:
      policy: ``config.nan_policy``.
      pass_value: give the loss to ``tx.update`` (``value=``; Entropy-SGD's calibration).
      stats_params: ``stats_params(new_state) -> params`` at which the BatchNorm
        statistics are refreshed by one more forward pass (None: keep those of
        the step's own forward pass).
      coupling: ``coupling(opt_state) -> (applied γ, requested γ)`` for the
        metrics (None: 0, no coupling).

    Returns:
      ``step(state, batch) -> (state, metrics)``.
    """

    def step(state, batch):
        state0 = state
        state, key = split_key(state)
        (loss, (error, stats)), grads = value_and_grad(
            state.apply_fn, state.params, state.batch_stats, batch, key
        )
        new = state.apply_gradients(grads=grads, **({"value": loss} if pass_value else {}))
        if stats_params is not None:
            stats = forward_stats(state.apply_fn, stats_params(new), state.batch_stats, batch, key)
        new = new.replace(batch_stats=stats)
        zero = jnp.zeros((), jnp.float32)
        applied, requested = (zero, zero) if coupling is None else coupling(new.opt_state)
        metrics = {
            "loss": loss,
            "error": error,
            "grad_norm": optax.global_norm(grads),
            "coupling": applied,
            "requested_coupling": requested,
        }
        return guard(state0, new, metrics, policy)

    return step
