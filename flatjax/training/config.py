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

import math
import numbers
import os
import warnings
from typing import NamedTuple

import ml_collections

__all__ = ["base_config", "validate_config", "plan_steps", "StepPlan"]

ALGORITHMS = ("sgd", "entropy_sgd", "replicated_sgd")


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
    # device; larger meshes shard the unchanged step with flatjax.shard_train_step
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


def _fail(name, value, expected):
    raise ValueError(f"config.{name} must be {expected}, got {value!r}.")


def _choice(config, name, choices):
    value = config
    for part in name.split("."):
        value = value[part]
    if value not in choices:
        _fail(name, value, "one of " + ", ".join(repr(c) for c in choices))


def _positive(config, name, *, integer=False, allow_zero=False, allow_none=False):
    value = config
    for part in name.split("."):
        value = value[part]
    if value is None and allow_none:
        return
    kind = numbers.Integral if integer else numbers.Real
    ok = isinstance(value, kind) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        what = "an integer" if integer else "a number"
        what += " >= 0" if allow_zero else " > 0"
        _fail(name, value, what + (" or None" if allow_none else ""))


def _check_dataset_name(name: str) -> None:
    from flatjax.data import _pipeline  # lazy: flatjax.data imports tfds and grain

    try:
        _pipeline._spec(name)  # the catalogue's own check (it knows the aliases)
    except ValueError as error:
        raise ValueError(f"config.dataset: {error}") from None


def _check_model_name(name: str) -> None:
    from flatjax.models import MODELS  # lazy: flatjax.models imports flax

    if name not in MODELS:
        raise ValueError(
            f"config.model: unknown model {name!r}; valid names are {sorted(MODELS)}."
        )


def _check_coupling_max(esgd: ml_collections.ConfigDict) -> None:
    """esgd.coupling_max is an absolute bound on γ: it must not be below a fixed γ_0."""
    if esgd.coupling_max is None:
        return
    if esgd.coupling is not None and esgd.coupling_max < esgd.coupling:
        raise ValueError(
            f"config.esgd.coupling_max = {esgd.coupling_max!r} is below the initial coupling "
            f"config.esgd.coupling = {esgd.coupling!r}; the coupling grows from esgd.coupling "
            "up to esgd.coupling_max, so expected coupling_max >= coupling (or None: no cap)."
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


def _inner_coupling_bound(esgd: ml_collections.ConfigDict) -> float:
    """b′: the largest η′(γ + λ′) at which Entropy-SGD's inner Nesterov step is stable."""
    from flatjax._stability import stable_coupling_step

    return float(stable_coupling_step(float(esgd.inner_momentum), True))


def _check_esgd_inner_step(config: ml_collections.ConfigDict) -> None:
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
    bound = _inner_coupling_bound(esgd)
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
            stacklevel=3,
        )


# One coupling update may multiply γ by at most this before flatjax warns.
MAX_COUPLING_JUMP = 10.0


