"""The study's settings: its testbeds, the measurement grid and each run's config.

A *testbed* is one dataset × network with its own training length, seeds
and learning-rate grid (:data:`TESTBEDS`); :func:`study_settings` collects
the testbeds of a run and the measurement settings shared by all of them
into one JSON-serialisable dict (saved in ``meta.json``);
:func:`make_config` turns one cell of the study into a
``flatjax.configs.common`` config.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from flatjax.configs import common

__all__ = [
    "ALGORITHMS",
    "BUDGETS",
    "DEFAULT_TESTBEDS",
    "LABELS",
    "TESTBEDS",
    "TAU_SIGMA",
    "VALIDATION_FRACTION",
    "INNER_STEPS",
    "NUM_REPLICAS",
    "Testbed",
    "make_config",
    "study_settings",
]

ALGORITHMS = ("sgd", "esgd", "rsgd")  # short names of flatjax.configs.common
LABELS = {"sgd": "SGD", "esgd": "Entropy-SGD", "rsgd": "Replicated-SGD (centre)"}
BUDGETS = ("gradients", "epochs")
TABLE_SIGMAS = (0.01, 0.05, 0.1)
TAU_SIGMA = 0.05  # the σ of the headline Kendall τ, fixed before any run
VALIDATION_FRACTION = 0.2
INNER_STEPS = 5  # eSGD's L
NUM_REPLICAS = 3  # rSGD's y


class Testbed(NamedTuple):
    """One dataset × network of the study.

    Attributes:
      dataset: ``flatjax.data`` catalogue name.
      model: ``flatjax.models`` name.
      batch_size: minibatch size of every algorithm.
      epochs: SGD-epochs of the run (the equal-gradient budget).
      seeds: seeds of every cell (also the seeds of the tuning grid).
      learning_rates: the tuning grid, the same for every algorithm (for eSGD
        the inner, Langevin, learning rate η′).
      local_energy_examples: local energy on the first this-many training
        examples (``None``: all).
      local_entropy: ``flatjax.local_entropy`` sampler settings for the main
        equal-gradient networks (``None``: not measured).
      matched_sgd: also train SGD (its selected learning rate) with the
        gradient evaluations of eSGD's and rSGD's equal-epoch runs (L× and
        y× the epochs), to tell the algorithm from the extra compute.
      note: one line on why the testbed is in the study.
    """

    dataset: str
    model: str
    batch_size: int
    epochs: float
    seeds: tuple = (0, 1, 2)
    learning_rates: tuple = (0.05, 0.1, 0.2, 0.4, 0.8)
    local_energy_examples: int | None = None
    local_entropy: dict | None = None
    matched_sgd: bool = False
    note: str = ""


TESTBEDS = {
    "digits": Testbed(
        "digits", "mlp", 64, 30,
        local_entropy={"num_rungs": 4, "num_chains": 2, "num_steps": 100,
                       "num_anchor_samples": 100},
        note="8×8 scikit-learn digits (1,437/360), the 300-100 ReLU MLP"),
    "mnist1d": Testbed(
        "mnist1d", "mlp", 128, 60, local_energy_examples=1000,
        note="MNIST-1D (4,000/1,000), the 300-100 ReLU MLP"),
    "mnist5k": Testbed(
        "mnist5k", "lenet5", 128, 8, local_energy_examples=1000,
        note="5k MNIST subset (4,000/1,000), LeNet-5"),
    # A network that does not interpolate its training set within the budget:
    # MNIST-1D with 10,000 training signals and the 5,210-parameter CNN of its
    # authors (Greydanus 2020). The epoch count and grid come from a 1-seed pilot:
    # SGD ends at a few % training error, lr 0.8 collapses to chance.
    "mnist1d_cnn": Testbed(
        "mnist1d_10k", "cnn1d", 128, 10, seeds=(0, 1, 2, 3, 4),
        learning_rates=(0.05, 0.1, 0.2, 0.4), local_energy_examples=1000, matched_sgd=True,
        note="MNIST-1D with 12,500 signals (10,000/2,500), the 1-D CNN of its authors"),
}
DEFAULT_TESTBEDS = ("digits", "mnist1d", "mnist1d_cnn")


def _testbed_settings(name: str, quick: bool) -> dict:
    t = TESTBEDS[name]._asdict()
    t["seeds"], t["learning_rates"] = list(t["seeds"]), list(t["learning_rates"])
    if quick:  # (local entropy's compilation alone would double the smoke run)
        t.update(epochs=1, seeds=[0, 1], learning_rates=[0.1], local_energy_examples=None,
                 local_entropy=None, matched_sgd=False)
    return t


def study_settings(quick: bool, testbeds=None) -> dict:
    """The knobs of one run: its testbeds and the shared measurement settings.

    Args:
      quick: the seconds-long smoke run (digits, 1 epoch, 2 seeds, one
        learning rate, 3 σ values, 2 draws) instead of the study.
      testbeds: names of :data:`TESTBEDS` (default: ``digits`` for the smoke
        run, :data:`DEFAULT_TESTBEDS` otherwise).

    Returns:
      ``{"datasets": [names], "testbeds": {name: Testbed fields}, "sigmas",
      "table_sigmas", "grid_sigmas", "num_draws", "local_entropy_examples",
      "local_entropy_coupling"}``.

    Example:
      >>> s = study_settings(quick=True)
      >>> s["datasets"], s["testbeds"]["digits"]["seeds"]
      (['digits'], [0, 1])
    """
    names = list(testbeds) if testbeds else (["digits"] if quick else list(DEFAULT_TESTBEDS))
    unknown = sorted(set(names) - set(TESTBEDS))
    if unknown:
        raise ValueError(f"unknown datasets {unknown}; expected some of {sorted(TESTBEDS)}.")
    shared = {"datasets": names, "testbeds": {n: _testbed_settings(n, quick) for n in names}}
    if quick:
        return {**shared, "sigmas": [0.0, 0.05, 0.1], "table_sigmas": [0.05, 0.1],
                "grid_sigmas": [0.0, 0.05, 0.1],  # = sigmas: one local-energy program
                "num_draws": 2, "local_entropy_examples": 100, "local_entropy_coupling": 1e3}
    return {
        **shared,
        # The paper's grid, 0 … 0.1, and beyond it: small networks on easy data hardly
        # notice 10 % multiplicative noise, so their curves only part at larger σ.
        "sigmas": [round(float(s), 3) for s in np.linspace(0.0, 0.1, 11)] + [0.15, 0.2, 0.3],
        "table_sigmas": [*TABLE_SIGMAS, 0.2],
        # σ measured on every network (tuning grid too), for Kendall's τ.
        "grid_sigmas": [0.01, 0.05, 0.1, 0.2],
        "num_draws": 20,
        "local_entropy_examples": 300,
        "local_entropy_coupling": 1e4,
    }


def make_config(testbed: dict, algorithm: str, budget: str, learning_rate: float,
                epochs: float | None = None):
    """The run's config: ``flatjax.configs.common`` defaults plus the testbed's settings.

    Args:
      testbed: one entry of ``study_settings(...)["testbeds"]``.
      algorithm: ``"sgd"``, ``"esgd"`` or ``"rsgd"``.
      budget: ``"gradients"`` (``epochs`` SGD-epochs of gradient evaluations
        for every algorithm) or ``"epochs"`` (``epochs`` epochs of each).
      learning_rate: SGD's and rSGD's learning rate, eSGD's inner η′.
      epochs: the run's length instead of the testbed's ``epochs``.
    """
    config = common.experiment_base()
    config.dataset = testbed["dataset"]
    config.model = testbed["model"]
    config.validation_fraction = VALIDATION_FRACTION
    config.batch_size = int(testbed["batch_size"])
    config.lr_schedule = "cosine"
    config.progress = False
    common.set_algorithm(config, algorithm, inner_steps=INNER_STEPS, num_replicas=NUM_REPLICAS)
    config.budget = budget
    config.num_epochs = float(testbed["epochs"] if epochs is None else epochs)
    if algorithm == "esgd":
        # The inner Langevin lr plays SGD's role (the step on the data); the outer
        # lr 1 makes the γ-scaled outer step x ← x − γ_t · nesterov(x − μ), with γ
        # clamped so that it stays stable (flatjax.entropy_sgd).
        config.esgd.inner_learning_rate = float(learning_rate)
        config.learning_rate = 1.0
    else:
        config.learning_rate = float(learning_rate)
    return config
