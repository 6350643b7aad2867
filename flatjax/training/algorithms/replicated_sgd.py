"""Replicated-SGD in the training library: y coupled replicas, the centre evaluated.

Replicated-SGD (Pittorino et al., ICLR 2021, §3) trains y replicas wᵃ, each
on its own minibatch, coupled to their centre c = (1/y) Σ_a wᵃ with strength
γ(t): the authors' explicit rule adds γ (wᵃ − c) to each replica's gradient
inside its Nesterov momentum (:func:`flatjax.replicated_sgd`). One training
step takes one minibatch per replica ``[y, B, ...]``: y gradient evaluations.

γ_0 is the authors' balanced value when ``rsgd.coupling`` is None:
γ_0 = 2 · mean_a L(wᵃ) / mean_a ‖wᵃ − c‖² at initialisation
(:func:`flatjax.balanced_coupling`), measured on training batches by
:meth:`ReplicatedSGD.measure`, rounded to float32 and kept in the state's
``hparams``, so a resumed or restored run rebuilds the same optimizer from
its checkpoint. γ(t) grows by ``rsgd.coupling_factor`` over the run.

The network of the run is the centre c with the replicas' averaged (or
recomputed) BatchNorm statistics.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flatjax
from flatjax._losses import cross_entropy
from flatjax.training import _checks
from flatjax.training.algorithms import _common
from flatjax.training.algorithms.base import Algorithm, StepCost, float32
from flatjax.training.evaluate import evaluate_replicas

__all__ = ["ReplicatedSGD", "rsgd_weight_decay", "replica_strategy", "untrained_center",
           "MAX_COUPLING_JUMP"]

# One coupling update may multiply γ by at most this before flatjax warns.
MAX_COUPLING_JUMP = 10.0


def rsgd_weight_decay(config) -> float:
    """Each replica's weight decay: ``rsgd.weight_decay``, or y · ``weight_decay``.

    The authors' code multiplies the learning rate by y to undo the 1/y of its
    replica-averaged loss; PyTorch scales the weight decay by the learning rate,
    so each of their replicas decays with y · wd. ``rsgd.weight_decay = None``
    reproduces that.

    Example:
      >>> from flatjax.training import base_config
      >>> from flatjax.training.algorithms.replicated_sgd import rsgd_weight_decay
      >>> rsgd_weight_decay(base_config())  # y = 3, wd = 5e-4
      0.0015
    """
    if config.rsgd.weight_decay is not None:
        return float(config.rsgd.weight_decay)
    return float(config.rsgd.num_replicas * config.weight_decay)


def replica_strategy(config) -> dict:
    """``replica_map`` arguments for ``config``: on a mesh with a sharded replica
    axis the replicas are vmapped with ``spmd_axis_name="replica"``, so that each
    device computes only its own replicas."""
    if int(config.mesh.replica) > 1:
        return {"strategy": "vmap", "spmd_axis_name": "replica"}
    return {"strategy": config.rsgd.strategy}


def untrained_center(row: dict, *, margin: float = 5.0) -> str | None:
    """Why a Replicated-SGD centre is not yet a trained network, or ``None``.

    The centre c = mean of the replicas is the network Replicated-SGD
    evaluates, but early in training, before the coupling has pulled the
    replicas together, it is an average of unrelated networks whose error is
    far above theirs (and whose flatness means nothing). It is flagged when
    its error exceeds the replicas' mean error by more than ``margin`` points
    and by more than half of it.

    Args:
      row: a metrics row or ``final.json`` with ``<split>_error`` and
        ``<split>_replica_error`` (a list, one per replica).
      margin: the tolerated excess in percentage points.

    Returns:
      A one-line explanation, or ``None`` when the centre is trained (or the
      row has no replica errors).

    Example:
      >>> from flatjax.training.algorithms.replicated_sgd import untrained_center
      >>> untrained_center({"test_error": 73.0, "test_replica_error": [9.0, 11.0]})[:40]
      'The Replicated-SGD centre has test error'
      >>> untrained_center({"test_error": 4.0, "test_replica_error": [4.5, 5.0]}) is None
      True
    """
    for key, replicas in row.items():
        if not key.endswith("_replica_error") or not isinstance(replicas, (list, tuple)):
            continue
        split = key[: -len("_replica_error")]
        center = row.get(f"{split}_error")
        if center is None or not replicas:
            continue
        mean = sum(float(r) for r in replicas) / len(replicas)
        if float(center) > mean + margin and float(center) > 1.5 * mean:
            return (
                f"The Replicated-SGD centre has {split} error {float(center):.1f} % against its "
                f"replicas' {mean:.1f} %: it is not yet a trained network (the replicas have not "
                "converged to a common region), so its error and flatness are not results. Train "
                "longer or raise the coupling; final.json marks it center_trained = false."
            )
    return None


def _check_jump(config) -> None:
    """Warns when rsgd.coupling_per='epoch' makes γ jump by a large factor at once."""
    rsgd = config.rsgd
    if rsgd.coupling_per != "epoch":
        return
    epochs = float(config.num_epochs)
    if config.budget == "gradients":
        epochs /= int(rsgd.num_replicas)
    if epochs < 1:
        return  # the one update lands at the end of the run, after the last step
    updates = math.floor(epochs)
    if rsgd.coupling_schedule == "exponential":
        jump = float(rsgd.coupling_factor) ** (1.0 / updates)
    else:  # linear and cosine: the first update is the largest relative jump
        jump = 1.0 + (float(rsgd.coupling_factor) - 1.0) / updates
    if jump > MAX_COUPLING_JUMP:
        warnings.warn(
            f"config.rsgd.coupling_per = 'epoch' with coupling_factor = "
            f"{rsgd.coupling_factor:g} over {epochs:g} epochs multiplies γ by {jump:.3g} in "
            "one step; the stability clamp of the explicit coupling step caps it, but the "
            "replicas are yanked together. Use rsgd.coupling_per = 'step' for a smooth ramp.",
            UserWarning,
            stacklevel=4,
        )


def _coupling_schedule(config, plan, init_value: float):
    per_step = config.rsgd.coupling_per == "step"
    every = 1 if per_step else max(1, min(plan.total_steps, plan.data_steps_per_epoch))
    schedule = {
        "exponential": flatjax.exponential_coupling,
        "linear": flatjax.linear_coupling,
        "cosine": flatjax.cosine_coupling,
    }[config.rsgd.coupling_schedule]
    return schedule(
        init_value, plan.total_steps, config.rsgd.coupling_factor, steps_per_update=every
    )


def balanced_coupling_on(apply_fn, params, batch_stats, batches) -> float:
    """The balanced γ_0 of replicas ``params`` over training ``batches`` (eval mode)."""

    @jax.jit
    def losses_on(batch):
        def loss(p, s):
            variables = {"params": p, **({"batch_stats": s} if s else {})}
            logits = apply_fn(variables, batch["image"], train=False)
            return cross_entropy(logits, batch["label"]) * batch["label"].shape[0]

        return jax.vmap(loss)(params, batch_stats)

    total, count = 0.0, 0
    for batch in batches:
        batch = {k: jnp.asarray(batch[k]) for k in ("image", "label")}
        total = total + losses_on(batch)
        count += int(batch["label"].shape[0])
    if count == 0:
        raise ValueError("balance_batches is empty; the balanced γ_0 needs training batches.")
    return float(flatjax.balanced_coupling(total / count, params))


_center = jax.jit(flatjax.replicate_eval_params)


class ReplicatedSGD(Algorithm):
    """Replicated-SGD with the authors' explicit coupling (``config.rsgd``)."""

    name = "replicated_sgd"
    label = "Replicated-SGD"
    has_replicas = True

    def validate(self, config):
        _checks.positive(config, "rsgd.num_replicas", integer=True)
        _checks.positive(config, "rsgd.coupling", allow_none=True)
        _checks.choice(config, "rsgd.coupling_step", ("explicit", "proximal"))
        _checks.positive(config, "rsgd.weight_decay", allow_zero=True, allow_none=True)
        _checks.positive(config, "rsgd.balance_batches", integer=True, allow_none=True)
        _checks.at_least_one(config, "rsgd.coupling_factor")
        _checks.choice(config, "rsgd.coupling_schedule", ("exponential", "linear", "cosine"))
        _checks.choice(config, "rsgd.coupling_per", ("epoch", "step"))
        _checks.choice(config, "rsgd.strategy", ("auto", "vmap", "unroll"))
        _checks.choice(config, "rsgd.center_batch_stats", ("average", "recompute"))

    def warn(self, config):
        _check_jump(config)

    def step_cost(self, config, data_steps_per_epoch):
        spe, y = float(data_steps_per_epoch), int(config.rsgd.num_replicas)
        return StepCost(spe / y if config.budget == "gradients" else spe, y)

    def batch_layout(self, config):
        return "replicas"

    def batch_shape(self, config):
        return {"num_replicas": int(config.rsgd.num_replicas)}

    def init_variables(self, config, init, rng, dummy):
        return flatjax.init_replicas(init, rng, config.rsgd.num_replicas, dummy)

    def needs_measurement(self, config):
        return config.rsgd.coupling is None

    def measure(self, config, apply_fn, params, batch_stats, batches):
        if config.rsgd.coupling is not None:
            return {}
        if batches is None:
            raise ValueError(
                "rsgd.coupling is None (balanced γ_0): create_train_state needs "
                "balance_batches= (training batches without replica axis) to measure it, "
                "or set config.rsgd.coupling to a number."
            )
        gamma0 = balanced_coupling_on(apply_fn, params, batch_stats, batches)
        return {"coupling": np.float32(gamma0)}

    def placeholder_hparams(self, config):
        return {} if config.rsgd.coupling is not None else {"coupling": np.float32(1.0)}

    def make_optimizer(self, config, plan, hparams):
        r = config.rsgd
        gamma0 = r.coupling if r.coupling is not None else hparams.get("coupling")
        if gamma0 is None:
            raise ValueError(
                "rsgd.coupling is None (balanced γ_0) but no measured coupling was given; "
                "create_train_state measures it from training batches (balance_batches=)."
            )
        return flatjax.replicated_sgd(
            _common.lr_schedule(config, plan.total_steps),
            r.num_replicas,
            _coupling_schedule(config, plan, float32(gamma0) if r.coupling is None
                               else float(gamma0)),
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=rsgd_weight_decay(config),
            coupling_step=r.coupling_step,
        )

    def make_step(self, config):
        num_replicas = int(config.rsgd.num_replicas)
        strategy = replica_strategy(config)
        policy = config.nan_policy

        def per_replica(apply_fn):
            def fn(params, batch_stats, batch, key):
                (loss, (error, stats)), grads = _common.value_and_grad(
                    apply_fn, params, batch_stats, batch, key
                )
                return loss, error, stats, grads

            return fn

        def step(state, batches):
            state0 = state
            state, key = _common.split_key(state)
            keys = jax.random.split(key, num_replicas)
            mapped = flatjax.replica_map(per_replica(state.apply_fn), **strategy)
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
            return _common.guard(state0, new, metrics, policy)

        return step

    def eval_params(self, state):
        # Jitted: eagerly, the per-leaf replica means compile one tiny program each.
        return _center(state.opt_state, state.params)

    def needs_stats_batches(self, config):
        return config.rsgd.center_batch_stats == "recompute"

    def eval_batch_stats(self, state, params, center_batch_stats, batches):
        stats = flatjax.average_batch_stats(state.batch_stats)
        if center_batch_stats != "recompute":
            return stats
        if batches is None:
            raise ValueError("center_batch_stats='recompute' needs batches= of training data.")
        apply = functools.partial(state.apply_fn, train=True, mutable=["batch_stats"])
        images = (batch["image"] for batch in batches)
        variables = flatjax.recompute_batch_stats(
            apply, {"params": params, "batch_stats": stats}, images
        )
        return variables["batch_stats"]

    def evaluate_extra(self, state, x, y, *, batch_size):
        replicated = {"params": state.params}
        if state.batch_stats:
            replicated["batch_stats"] = state.batch_stats
        return evaluate_replicas(state.apply_fn, replicated, x, y, batch_size=batch_size)

    def final_facts(self, final):
        why = untrained_center(final)
        if why is not None:
            return {"center_trained": False}, why
        if any(k.endswith("_replica_error") for k in final):
            return {"center_trained": True}, None
        return {}, None
