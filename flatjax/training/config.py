"""The base configuration every experiment starts from, and its validation.

Experiment configs (``flatjax/configs/<name>.py``) call
:func:`base_config` and override only what differs, as in the flax examples.
:func:`validate_config` checks every value eagerly with a message that says
what was given and what is expected; :func:`plan_steps` is the ONE place where
durations in epochs become numbers of training steps.

What a step and an epoch cost (Pittorino et al. 2021, §2-3):

* a *training step* is one call of the jitted step function. SGD: one
  minibatch, 1 gradient. Entropy-SGD, ``esgd.mode='scan'``: one outer step, L
  stacked minibatches, L gradients. Entropy-SGD, ``'stepwise'``: one Langevin
  step, 1 minibatch, 1 gradient (the outer step lands every L-th step).
  Replicated-SGD: one minibatch per replica, y gradients.
* an *epoch* (the unit of ``num_epochs``, ``eval_every_epochs``,
  ``checkpoint_every_epochs``) depends on ``budget``. ``'epochs'``: an epoch
  of the algorithm itself: N/B outer steps for Entropy-SGD (L passes over the
  data, the authors' convention) and N/B steps for Replicated-SGD (one pass
  per replica, y passes in all). ``'gradients'``: N/B gradient evaluations,
  the cost of one SGD epoch, so all algorithms get the same compute
  (Entropy-SGD's outer epochs are divided by L, Replicated-SGD's by y).
"""

from __future__ import annotations

import numbers
import os
from typing import NamedTuple

import ml_collections

from flatjax.training import algorithms
from flatjax.training._checks import choice, fail, positive, unit_interval

__all__ = ["base_config", "validate_config", "plan_steps", "StepPlan"]


def base_config() -> ml_collections.ConfigDict:
    """The defaults: LeNet-5 on the 5k-example MNIST subset, trained with SGD.

    Every field of the shared config contract is present. Optimizer defaults
    are the paper's baseline (SGD, Nesterov 0.9, lr 0.1, weight decay 5e-4,
    batch 128); Entropy-SGD and Replicated-SGD defaults are the authors'
    (L = 5 is flatjax's choice, the paper's per-experiment L is unconfirmed).

    The config is locked: values can be changed but new keys cannot be added
    (a typo'd key raises ``AttributeError`` naming the closest existing key),
    except inside ``model_kwargs``, whose keys are the model's fields.

    Returns:
      A locked ``ml_collections.ConfigDict``.

    Example:
      >>> from flatjax.training import base_config
      >>> config = base_config()
      >>> config.algorithm, config.rsgd.num_replicas, config.esgd.inner_steps
      ('sgd', 3, 5)
      >>> config.learnig_rate = 0.2
      Traceback (most recent call last):
      ...
      AttributeError: ...Did you mean "learning_rate" instead of "learnig_rate"?'
    """
    c = ml_collections.ConfigDict()
    c.dataset = "mnist5k"
    c.data_dir = None
    c.validation_fraction = 0.0
    c.model = "lenet5"
    c.model_kwargs = ml_collections.ConfigDict()
    c.algorithm = "sgd"
    c.batch_size = 128
    c.num_epochs = 10.0
    c.budget = "epochs"
    c.learning_rate = 0.1
    c.lr_schedule = "constant"
    c.momentum = 0.9
    c.nesterov = True
    c.weight_decay = 5e-4
    c.seed = 0
    c.augment = False

    # Entropy-SGD, with the rules of the authors' code (SacredDNN EntropySGD and
    # esgd_dnn.py): Nesterov inner momentum 0.9, the inner weight decay equal to
    # the outer one (None), γ_0 calibrated (None) at outer step `gtime` = 1 from
    # the last inner minibatch's loss, γ growing ×1e4 over the run, and the
    # outer step scaled by γ_t with the weight decay inside it ("gscale").
    # coupling_max is an absolute bound on γ (None: only the stability clamp at
    # half the inner step's bound, see flatjax.entropy_sgd).
    c.esgd = ml_collections.ConfigDict()
    c.esgd.inner_steps = 5
    c.esgd.inner_learning_rate = 0.1
    c.esgd.inner_momentum = 0.9
    c.esgd.noise = 1e-4
    # Law of the Langevin noise (flatjax.entropy_sgd's noise_generator):
    # "irwin_hall" (the normal's first three moments, cheap), "hash" or
    # "threefry" (Gaussian).
    c.esgd.noise_generator = "irwin_hall"
    c.esgd.average = 0.75
    c.esgd.inner_weight_decay = ml_collections.FieldReference(None, field_type=float)
    c.esgd.coupling = ml_collections.FieldReference(None, field_type=float)
    c.esgd.calibration_step = 1
    c.esgd.coupling_factor = 1e4
    c.esgd.coupling_max = ml_collections.FieldReference(None, field_type=float)
    c.esgd.outer_scale = "coupling"
    c.esgd.mode = "scan"
    c.esgd.batch_norm = "walker"

    # Replicated-SGD, with the rules of the authors' code (robust_dnn.py): the
    # coupling inside each replica's Nesterov gradient ("explicit"), γ_0 = 2 g_0
    # balanced on the mean training loss at initialisation (None; over
    # balance_batches training batches, None = one pass over the training set),
    # γ growing ×1e4 once per epoch, and each replica's weight decay y · wd
    # (weight_decay None; their lr × y also scales PyTorch's decay).
    c.rsgd = ml_collections.ConfigDict()
    c.rsgd.num_replicas = 3
    c.rsgd.coupling = ml_collections.FieldReference(None, field_type=float)
    c.rsgd.coupling_step = "explicit"
    c.rsgd.coupling_factor = 1e4
    c.rsgd.coupling_schedule = "exponential"
    c.rsgd.coupling_per = "epoch"
    c.rsgd.weight_decay = ml_collections.FieldReference(None, field_type=float)
    c.rsgd.balance_batches = ml_collections.FieldReference(None, field_type=int)
    c.rsgd.strategy = "auto"
    c.rsgd.center_batch_stats = "average"

    # Device mesh ("replica", "data"): replica × data devices. 1 × 1 runs on one
    # device; larger meshes shard the unchanged step with flatjax.training.shard_train_step
    # (replicas over "replica", each minibatch over "data"; docs/distributed.md).
    c.mesh = ml_collections.ConfigDict()
    c.mesh.replica = 1
    c.mesh.data = 1

    c.eval_every_epochs = 1.0
    c.checkpoint_every_epochs = 1.0
    c.keep_checkpoints = 3
    c.nan_policy = "stop"
    # Under nan_policy='skip', the run fails once more than this fraction of
    # its steps has been skipped (checked at every evaluation and at the end).
    c.max_skipped_fraction = 0.1
    c.progress = True
    # Metrics are fetched from the device every this many steps (one host sync).
    c.log_every_steps = 50
    c.eval_batch_size = 1000

    c.flatness = ml_collections.ConfigDict()
    c.flatness.sigmas = [0.0, 0.01, 0.02, 0.05, 0.1]
    c.flatness.num_draws = 100
    c.flatness.batch_size = 1000
    # Locked: assigning a key that does not exist (a typo such as
    # ``config.learnig_rate``) raises AttributeError instead of being silently
    # unused. ``model_kwargs`` stays open: its keys are the chosen model's fields
    # (``flatjax.models.get_model`` rejects unknown ones).
    c.lock()
    c.model_kwargs.unlock()
    return c


