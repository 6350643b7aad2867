"""Entropy-SGD in the training library: the optimizer, the step and the network it evaluates.

Entropy-SGD (Chaudhari et al., ICLR 2017; Pittorino et al., ICLR 2021)
minimises the local entropy with L inner Langevin steps of a walker x′
around an anchor x, then moves the anchor towards the walkers' running
average μ. Two ways to run it:

* ``esgd.mode='scan'``: one training step is one outer step, L stacked
  minibatches ``[L, B, ...]``, L gradient evaluations, run as ONE ``update``
  of :func:`flatjax.entropy_sgd` (``has_aux=True``) with ``grad_fn(walker, i,
  aux)`` picking minibatch i. The aux (:func:`esgd_scan_aux`) carries the
  training metrics of the L minibatches and, for BatchNorm models with
  ``esgd.batch_norm='walker'`` (the authors' code: running statistics keep
  updating at the walker), the statistics; ``'anchor'`` updates them by one
  forward pass at the new anchor (on minibatch L−1).
* ``esgd.mode='stepwise'``: one training step is one Langevin step, one
  minibatch, through an unmodified ``state.apply_gradients``
  (:func:`flatjax.entropy_sgd_stepwise`); the outer step lands every L-th.

The network of the run is the anchor x (:func:`flatjax.entropy_sgd_eval_params`).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import optax

import flatjax
from flatjax._esgd._noise import NOISE_GENERATORS
from flatjax._esgd._state import _find_state
from flatjax._stability import stable_coupling_step
from flatjax.training import _checks
from flatjax.training.algorithms import _common
from flatjax.training.algorithms.base import Algorithm, StepCost

__all__ = ["EntropySGD", "esgd_scan_aux"]


def esgd_scan_aux(batch_stats):
    """The value Entropy-SGD's scan step threads through its inner steps.

    ``(batch statistics, Σ loss, Σ error %, max ‖g‖)`` over the inner
    minibatches: the walker's BatchNorm statistics ('walker' mode; carried
    unchanged otherwise) and the training metrics of the L gradient
    evaluations, so no forward pass is repeated for them. The optimizer
    state holds it from step 0 (its structure never changes).
    """
    zero = jnp.zeros((), jnp.float32)
    return (batch_stats, zero, zero, zero)


def _check_coupling_max(esgd) -> None:
    """esgd.coupling_max is an absolute bound on γ: it must not be below a fixed γ_0."""
    if esgd.coupling_max is None:
        return
    if esgd.coupling is not None and esgd.coupling_max < esgd.coupling:
        raise ValueError(
            f"config.esgd.coupling_max = {esgd.coupling_max!r} is below the initial coupling "
            f"config.esgd.coupling = {esgd.coupling!r}; the coupling grows from esgd.coupling "
            "up to esgd.coupling_max, so expected coupling_max >= coupling (or None: no cap)."
        )


def _check_inner_step(config) -> None:
    """Warns when η′ · γ_max reaches the inner step's bound b′ (γ will be clamped)."""
    esgd = config.esgd
    peaks = []
    if esgd.coupling is not None:
        peaks.append(float(esgd.coupling) * float(esgd.coupling_factor))
    if esgd.coupling_max is not None:
        peaks.append(float(esgd.coupling_max))
    if not peaks:
        return  # γ_0 is calibrated at run time; the run's stability clamp bounds γ
    gamma_max = min(peaks)
    eta = float(esgd.inner_learning_rate)
    decay = esgd.inner_weight_decay if esgd.inner_weight_decay is not None else config.weight_decay
    bound = float(stable_coupling_step(float(esgd.inner_momentum), True))
    if eta * (gamma_max + float(decay)) >= bound:
        # The transform clamps γ at run time (clamp_fraction of this bound), so the
        # run is stable, but not at the coupling the config asks for: say so.
        warnings.warn(
            f"config.esgd: the inner Langevin step would be unstable at the largest coupling "
            f"and γ will be clamped: "
            f"η′ · (γ_max + λ′) = {eta:g} · ({gamma_max:g} + {float(decay):g}) = "
            f"{eta * (gamma_max + float(decay)):.4g}, but the inner SGD step (Nesterov "
            f"β′ = {float(esgd.inner_momentum):g}) is stable only below {bound:.4g}. Lower "
            "esgd.inner_learning_rate, esgd.coupling or esgd.coupling_factor, or set "
            f"esgd.coupling_max below {bound / eta - float(decay):.4g}.",
            RuntimeWarning,
            stacklevel=4,
        )


def _requested_coupling(opt_state):
    return _find_state(opt_state).requested_coupling


