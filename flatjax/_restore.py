"""A run folder's network, restored and measured: what ``flatjax eval`` and ``flatjax flatness`` do.

A run folder is what :func:`flatjax.training.train_and_evaluate` writes:
``config.json``, ``checkpoints/<step>/``, ``metrics.jsonl``, ``final.json``.
This module restores the network a run evaluates (the SGD params, the
Entropy-SGD anchor x or the Replicated-SGD centre c, with their BatchNorm
statistics), scores it on a dataset split and measures its local energy.

References:
  Pittorino et al., "Entropic gradient descent algorithms and wide flat
  minima", ICLR 2021, arXiv 2006.07897 (local energy).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "RestoredRun",
    "restore_run",
    "evaluate_run",
    "measure_flatness",
    "flatness_table",
    "read_run_json",
]

CONFIG_FILE = "config.json"
FINAL_FILE = "final.json"
METRICS_FILE = "metrics.jsonl"
FLATNESS_FILE = "flatness.json"
TABLE_FILE = "results.md"
CHECKPOINT_DIR = "checkpoints"

# One apply function per model, so that local_energy's compiled program
# (cached on the function object) is reused across runs of the same model.
_APPLY_FNS: dict = {}


class RestoredRun(NamedTuple):
    """The evaluation network of a run, restored from its latest checkpoint.

    Attributes:
      config: the run's config (``config.json`` plus any overrides), locked.
      model: the flax module.
      variables: ``{'params': ..., 'batch_stats': ...}`` of the network to
        evaluate (no replica axis).
      step: the training step of the checkpoint.
    """

    config: Any
    model: Any
    variables: dict
    step: int


def _no_run(workdir: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"no checkpoint in {workdir} ({what}); train into it first with `flatjax train`"
    )


def _read_config(workdir: Path, overrides: Sequence[str]):
    import ml_collections

    from flatjax.configs._loading import apply_overrides
    from flatjax.training.config import base_config

    path = workdir / CONFIG_FILE
    if not path.is_file():
        raise _no_run(workdir, f"no {CONFIG_FILE}")
    saved = read_run_json(path)
    # Fields added to the training config after the run was written take
    # their defaults (they did not exist, so the run used what they default to).
    config = base_config()
    try:
        config.update(saved)
    except (TypeError, ValueError, AttributeError):
        config = ml_collections.ConfigDict(saved)
    config.lock()
    apply_overrides(config, overrides)
    return config


def _apply_fn(model):
    try:
        return _APPLY_FNS.setdefault(model, lambda v, x: model.apply(v, x, train=False))
    except TypeError:  # an unhashable module: no cache
        return lambda v, x: model.apply(v, x, train=False)


def restore_run(workdir: str | os.PathLike, overrides: Sequence[str] = ()) -> RestoredRun:
    """Restores the evaluation network of the run in ``workdir`` from its latest checkpoint.

    The training state is rebuilt from the run's ``config.json`` (so the
    checkpoint is restored against the right structure, and a checkpoint of
    another model fails with a message naming the differing arrays), then
    :func:`flatjax.training.eval_variables` picks the network the run
    evaluates: SGD's params, the Entropy-SGD anchor x, or the Replicated-SGD
    centre c = (1/y) Σ_a wᵃ with BatchNorm statistics per
    ``rsgd.center_batch_stats``.

    Args:
      workdir: a training run's directory.
      overrides: ``key=value`` config overrides (e.g. ``data_dir=...``).

    Returns:
      A :class:`RestoredRun`.

    Raises:
      FileNotFoundError: no ``config.json`` or no checkpoint in ``workdir``.
      flatjax.training.CheckpointMismatchError: the checkpoint does not fit
        the config's model/optimizer.
    """
    import jax

    from flatjax import data, models, training
    from flatjax.training.state import abstract_train_state

    workdir = Path(workdir)
    config = _read_config(workdir, overrides)
    ckpt_dir = workdir / CHECKPOINT_DIR
    if not ckpt_dir.is_dir():
        raise _no_run(workdir, f"no {CHECKPOINT_DIR}/ folder")
    training.validate_config(config)
    info = data.get_info(config.dataset, data_dir=config.data_dir)
    model = models.get_model(config.model, info.num_classes, **dict(config.model_kwargs))
    algorithm = training.algorithms.get(config.algorithm)
    # The restore target needs only the state's structure, shapes and dtypes
    # (the measured hyperparameters, the balanced γ_0, are in the checkpoint).
    state = abstract_train_state(
        config, model, {"input_shape": info.input_shape, "num_train": info.num_train},
        jax.random.PRNGKey(config.seed),
    )  # fmt: skip
    checkpointer = training.Checkpointer(ckpt_dir, keep=max(1, int(config.keep_checkpoints)))
    try:
        restored = checkpointer.restore_latest(state)
    finally:
        checkpointer.close()
    if restored is None:
        raise _no_run(workdir, f"{CHECKPOINT_DIR}/ is empty")
    batches = None
    if restored.batch_stats and algorithm.needs_stats_batches(config):
        batches = training.dataset_source(config).stats_batches()
    variables = training.eval_variables(
        restored, center_batch_stats=config.rsgd.center_batch_stats, batches=batches
    )
    return RestoredRun(config, model, variables, int(restored.step))


def _split_arrays(config, split: str):
    from flatjax import data

    return data.load_arrays(
        config.dataset, split, data_dir=config.data_dir,
        validation_fraction=config.validation_fraction,
    )  # fmt: skip


def evaluate_run(
    workdir: str | os.PathLike, *, split: str = "test", overrides: Sequence[str] = ()
) -> dict:
    """Loss and error (%) of a run's evaluation network on a dataset split.

    Args:
      workdir: a training run's directory.
      split: ``"test"``, ``"train"`` or ``"validation"``.
      overrides: config overrides, as for :func:`restore_run`.

    Returns:
      ``{'workdir', 'algorithm', 'step', 'split', 'loss', 'error', 'num_examples'}``.
    """
    from flatjax import training

    run = restore_run(workdir, overrides)
    x, y = _split_arrays(run.config, split)
    scores = training.evaluate(
        run.model.apply, run.variables, x, y, batch_size=run.config.eval_batch_size
    )
    return {
        "workdir": str(workdir),
        "algorithm": run.config.algorithm,
        "step": run.step,
        "split": split,
        "loss": scores["loss"],
        "error": scores["error"],
        "num_examples": int(len(y)),
    }


def measure_flatness(
    workdir: str | os.PathLike,
    *,
    sigmas: Sequence[float] | None = None,
    num_draws: int | None = None,
    split: str = "train",
    seed: int = 0,
    overrides: Sequence[str] = (),
) -> dict:
    """Local energy δE(w, σ) of a run's evaluation network; writes ``flatness.json``.

    δE(w, σ) = E_z[E(w ⊙ (1 + σ z))] − E(w), z ~ N(0, I), with E the
    classification error in percent over the whole ``split`` (network in
    eval mode, BatchNorm statistics frozen), estimated with ``num_draws``
    draws per σ (:func:`flatjax.local_energy`). For
    Replicated-SGD this is the centre, for Entropy-SGD the anchor.

    Args:
      workdir: a training run's directory.
      sigmas: noise levels σ (default: the run's ``config.flatness.sigmas``).
      num_draws: M, draws per σ (default: ``config.flatness.num_draws``).
      split: dataset split (default ``"train"``, the paper's choice).
      seed: seed of the noise draws.
      overrides: config overrides, as for :func:`restore_run`.

    Returns:
      The record written to ``workdir/flatness.json``: ``sigmas``,
      ``mean``, ``stderr`` (lists, δE in percentage points), ``base``
      (E(w) in %), ``num_draws``, ``split``, ``step``, ``seed``,
      ``wall_time`` (seconds).
    """
    import jax

    import flatjax

    start = time.perf_counter()
    run = restore_run(workdir, overrides)
    sigmas = list(run.config.flatness.sigmas if sigmas is None else sigmas)
    num_draws = int(run.config.flatness.num_draws if num_draws is None else num_draws)
    x, y = _split_arrays(run.config, split)
    energy = flatjax.local_energy(
        _apply_fn(run.model), run.variables, (x, y), sigmas,
        key=jax.random.PRNGKey(seed), num_draws=num_draws,
        batch_size=int(run.config.flatness.batch_size),
    )  # fmt: skip
    record = {
        "algorithm": run.config.algorithm,
        "step": run.step,
        "split": split,
        "metric": "error_percent",
        "noise": "multiplicative",
        "seed": seed,
        "num_draws": num_draws,
        "sigmas": [float(s) for s in energy.sigmas],
        "mean": [float(m) for m in energy.mean],
        "stderr": [float(s) for s in energy.stderr],
        "base": float(energy.base),
        "wall_time": time.perf_counter() - start,
    }
    with open(Path(workdir) / FLATNESS_FILE, "w") as f:
        json.dump(record, f, indent=2)
    return record


def flatness_table(record: dict) -> str:
    """A markdown table of one :func:`measure_flatness` record."""
    lines = [
        f"local energy δE(σ) of {record['algorithm']} (step {record['step']}), "
        f"{record['split']} error {record['base']:.2f}%, {record['num_draws']} draws per σ",
        "",
        "| σ | δE (% points) | stderr |",
        "|---|---|---|",
    ]
    for s, m, e in zip(record["sigmas"], record["mean"], record["stderr"], strict=True):
        lines.append(f"| {s:g} | {m:.3f} | {e:.3f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Several runs: table and figures.


def read_run_json(path: Path):
    from flatjax.training.metrics import read_json_object

    try:
        return read_json_object(path)
    except ValueError as error:
        raise ValueError(
            f"{error}; restore it, or train the run again with `flatjax train --restart`"
        ) from None
