"""Training library: state, steps, evaluation, checkpoints, metrics and the loop.

Small testable functions in the style of the flax examples' ``train.py``:
:func:`create_train_state`, :func:`make_train_step`, :func:`evaluate`,
:func:`train_and_evaluate`; the configuration starts from :func:`base_config`.
"""

from flatjax.training import algorithms
from flatjax.training.checkpoint import (
    Checkpointer,
    CheckpointMismatchError,
    CorruptCheckpointError,
)
from flatjax.training.config import StepPlan, base_config, plan_steps, validate_config
from flatjax.training.evaluate import evaluate, evaluate_replicas
from flatjax.training.loop import (
    ConfigMismatchError,
    DataSource,
    RunHistoryError,
    TrainingInterrupted,
    WorkdirBusyError,
    WorkdirLock,
    array_source,
    dataset_source,
    train_and_evaluate,
)
from flatjax.training.metrics import (
    MetricsFileError,
    MetricsWriter,
    plot_curves,
    read_metrics,
    tensorboard_tag,
)
from flatjax.training.sharding import (
    batch_layout,
    shard_train_state,
    shard_train_step,
    train_state_sharding,
)
from flatjax.training.state import (
    TrainState,
    create_train_state,
    eval_params,
    eval_variables,
    make_optimizer,
)
from flatjax.training.steps import NonFiniteError, check_finite, make_train_step

__all__ = [
    "algorithms",
    "Checkpointer",
    "CheckpointMismatchError",
    "CorruptCheckpointError",
    "StepPlan",
    "base_config",
    "plan_steps",
    "validate_config",
    "RunHistoryError",
    "TrainingInterrupted",
    "WorkdirBusyError",
    "WorkdirLock",
    "MetricsFileError",
    "tensorboard_tag",
    "evaluate",
    "evaluate_replicas",
    "ConfigMismatchError",
    "DataSource",
    "array_source",
    "dataset_source",
    "train_and_evaluate",
    "MetricsWriter",
    "plot_curves",
    "read_metrics",
    "TrainState",
    "create_train_state",
    "eval_params",
    "eval_variables",
    "make_optimizer",
    "batch_layout",
    "shard_train_state",
    "shard_train_step",
    "train_state_sharding",
    "NonFiniteError",
    "check_finite",
    "make_train_step",
]
