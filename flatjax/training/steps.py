"""One jitted training step for SGD, Entropy-SGD and Replicated-SGD.

:func:`make_train_step` returns ``step(state, batch) -> (state, metrics)``.
What ``batch`` holds and what one step costs:

* SGD: one minibatch ``[B, ...]``; 1 gradient evaluation.
* Entropy-SGD, ``esgd.mode='scan'``: L stacked minibatches ``[L, B, ...]``;
  one outer step, L gradient evaluations, run as ONE ``update`` call of
  :func:`flatjax.entropy_sgd` (``has_aux=True``) with ``grad_fn(walker, i,
  aux)`` picking minibatch i. The aux carries the training metrics of the L
  minibatches and, for BatchNorm models with ``esgd.batch_norm='walker'``
  (the authors' code: running statistics keep updating at the walker during
  the inner steps), the statistics. ``esgd.batch_norm='anchor'`` updates the
  statistics only by a forward pass at the new anchor x (on minibatch L−1).
  Metrics: the mean loss and error of the L minibatches, the largest
  gradient norm.
* Entropy-SGD, ``esgd.mode='stepwise'``: one minibatch ``[B, ...]``; one
  Langevin step through an unmodified ``state.apply_gradients``.
* Replicated-SGD: one minibatch per replica ``[y, B, ...]``; y gradient
  evaluations, per-replica loss and gradient mapped with
  :func:`flatjax.replica_map` (``rsgd.strategy``).

NaN/inf policy (``config.nan_policy``): the step computes a ``finite`` flag
(loss, gradient norm, new params' norm and, for Replicated-SGD, the replicas'
distance to the centre). 'skip' keeps the old params, statistics and
optimizer state where it is False (a ``jnp.where`` inside the jitted step; the
step counter and key still advance so the data stream stays aligned); 'stop'
lets the training loop raise at its next metrics fetch, naming the step and
the metric (:func:`check_finite`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax

from flatjax.training.state import TrainState, esgd_scan_aux

__all__ = ["make_train_step", "cross_entropy", "error_percent", "check_finite", "NonFiniteError"]


def cross_entropy(logits, labels):
    """Mean softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def error_percent(logits, labels):
    """Percentage of examples whose arg-max class is not the label."""
    return 100.0 * jnp.mean(jnp.argmax(logits, -1) != labels)


def _loss_fn(apply_fn, params, batch_stats, batch, key):
    """Training-mode loss; returns (loss, (error %, new batch_stats))."""
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


def _anchor_stats(apply_fn, params, batch_stats, batch, key):
    """BatchNorm statistics after one training-mode forward pass at ``params``."""
    if not batch_stats:
        return batch_stats
    return _loss_fn(apply_fn, params, batch_stats, batch, key)[1][1]


class NonFiniteError(FloatingPointError):
    """Raised by the 'stop' NaN policy; names the step and the offending metric."""


_GUARDED = ("loss", "grad_norm", "param_norm", "replica_distance")


def check_finite(metrics: dict, step: int) -> None:
    """Raises :class:`NonFiniteError` if a guarded metric is NaN or inf.

    Args:
      metrics: host-side metrics of one step (floats).
      step: the training step they belong to (1-based: after that step).

    Example:
      >>> from flatjax.training import check_finite
      >>> check_finite({"loss": float("nan"), "grad_norm": 1.0}, step=7)
      Traceback (most recent call last):
      ...
      flatjax.training.steps.NonFiniteError: Training diverged at step 7: loss = nan ...
    """
    for name in _GUARDED:
        if name in metrics and not math.isfinite(float(metrics[name])):
            shown = ", ".join(f"{k} = {float(metrics[k]):.4g}" for k in _GUARDED if k in metrics)
            raise NonFiniteError(
                f"Training diverged at step {step}: {name} = {float(metrics[name])} ({shown}). "
                "Lower the learning rate or bound the coupling (esgd.coupling_max; "
                "rsgd.coupling), or set config.nan_policy='skip' to skip such updates."
            )


def _guard(old: TrainState, new: TrainState, metrics: dict, policy: str):
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


def _split(state: TrainState):
    rng, key = jax.random.split(state.rng)
    return state.replace(rng=rng), key


def _esgd_state(opt_state):
    from flatjax._entropy_sgd import _find_state

    return _find_state(opt_state)


