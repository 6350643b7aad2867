"""Every experiment config loads, validates and keeps to the base config's keys."""

from pathlib import Path

import ml_collections
import pytest

from flatjax import cli
from flatjax.configs import cifar, common, mnist5k, small
from flatjax.training import base_config, validate_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "flatjax" / "configs"
CONFIG_FILES = sorted(
    p.name for p in CONFIG_DIR.glob("*.py")
    if not p.name.startswith("_") and p.name != "common.py"
)


def _leaf_keys(config, prefix=""):
    keys = set()
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict) and key != "model_kwargs":
            keys |= _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.add(prefix + key)
    return keys


BASE_KEYS = _leaf_keys(base_config())


def _check(config):
    assert isinstance(config, ml_collections.ConfigDict)
    assert _leaf_keys(config) == BASE_KEYS
    validate_config(config)


def test_every_config_file_is_covered():
    assert set(CONFIG_FILES) == {"cifar.py", "mnist5k.py", "small.py"}


@pytest.mark.parametrize("name", CONFIG_FILES)
@pytest.mark.parametrize("quick", [False, True])
def test_config_file_loads_through_cli_and_validates(name, quick):
    config = cli.load_config(f"{CONFIG_DIR / name}{':quick' if quick else ''}")
    _check(config)
    assert config.is_locked
    if quick:
        assert config.num_epochs <= 1 and config.flatness.num_draws <= 2
        assert not config.progress


CIFAR_CELLS = [(d, m, a) for d in cifar.DATASETS for m in cifar.MODELS for a in cifar.ALGORITHMS]


@pytest.mark.parametrize(("dataset", "model", "algorithm"), CIFAR_CELLS)
def test_cifar_grid_cell(dataset, model, algorithm):
    config = cifar.get_config(f"{dataset},{model},{algorithm}")
    _check(config)
    assert (config.dataset, config.model) == (dataset, model)
    assert config.algorithm == common.ALGORITHMS[algorithm]
    # The paper's baseline, shared by every cell, and the authors' rules.
    assert (config.momentum, config.nesterov, config.lr_schedule) == (0.9, True, "cosine")
    assert config.learning_rate == 0.1
    assert config.esgd.coupling is None and config.esgd.outer_scale == "coupling"
    assert config.esgd.inner_momentum == 0.9 and config.esgd.inner_weight_decay is None
    assert config.rsgd.coupling is None and config.rsgd.coupling_step == "explicit"
    assert config.rsgd.weight_decay is None  # y · weight_decay
    assert (config.weight_decay, config.batch_size, config.augment) == (5e-4, 128, True)
    assert config.budget == "gradients"
    assert config.rsgd.num_replicas == 3 and config.esgd.inner_steps == 5


def test_cifar_has_24_cells_and_quick_uses_tiny_models():
    assert len(CIFAR_CELLS) == 24
    for model, tiny in cifar.TINY_MODELS.items():
        assert cifar.get_config(f"cifar100,{model},rsgd,quick").model == tiny


def test_cifar_matched_budget_costs_the_same_gradients():
    from flatjax.training import plan_steps

    costs = set()
    for algorithm in cifar.ALGORITHMS:
        plan = plan_steps(cifar.get_config(f"cifar10,resnet18,{algorithm}"), 391)
        costs.add(plan.total_steps * plan.grads_per_step)
    # Rounding to whole steps: within one step of y or L gradients.
    assert max(costs) - min(costs) <= 5


@pytest.mark.parametrize("algorithm", mnist5k.DEMO_ALGORITHMS)
def test_demo_configs_share_everything_but_the_algorithm(algorithm):
    config, sgd = mnist5k.get_config(algorithm), mnist5k.get_config("sgd")
    assert (config.dataset, config.model) == ("mnist5k", "lenet5")
    differ = {k for k in BASE_KEYS if _get(config, k) != _get(sgd, k)}
    # Entropy-SGD's outer step is scaled by γ, so its lr is its own;
    # Replicated-SGD's coupling grows per step at a constant lr (mnist5k.py).
    own = {
        "sgd": set(),
        "esgd": {"learning_rate", "lr_schedule"},
        "rsgd": {"lr_schedule", "rsgd.coupling_per"},
    }[algorithm]
    assert differ <= {"algorithm"} | own
    # The authors' rules run (flatjax.training.base_config).
    assert config.esgd.coupling is None and config.esgd.calibration_step == 1
    assert config.rsgd.coupling is None and config.rsgd.coupling_step == "explicit"


def _get(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize(
    ("dataset", "model"), [(d, m) for d in small.DATASETS for m in small.MODELS]
)
def test_small_network_configs(dataset, model):
    for algorithm in small.ALGORITHMS:
        _check(small.get_config(f"{dataset},{model},{algorithm}"))
        _check(small.get_config(f"{algorithm},quick,{model},{dataset}"))


@pytest.mark.parametrize(
    ("module", "arg", "match"),
    [
        (cifar, "cifar10,resnet50,sgd", "unknown config argument 'resnet50'"),
        (cifar, "cifar10,cifar100", "two datasets"),
        (mnist5k, "adam", "unknown config argument 'adam'"),
        (small, "mnist,lenet5,sgd,fast", "unknown config argument 'fast'"),
    ],
)
def test_bad_config_argument(module, arg, match):
    with pytest.raises(ValueError, match=match):
        module.get_config(arg)


def test_base_is_locked_against_typos():
    config = common.experiment_base()
    with pytest.raises(AttributeError):
        config.learning_rte = 0.1


def test_set_algorithm_rejects_unknown_name():
    with pytest.raises(ValueError, match="algorithm must be one of sgd, esgd, rsgd"):
        common.set_algorithm(common.experiment_base(), "adam")
