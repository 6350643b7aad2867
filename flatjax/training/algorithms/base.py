"""What the training library needs from an optimizer family: :class:`Algorithm`.

One subclass per algorithm (:mod:`.sgd`, :mod:`.entropy_sgd`,
:mod:`.replicated_sgd`) answers every question the loop, the evaluation and
the results ask: how many training steps an epoch takes and what one costs,
the batch layout of a step, how the parameters are initialised, which
hyperparameters are measured at initialisation (and checkpointed with the
state), the Optax transformation, the un-jitted training step, and which
network is evaluated and saved. The loop looks the algorithm up by
``config.algorithm`` (:func:`flatjax.training.algorithms.get`) and never
branches on its name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import optax

from flatjax.training.algorithms._common import lr_schedule

__all__ = ["Algorithm", "StepCost", "LAYOUTS"]

# Batch layouts of a training step: [B, ...], [L, B, ...] or [y, B, ...].
LAYOUTS = ("batch", "stacked", "replicas")


class StepCost(NamedTuple):
    """What one training step is worth, for :func:`flatjax.training.plan_steps`.

    Attributes:
      steps_per_epoch: training steps per epoch in the unit of
        ``config.num_epochs`` (it depends on ``config.budget``).
      grads_per_step: gradient evaluations per training step.
      outer_steps_per_step: optimizer outer steps per training step (what
        coupling schedules count).
    """

    steps_per_epoch: float
    grads_per_step: int
    outer_steps_per_step: float = 1.0


class Algorithm:
    """The training library's view of one optimizer family (SGD by default).

    Subclasses override what differs. Every method takes the (validated)
    run config; none keeps state of its own.
    """

    name: str = ""
    label: str = ""
    # Whether the state holds replicas with a leading axis y (sharded over "replica").
    has_replicas: bool = False

    # --- configuration ---------------------------------------------------------------

    def validate(self, config: ml_collections.ConfigDict) -> None:
        """Checks this algorithm's section of ``config`` (run for every algorithm)."""

    def warn(self, config: ml_collections.ConfigDict) -> None:
        """Warnings for a run of this algorithm (only for the selected one)."""

    def step_cost(self, config: ml_collections.ConfigDict, data_steps_per_epoch: int) -> StepCost:
        """Training steps per epoch and gradients per step (see ``plan_steps``)."""
        return StepCost(float(data_steps_per_epoch), 1)

    def batch_layout(self, config: ml_collections.ConfigDict) -> str:
        """The layout of one step's batch: one of :data:`LAYOUTS`."""
        return "batch"

    def batch_shape(self, config: ml_collections.ConfigDict) -> dict:
        """Keyword arguments of ``DataSource.train_batches`` for one step's batch."""
        return {}

    # --- state ---------------------------------------------------------------

    def init_variables(self, config, init: Callable, rng: jax.Array, dummy: jax.Array):
        """The model variables the loop holds: ``init(rng, dummy)`` by default."""
        return init(rng, dummy)

    def needs_measurement(self, config: ml_collections.ConfigDict) -> bool:
        """Whether :meth:`measure` needs training batches (a data-dependent γ_0)."""
        return False

    def measure(self, config, apply_fn: Callable, params, batch_stats,
                batches: Iterable[Mapping[str, Any]] | None) -> dict:
        """Hyperparameters measured at initialisation, as float32 scalars.

        They are part of the :class:`~flatjax.training.TrainState`
        (``hparams``) and so of every checkpoint: a resumed run or a
        restored one rebuilds its optimizer from the saved values instead of
        measuring again.
        """
        return {}

    def placeholder_hparams(self, config: ml_collections.ConfigDict) -> dict:
        """Hyperparameters of the right structure, for a restore target (NumPy scalars,
        so that the target can be built abstractly with ``jax.eval_shape``)."""
        return {}

    def learning_rate_fn(self, config, plan) -> Callable[[int], float]:
        """``step -> the (outer) learning rate at training step step``, for the logs."""
        schedule = lr_schedule(config, plan.total_outer_steps)
        if not callable(schedule):
            return lambda step: float(schedule)
        return lambda step: float(schedule(int(step * plan.outer_steps_per_step)))

    def make_optimizer(self, config, plan,
                       hparams: Mapping[str, Any]) -> optax.GradientTransformation:
        """The Optax transformation of the run."""
        raise NotImplementedError

    def init_opt_state(self, config, tx: optax.GradientTransformation, params, batch_stats):
        """``tx.init(params)``, plus whatever the training step threads through it."""
        return tx.init(params)

    def make_step(self, config: ml_collections.ConfigDict) -> Callable:
        """The un-jitted training step ``step(state, batch) -> (state, metrics)``."""
        raise NotImplementedError

    # --- the network of the run -------------------------------------------------------

    def eval_params(self, state):
        """The params evaluated and saved as the network of the run."""
        return state.params

    def eval_batch_stats(self, state, params, center_batch_stats: str, batches):
        """The BatchNorm statistics that go with :meth:`eval_params`."""
        return state.batch_stats

    def needs_stats_batches(self, config: ml_collections.ConfigDict) -> bool:
        """Whether :meth:`eval_batch_stats` needs training batches (recomputed statistics)."""
        return False

    def evaluate_extra(self, state, x, y, *, batch_size: int) -> dict:
        """Evaluation results besides the network's own (per ``<split>_`` prefix)."""
        return {}

    def final_facts(self, final: Mapping[str, Any]) -> tuple[dict, str | None]:
        """Facts added to ``final.json`` and a warning about the final network, if any."""
        return {}, None


def float32(value) -> float:
    """``value`` rounded to float32: what a checkpoint holds, so resumes are exact."""
    return float(np.float32(value))