class EntropySGD(Algorithm):
    """Entropy-SGD, scan or stepwise mode (``config.esgd``)."""

    name = "entropy_sgd"
    label = "Entropy-SGD"

    def validate(self, config):
        _checks.positive(config, "esgd.inner_steps", integer=True)
        _checks.positive(config, "esgd.inner_learning_rate")
        _checks.positive(config, "esgd.noise", allow_zero=True)
        _checks.unit_interval(config, "esgd.average")
        _checks.positive(config, "esgd.inner_weight_decay", allow_zero=True, allow_none=True)
        _checks.unit_interval(config, "esgd.inner_momentum")
        _checks.positive(config, "esgd.coupling", allow_none=True)
        _checks.positive(config, "esgd.calibration_step", integer=True, allow_zero=True)
        _checks.choice(config, "esgd.outer_scale", ("coupling", "gradient", "none"))
        _checks.at_least_one(config, "esgd.coupling_factor")
        _checks.positive(config, "esgd.coupling_max", allow_none=True)
        _check_coupling_max(config.esgd)
        _checks.choice(config, "esgd.mode", ("scan", "stepwise"))
        _checks.choice(config, "esgd.noise_generator", NOISE_GENERATORS)
        _checks.choice(config, "esgd.batch_norm", ("walker", "anchor"))
        _check_inner_step(config)

    def step_cost(self, config, data_steps_per_epoch):
        spe, big_l = float(data_steps_per_epoch), int(config.esgd.inner_steps)
        gradients = config.budget == "gradients"
        if config.esgd.mode == "scan":
            return StepCost(spe / big_l if gradients else spe, big_l)
        return StepCost(spe if gradients else spe * big_l, 1, 1.0 / big_l)

    def batch_layout(self, config):
        return "stacked" if config.esgd.mode == "scan" else "batch"

    def batch_shape(self, config):
        return {"stack": int(config.esgd.inner_steps)} if config.esgd.mode == "scan" else {}

    def make_optimizer(self, config, plan, hparams):
        e = config.esgd
        calibrate = e.coupling is None
        coupling = flatjax.exponential_coupling(
            1.0 if calibrate else e.coupling, plan.total_outer_steps, e.coupling_factor
        )
        stepwise = e.mode == "stepwise"
        factory = (flatjax.entropy_sgd_stepwise if stepwise
                   else functools.partial(flatjax.entropy_sgd, has_aux=True))
        inner_wd = config.weight_decay if e.inner_weight_decay is None else e.inner_weight_decay
        return factory(
            _common.lr_schedule(config, plan.total_outer_steps),
            e.inner_steps,
            coupling,
            inner_learning_rate=e.inner_learning_rate,
            noise=e.noise,
            noise_generator=e.noise_generator,
            average_weight=e.average,
            inner_weight_decay=inner_wd,
            inner_momentum=e.inner_momentum,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
            outer_scale=e.outer_scale,
            seed=config.seed,
            calibrate_coupling=calibrate,
            calibration_step=e.calibration_step,
            max_coupling=e.coupling_max,
        )

    def init_opt_state(self, config, tx, params, batch_stats):
        opt_state = tx.init(params)
        if config.esgd.mode == "scan":
            opt_state = opt_state._replace(aux=esgd_scan_aux(batch_stats))
        return opt_state

    def make_step(self, config):
        if config.esgd.mode == "scan":
            return _scan_step(config)
        return _stepwise_step(config)

    def eval_params(self, state):
        return flatjax.entropy_sgd_eval_params(state.opt_state, state.params)


def _scan_step(config):
    num_inner = int(config.esgd.inner_steps)
    walker_mode = config.esgd.batch_norm == "walker"
    policy = config.nan_policy

    def step(state, batches):
        state0 = state
        state, key = _common.split_key(state)
        keys = jax.random.split(key, num_inner)
        pick = lambda i: jax.tree.map(lambda a: a[i], batches)
        carry_stats = bool(state.batch_stats) and walker_mode

        def gradient(params, stats, i, aux):
            """One inner gradient; aux (esgd_scan_aux) accumulates stats and metrics."""
            (loss, (error, new_stats)), grads = _common.value_and_grad(
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
            stats = _common.forward_stats(
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
            "requested_coupling": _requested_coupling(new.opt_state),
        }
        return _common.guard(state0, new, metrics, policy)

    return step


def _stepwise_step(config):
    anchor = None
    if config.esgd.batch_norm == "anchor":
        # The statistics follow the anchor x: one forward pass there per step.
        anchor = lambda new: flatjax.entropy_sgd_eval_params(new.opt_state, new.params)
    return _common.minibatch_step(
        config.nan_policy, pass_value=True, stats_params=anchor,
        coupling=lambda opt_state: (flatjax.entropy_sgd_coupling(opt_state),
                                    _requested_coupling(opt_state)),
    )