def _sgd_step(config):
    def step(state, batch):
        state0 = state
        state, key = _split(state)
        grad_fn = jax.value_and_grad(_loss_fn, argnums=1, has_aux=True)
        (loss, (error, stats)), grads = grad_fn(
            state.apply_fn, state.params, state.batch_stats, batch, key
        )
        new = state.apply_gradients(grads=grads).replace(batch_stats=stats)
        metrics = {
            "loss": loss,
            "error": error,
            "grad_norm": optax.global_norm(grads),
            "coupling": jnp.zeros((), jnp.float32),
            "requested_coupling": jnp.zeros((), jnp.float32),
        }
        return _guard(state0, new, metrics, config.nan_policy)

    return step


def _esgd_scan_step(config):
    import flatjax

    num_inner = int(config.esgd.inner_steps)
    walker_mode = config.esgd.batch_norm == "walker"

    def step(state, batches):
        state0 = state
        state, key = _split(state)
        keys = jax.random.split(key, num_inner)
        pick = lambda i: jax.tree.map(lambda a: a[i], batches)
        value_and_grad = jax.value_and_grad(_loss_fn, argnums=1, has_aux=True)
        carry_stats = bool(state.batch_stats) and walker_mode

        def gradient(params, stats, i, aux):
            """One inner gradient; aux (esgd_scan_aux) accumulates stats and metrics."""
            (loss, (error, new_stats)), grads = value_and_grad(
                state.apply_fn, params, stats, pick(i), keys[i]
            )
            old_stats, loss_sum, error_sum, norm_max = aux
            aux = (
                new_stats if carry_stats else old_stats,
                loss_sum + loss,
                error_sum + error,
                jnp.maximum(norm_max, optax.global_norm(grads)),
            )
            return (loss, aux), grads

        def grad_fn(walker, i, aux):
            # 'walker' mode: the statistics follow the walker (the authors' code).
            return gradient(walker, aux[0] if carry_stats else state.batch_stats, i, aux)

        # Inner step 0 starts at the anchor: its gradient is the usual one.
        zero = esgd_scan_aux(state.batch_stats)
        (loss0, aux0), grads0 = gradient(state.params, state.batch_stats, 0, zero)
        new = state.apply_gradients(grads=grads0, grad_fn=grad_fn, value=loss0, aux=aux0)
        stats, loss_sum, error_sum, norm_max = flatjax.entropy_sgd_aux(new.opt_state)
        if state.batch_stats and not walker_mode:
            # 'anchor' mode: one forward pass at the new x, on minibatch L−1.
            stats = _anchor_stats(
                state.apply_fn, new.params, state.batch_stats, pick(num_inner - 1), keys[-1]
            )
        # The state's aux restarts from zero sums (its structure never changes).
        opt_state = new.opt_state._replace(aux=esgd_scan_aux(stats))
        new = new.replace(batch_stats=stats, opt_state=opt_state)
        metrics = {
            "loss": loss_sum / num_inner,
            "error": error_sum / num_inner,
            "grad_norm": norm_max,
            "coupling": flatjax.entropy_sgd_coupling(new.opt_state),
            "requested_coupling": _esgd_state(new.opt_state).requested_coupling,
        }
        return _guard(state0, new, metrics, config.nan_policy)

    return step


def _esgd_stepwise_step(config):
    import flatjax

    def step(state, batch):
        state0 = state
        state, key = _split(state)
        value_and_grad = jax.value_and_grad(_loss_fn, argnums=1, has_aux=True)
        (loss, (error, stats)), grads = value_and_grad(
            state.apply_fn, state.params, state.batch_stats, batch, key
        )
        new = state.apply_gradients(grads=grads, value=loss)
        if config.esgd.batch_norm == "anchor":
            anchor = flatjax.entropy_sgd_eval_params(new.opt_state, new.params)
            stats = _anchor_stats(state.apply_fn, anchor, state.batch_stats, batch, key)
        new = new.replace(batch_stats=stats)
        metrics = {
            "loss": loss,
            "error": error,
            "grad_norm": optax.global_norm(grads),
            "coupling": flatjax.entropy_sgd_coupling(new.opt_state),
            "requested_coupling": _esgd_state(new.opt_state).requested_coupling,
        }
        return _guard(state0, new, metrics, config.nan_policy)

    return step