def _check_rsgd_jump(config: ml_collections.ConfigDict) -> None:
    """Warns when rsgd.coupling_per='epoch' makes γ jump by a large factor at once."""
    rsgd = config.rsgd
    if config.algorithm != "replicated_sgd" or rsgd.coupling_per != "epoch":
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
            stacklevel=3,
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
    _choice(config, "algorithm", ALGORITHMS)
    if not isinstance(config.dataset, str) or not config.dataset:
        _fail("dataset", config.dataset, "a dataset name")
    _check_dataset_name(config.dataset)
    if not isinstance(config.model, str) or not config.model:
        _fail("model", config.model, "a model name")
    _check_model_name(config.model)
    _positive(config, "batch_size", integer=True)
    _positive(config, "num_epochs")
    _choice(config, "budget", ("epochs", "gradients"))
    _positive(config, "learning_rate")
    _choice(config, "lr_schedule", ("constant", "cosine"))
    if not 0 <= config.momentum < 1:
        _fail("momentum", config.momentum, "a number in [0, 1)")
    _positive(config, "weight_decay", allow_zero=True)
    if not isinstance(config.seed, numbers.Integral):
        _fail("seed", config.seed, "an integer")
    if not 0 <= config.validation_fraction < 1:
        _fail("validation_fraction", config.validation_fraction, "a number in [0, 1)")
    _positive(config, "mesh.replica", integer=True)
    _positive(config, "mesh.data", integer=True)
    _positive(config, "eval_every_epochs")
    _positive(config, "checkpoint_every_epochs")
    _positive(config, "keep_checkpoints", integer=True)
    _choice(config, "nan_policy", ("stop", "skip"))
    skipped = config.get("max_skipped_fraction", 0.1)
    if isinstance(skipped, bool) or not isinstance(skipped, numbers.Real) or not 0 <= skipped <= 1:
        _fail("max_skipped_fraction", skipped, "a number in [0, 1]")
    _positive(config, "log_every_steps", integer=True)
    _positive(config, "eval_batch_size", integer=True)

    _positive(config, "esgd.inner_steps", integer=True)
    _positive(config, "esgd.inner_learning_rate")
    _positive(config, "esgd.noise", allow_zero=True)
    if not 0 <= config.esgd.average < 1:
        _fail("esgd.average", config.esgd.average, "a number in [0, 1)")
    _positive(config, "esgd.inner_weight_decay", allow_zero=True, allow_none=True)
    if not 0 <= config.esgd.inner_momentum < 1:
        _fail("esgd.inner_momentum", config.esgd.inner_momentum, "a number in [0, 1)")
    _positive(config, "esgd.coupling", allow_none=True)
    _positive(config, "esgd.calibration_step", integer=True, allow_zero=True)
    _choice(config, "esgd.outer_scale", ("coupling", "gradient", "none"))
    if not config.esgd.coupling_factor >= 1:
        _fail("esgd.coupling_factor", config.esgd.coupling_factor, "a number >= 1")
    _positive(config, "esgd.coupling_max", allow_none=True)
    _check_coupling_max(config.esgd)
    _choice(config, "esgd.mode", ("scan", "stepwise"))
    _choice(config, "esgd.batch_norm", ("walker", "anchor"))

    _positive(config, "rsgd.num_replicas", integer=True)
    _positive(config, "rsgd.coupling", allow_none=True)
    _choice(config, "rsgd.coupling_step", ("explicit", "proximal"))
    _positive(config, "rsgd.weight_decay", allow_zero=True, allow_none=True)
    _positive(config, "rsgd.balance_batches", integer=True, allow_none=True)
    if not config.rsgd.coupling_factor >= 1:
        _fail("rsgd.coupling_factor", config.rsgd.coupling_factor, "a number >= 1")
    _choice(config, "rsgd.coupling_schedule", ("exponential", "linear", "cosine"))
    _choice(config, "rsgd.coupling_per", ("epoch", "step"))
    _choice(config, "rsgd.strategy", ("auto", "vmap", "unroll"))
    _choice(config, "rsgd.center_batch_stats", ("average", "recompute"))
    _check_esgd_inner_step(config)
    _check_rsgd_jump(config)
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
    spe = float(data_steps_per_epoch)
    gradients = config.budget == "gradients"
    outer = 1.0
    if config.algorithm == "sgd":
        per_epoch, grads = spe, 1
    elif config.algorithm == "entropy_sgd":
        big_l = int(config.esgd.inner_steps)
        if config.esgd.mode == "scan":
            per_epoch, grads = (spe / big_l if gradients else spe), big_l
        else:
            per_epoch, grads, outer = (spe if gradients else spe * big_l), 1, 1.0 / big_l
    else:
        y = int(config.rsgd.num_replicas)
        per_epoch, grads = (spe / y if gradients else spe), y

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
        grads_per_step=grads,
        outer_steps_per_step=outer,
        eval_every=steps(config.eval_every_epochs),
        checkpoint_every=steps(config.checkpoint_every_epochs),
    )
