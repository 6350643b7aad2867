"""Pieces shared by the experiment configs: the config argument and the algorithms.

Every config file defines ``get_config(arg="")``. ``arg`` is the string after
the colon of ``--config path.py:arg`` (the ``ml_collections.config_flags``
convention): comma-separated tokens in any order, each naming one choice
(a dataset, a model, an algorithm) or ``quick``, the tiny mode the tests use.
:func:`parse_arg` reads it; :func:`set_algorithm` and :func:`make_quick`
apply the overrides that are the same in every experiment, so that the
experiment files only say what is particular to them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import ml_collections

from flatjax.training import base_config

__all__ = ["ALGORITHMS", "experiment_base", "parse_arg", "set_algorithm", "make_quick"]

# Short names used in config arguments and run folders -> config.algorithm.
ALGORITHMS = {"sgd": "sgd", "esgd": "entropy_sgd", "rsgd": "replicated_sgd"}


def experiment_base() -> ml_collections.ConfigDict:
    """``flatjax.training.base_config()``, locked so that a typo'd key raises.

    Locking keeps the set of keys fixed (``AttributeError`` on a new one)
    while values can still be overridden.
    """
    config = base_config()
    config.lock()
    return config


def parse_arg(
    arg: str | None, choices: Mapping[str, Sequence[str]], defaults: Mapping[str, str]
) -> dict:
    """Splits ``"cifar10,resnet18,esgd,quick"`` into named choices.

    Args:
      arg: the config argument; ``None`` or ``""`` gives the defaults.
      choices: for each kind of token (``"dataset"``, ``"model"``, ...), its
        allowed values. The values of different kinds must not overlap.
      defaults: the value of each kind when ``arg`` does not name one.

    Returns:
      A dict with one entry per kind plus ``"quick"`` (a bool).

    Raises:
      ValueError: on an unknown token or two tokens of the same kind.

    Example:
      >>> parse_arg("rsgd,quick", {"algorithm": ("sgd", "rsgd")}, {"algorithm": "sgd"})
      {'algorithm': 'rsgd', 'quick': True}
    """
    result: dict = {}
    quick = False
    for token in (t.strip() for t in (arg or "").split(",")):
        if not token:
            continue
        if token == "quick":
            quick = True
            continue
        kinds = [kind for kind, values in choices.items() if token in values]
        if not kinds:
            allowed = "; ".join(f"{k}: {', '.join(v)}" for k, v in choices.items())
            raise ValueError(
                f"unknown config argument {token!r}; expected comma-separated tokens from "
                f"({allowed}) and optionally 'quick'."
            )
        if kinds[0] in result:
            raise ValueError(
                f"config argument names two {kinds[0]}s: {result[kinds[0]]!r} and {token!r}."
            )
        result[kinds[0]] = token
    for kind in choices:
        result.setdefault(kind, defaults[kind])
    result["quick"] = quick
    return result


def set_algorithm(
    config: ml_collections.ConfigDict, name: str, *, inner_steps: int = 5, num_replicas: int = 3
) -> ml_collections.ConfigDict:
    """Switches ``config`` to SGD, Entropy-SGD or Replicated-SGD at a matched gradient budget.

    ``budget='gradients'`` makes ``num_epochs`` count SGD-epochs of gradient
    evaluations for every algorithm: Entropy-SGD runs ``num_epochs / L`` outer
    epochs and Replicated-SGD ``num_epochs / y`` epochs per replica (the
    authors' cost accounting). Override ``budget=epochs`` for the equal-epoch
    comparison. Both keep the rules of the authors' code (``base_config``):
    Entropy-SGD calibrates γ_0 at outer step 1 and scales its outer step by
    γ_t; Replicated-SGD balances γ_0 = 2g_0 and couples inside the Nesterov
    gradient with weight decay y · wd.

    Args:
      config: the config to modify in place.
      name: ``"sgd"``, ``"esgd"`` or ``"rsgd"``.
      inner_steps: L, Entropy-SGD's Langevin steps per outer step.
      num_replicas: y, Replicated-SGD's number of replicas (the centre is evaluated).

    Returns:
      ``config``.
    """
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {name!r}.")
    config.algorithm = ALGORITHMS[name]
    config.budget = "gradients"
    config.esgd.inner_steps = inner_steps
    config.rsgd.num_replicas = num_replicas
    return config


def make_quick(config: ml_collections.ConfigDict, *, num_epochs: float = 1.0):
    """Shrinks a config so that it trains in seconds on a CPU (the tests' mode).

    Fewer epochs, a coarse evaluation and checkpoint schedule, a cheap
    flatness measurement and no progress bar; the dataset, model family and
    algorithm stay those of the experiment.
    """
    config.num_epochs = num_epochs
    config.eval_every_epochs = num_epochs
    config.checkpoint_every_epochs = num_epochs
    config.keep_checkpoints = 1
    config.log_every_steps = 10
    config.progress = False
    config.flatness.sigmas = [0.0, 0.05]
    config.flatness.num_draws = 2
    return config