def replica_strategy(config) -> dict:
    """``replica_map`` arguments for ``config``: on a mesh with a sharded replica
    axis the replicas are vmapped with ``spmd_axis_name="replica"``, so that each
    device computes only its own replicas."""
    if int(config.mesh.replica) > 1:
        return {"strategy": "vmap", "spmd_axis_name": "replica"}
    return {"strategy": config.rsgd.strategy}


def _rsgd_step(config):
    import flatjax

    num_replicas = int(config.rsgd.num_replicas)

    def per_replica(apply_fn):
        def fn(params, batch_stats, batch, key):
            value_and_grad = jax.value_and_grad(_loss_fn, argnums=1, has_aux=True)
            (loss, (error, stats)), grads = value_and_grad(
                apply_fn, params, batch_stats, batch, key
            )
            return loss, error, stats, grads

        return fn

    def step(state, batches):
        state0 = state
        state, key = _split(state)
        keys = jax.random.split(key, num_replicas)
        mapped = flatjax.replica_map(per_replica(state.apply_fn), **replica_strategy(config))
        loss, error, stats, grads = mapped(state.params, state.batch_stats, batches, keys)
        new = state.apply_gradients(grads=grads).replace(batch_stats=stats)
        center = flatjax.replica_center(new.params)
        sq = jax.tree.map(lambda w, c: jnp.sum((w - c) ** 2, axis=tuple(range(1, w.ndim))),
                          new.params, center)
        metrics = {
            "loss": loss.mean(),
            "error": error.mean(),
            "grad_norm": optax.global_norm(grads),
            "replica_distance": sum(jax.tree.leaves(sq)).mean(),
            "coupling": jnp.asarray(flatjax.replicate_coupling(new.opt_state), jnp.float32),
            "requested_coupling": new.opt_state.requested_coupling,
        }
        return _guard(state0, new, metrics, config.nan_policy)

    return step


def make_train_step(config: ml_collections.ConfigDict):
    """The jitted training step ``step(state, batch) -> (state, metrics)`` for ``config``.

    ``batch`` is a dict of arrays ``{'image', 'label'}`` shaped as in the
    module docstring (``[B, ...]``; ``[L, B, ...]`` for Entropy-SGD's scan
    mode; ``[y, B, ...]`` for Replicated-SGD). The loss is the mean softmax
    cross-entropy in training mode (BatchNorm batch statistics, dropout with
    a key split from ``state.rng``).

    Args:
      config: a validated config (``algorithm``, ``esgd``, ``rsgd``, ``nan_policy``).

    Returns:
      A jitted function returning the new :class:`TrainState` and a dict of
      scalar metrics: ``loss``, ``error`` (%, on the training minibatch;
      Entropy-SGD scan mode: mean over the inner steps, or at the new anchor
      on minibatch L−1 when run through ``grad_fn``), ``grad_norm`` (largest
      over the inner steps; the norm of the outer update through
      ``grad_fn``), ``param_norm``, ``coupling`` (the applied γ; 0 for SGD),
      ``requested_coupling`` (the schedule's γ: larger than ``coupling`` when
      the stability clamp engaged), ``finite``, and ``replica_distance``
      (mean_a ‖wᵃ − c‖²) for Replicated-SGD.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flatjax.models.mlp import MLPTiny
      >>> from flatjax.training import base_config, create_train_state, make_train_step
      >>> config = base_config()
      >>> state = create_train_state(config, MLPTiny(num_classes=2),
      ...                            {"input_shape": (3,), "num_train": 512},
      ...                            jax.random.PRNGKey(0))
      >>> batch = {"image": jnp.ones((8, 3)), "label": jnp.zeros(8, jnp.int32)}
      >>> state, metrics = make_train_step(config)(state, batch)
      >>> int(state.step), sorted(metrics)  # doctest: +NORMALIZE_WHITESPACE
      (1, ['coupling', 'error', 'finite', 'grad_norm', 'loss', 'param_norm',
           'requested_coupling'])
    """
    if config.algorithm == "sgd":
        step = _sgd_step(config)
    elif config.algorithm == "entropy_sgd":
        step = _esgd_scan_step(config) if config.esgd.mode == "scan" else _esgd_stepwise_step(
            config
        )
    elif config.algorithm == "replicated_sgd":
        step = _rsgd_step(config)
    else:
        raise ValueError(
            "config.algorithm must be one of 'sgd', 'entropy_sgd', 'replicated_sgd', "
            f"got {config.algorithm!r}."
        )
    return jax.jit(step)