def _check_dataset_name(name: str) -> None:
    from flatjax.data import _catalogue  # lazy: flatjax.data imports tfds and grain

    try:
        _catalogue._spec(name)  # the catalogue's own check (it knows the aliases)
    except ValueError as error:
        raise ValueError(f"config.dataset: {error}") from None


def _check_model_name(name: str) -> None:
    from flatjax.models import MODELS  # lazy: flatjax.models imports flax

    if name not in MODELS:
        raise ValueError(
            f"config.model: unknown model {name!r}; valid names are {sorted(MODELS)}."
        )


def _check_data_dir(config: ml_collections.ConfigDict) -> None:
    """A data_dir other than the default must exist (flatjax would otherwise create it)."""
    data_dir = config.get("data_dir")
    if data_dir is None:
        return
    from flatjax.data import default_data_dir  # lazy: flatjax.data imports tfds and grain

    path = os.path.abspath(os.path.expanduser(os.fspath(data_dir)))
    if path != default_data_dir(None) and not os.path.isdir(path):
        raise ValueError(
            f"config.data_dir = {data_dir!r} does not exist. Point it at the folder that "
            "holds the prepared datasets, or set it to None for the default."
        )


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks the values the training library reads; raises ``ValueError`` on the first bad one.

    Args:
      config: a config built from :func:`base_config`.

    Raises:
      ValueError: naming the field, the value given and what is expected.

    Example:
      >>> from flatjax.training import base_config, validate_config
      >>> config = base_config()
      >>> config.algorithm = "adam"
      >>> validate_config(config)
      Traceback (most recent call last):
      ...
      ValueError: config.algorithm must be one of 'sgd', ... got 'adam'.
    """
    algorithms.get(config.algorithm)  # a valid name
    if not isinstance(config.dataset, str) or not config.dataset:
        fail("dataset", config.dataset, "a dataset name")
    _check_dataset_name(config.dataset)
    if not isinstance(config.model, str) or not config.model:
        fail("model", config.model, "a model name")
    _check_model_name(config.model)
    positive(config, "batch_size", integer=True)
    positive(config, "num_epochs")
    choice(config, "budget", ("epochs", "gradients"))
    positive(config, "learning_rate")
    choice(config, "lr_schedule", ("constant", "cosine"))
    unit_interval(config, "momentum")
    positive(config, "weight_decay", allow_zero=True)
    if not isinstance(config.seed, numbers.Integral):
        fail("seed", config.seed, "an integer")
    unit_interval(config, "validation_fraction")
    positive(config, "mesh.replica", integer=True)
    positive(config, "mesh.data", integer=True)
    positive(config, "eval_every_epochs")
    positive(config, "checkpoint_every_epochs")
    positive(config, "keep_checkpoints", integer=True)
    choice(config, "nan_policy", ("stop", "skip"))
    skipped = config.get("max_skipped_fraction", 0.1)
    if isinstance(skipped, bool) or not isinstance(skipped, numbers.Real) or not 0 <= skipped <= 1:
        fail("max_skipped_fraction", skipped, "a number in [0, 1]")
    positive(config, "log_every_steps", integer=True)
    positive(config, "eval_batch_size", integer=True)
    # Every algorithm's section is checked (a config may switch algorithm
    # later); the warnings are the selected algorithm's only.
    for algorithm in algorithms.ALGORITHMS.values():
        algorithm.validate(config)
    algorithms.get(config.algorithm).warn(config)
    _check_data_dir(config)


class StepPlan(NamedTuple):
    """How many training steps a run takes and what each costs.

    Attributes:
      total_steps: training steps (jitted step calls) of the whole run.
      steps_per_epoch: training steps per epoch, in the unit of
        ``config.num_epochs`` (a float: it may be fractional).
      data_steps_per_epoch: minibatches in one pass over the training set (N/B).
      grads_per_step: gradient evaluations per training step (1, L or y).
      outer_steps_per_step: optimizer outer steps per training step (1, or 1/L
        for Entropy-SGD's stepwise mode).
      eval_every: evaluate every this many steps.
      checkpoint_every: save a checkpoint every this many steps.
    """

    total_steps: int
    steps_per_epoch: float
    data_steps_per_epoch: int
    grads_per_step: int
    outer_steps_per_step: float
    eval_every: int
    checkpoint_every: int

    @property
    def total_outer_steps(self) -> int:
        """Optimizer outer steps of the run (what coupling schedules count)."""
        return max(1, int(round(self.total_steps * self.outer_steps_per_step)))


def plan_steps(config: ml_collections.ConfigDict, data_steps_per_epoch: int) -> StepPlan:
    """Converts the durations of ``config`` (epochs) into training steps.

    With N/B = ``data_steps_per_epoch``, L = ``esgd.inner_steps`` and y =
    ``rsgd.num_replicas``, one epoch is this many training steps:

    ========================  ===========  ==============
    algorithm                 'epochs'     'gradients'
    ========================  ===========  ==============
    sgd                       N/B          N/B
    entropy_sgd, scan         N/B          N/B / L
    entropy_sgd, stepwise     L · N/B      N/B
    replicated_sgd            N/B          N/B / y
    ========================  ===========  ==============

    Args:
      config: a validated config.
      data_steps_per_epoch: minibatches per pass over the training set.

    Returns:
      A :class:`StepPlan`.

    Example:
      >>> from flatjax.training import base_config, plan_steps
      >>> config = base_config()
      >>> config.algorithm, config.budget, config.num_epochs = "entropy_sgd", "gradients", 10
      >>> plan = plan_steps(config, data_steps_per_epoch=100)
      >>> plan.total_steps, plan.grads_per_step, plan.total_steps * plan.grads_per_step
      (200, 5, 1000)
    """
    if not isinstance(data_steps_per_epoch, numbers.Integral) or data_steps_per_epoch < 1:
        raise ValueError(
            "data_steps_per_epoch must be an integer >= 1 (is the training set smaller than "
            f"one batch of {config.batch_size}?), got {data_steps_per_epoch!r}."
        )
    cost = algorithms.get(config.algorithm).step_cost(config, int(data_steps_per_epoch))
    per_epoch = cost.steps_per_epoch

    def steps(epochs):
        return max(1, int(round(epochs * per_epoch)))

    if int(round(config.num_epochs * per_epoch)) < 1:
        raise ValueError(
            f"config.num_epochs = {config.num_epochs!r} is shorter than one training step "
            f"(one step is {1 / per_epoch:.4g} epochs here); expected num_epochs >= "
            f"{0.5 / per_epoch:.4g}."
        )

    return StepPlan(
        total_steps=steps(config.num_epochs),
        steps_per_epoch=per_epoch,
        data_steps_per_epoch=int(data_steps_per_epoch),
        grads_per_step=int(cost.grads_per_step),
        outer_steps_per_step=float(cost.outer_steps_per_step),
        eval_every=steps(config.eval_every_epochs),
        checkpoint_every=steps(config.checkpoint_every_epochs),
    )
