"""From run folders to numbers, tables and figures: what ``flatjax eval|flatness|results`` do.

A run folder is what :func:`flatjax.training.train_and_evaluate` writes:
``config.json``, ``checkpoints/<step>/``, ``metrics.jsonl``, ``final.json``.
This module restores the network a run evaluates (the SGD params, the
Entropy-SGD anchor x or the Replicated-SGD centre c, with their BatchNorm
statistics), scores it, measures its local energy, and turns several run
folders into one markdown table and PNG figures.

References:
  Pittorino et al., "Entropic gradient descent algorithms and wide flat
  minima", ICLR 2021, arXiv 2006.07897 (local energy).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from flatjax._extras import require

__all__ = [
    "RestoredRun",
    "restore_run",
    "evaluate_run",
    "measure_flatness",
    "flatness_table",
    "load_run",
    "results_table",
    "write_results",
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

    from flatjax.cli import apply_overrides

    path = workdir / CONFIG_FILE
    if not path.is_file():
        raise _no_run(workdir, f"no {CONFIG_FILE}")
    config = ml_collections.ConfigDict(_read_json(path))
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

    workdir = Path(workdir)
    config = _read_config(workdir, overrides)
    ckpt_dir = workdir / CHECKPOINT_DIR
    if not ckpt_dir.is_dir():
        raise _no_run(workdir, f"no {CHECKPOINT_DIR}/ folder")
    training.validate_config(config)
    info = data.get_info(config.dataset, data_dir=config.data_dir)
    model = models.get_model(config.model, info.num_classes, **dict(config.model_kwargs))
    build = config.copy_and_resolve_references()
    if build.algorithm == "replicated_sgd" and build.rsgd.coupling is None:
        # The balanced γ_0 is measured on data; its value does not change the
        # state's structure, which is all the restore target needs.
        build.rsgd.coupling = 1.0
    state = training.create_train_state(
        build, model, {"input_shape": info.input_shape, "num_train": info.num_train},
        jax.random.PRNGKey(build.seed),
    )  # fmt: skip
    checkpointer = training.Checkpointer(ckpt_dir, keep=max(1, int(config.keep_checkpoints)))
    try:
        restored = checkpointer.restore_latest(state)
    finally:
        checkpointer.close()
    if restored is None:
        raise _no_run(workdir, f"{CHECKPOINT_DIR}/ is empty")
    batches = None
    if config.algorithm == "replicated_sgd" and config.rsgd.center_batch_stats == "recompute":
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


class Run(NamedTuple):
    """What a run folder holds, read back (missing files give empty values)."""

    name: str
    path: Path
    config: dict
    rows: list
    final: dict
    flatness: dict | None


def _read_json(path: Path):
    from flatjax.training.metrics import read_json_object

    try:
        return read_json_object(path)
    except ValueError as error:
        raise ValueError(
            f"{error}; restore it, or train the run again with `flatjax train --restart`"
        ) from None


def load_run(run_dir: str | os.PathLike, name: str | None = None) -> Run:
    """Reads a run folder's config, metrics, final metrics and flatness record."""
    from flatjax.training import read_metrics

    path = Path(run_dir)
    final = _read_json(path / FINAL_FILE)
    rows = read_metrics(path / METRICS_FILE)
    if final is None and not rows:
        raise FileNotFoundError(
            f"{run_dir} holds no {FINAL_FILE} or {METRICS_FILE}: not a finished training run"
        )
    return Run(
        name or path.name,
        path,
        _read_json(path / CONFIG_FILE) or {},
        rows,
        final or dict(rows[-1]),
        _read_json(path / FLATNESS_FILE),
    )


def _names(run_dirs: Sequence[str]) -> list[str]:
    """Folder names, lengthened with parent folders until they are unique."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(d) for d in run_dirs]


def _eval_key(record: dict, what: str) -> str | None:
    for split in ("test", "val"):
        if f"{split}_{what}" in record:
            return f"{split}_{what}"
    return None


def _fmt(value, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, spec)


def _table_sigmas(runs: Sequence[Run], limit: int = 4) -> list[float]:
    common = None
    for run in runs:
        if run.flatness:
            sigmas = {s for s in run.flatness["sigmas"] if s > 0}
            common = sigmas if common is None else common & sigmas
    return sorted(common or [])[:limit]


def results_table(runs: Sequence[Run]) -> str:
    """A markdown table, one row per run: cost, final test error and loss, local energy.

    Columns: run, algorithm, gradient evaluations, effective epochs
    (gradient evaluations / (N/B): SGD-epochs of compute), training steps,
    test (or validation) error and loss of the evaluation network, δE at up
    to four σ > 0 measured for every run (mean ± stderr, percentage points
    of training error), and training wall time. A Replicated-SGD run whose
    centre is not yet a trained network (``center_trained = false`` in its
    ``final.json``) is marked "(centre untrained)".
    """
    sigmas = _table_sigmas(runs)
    split = next((k.split("_")[0] for r in runs if (k := _eval_key(r.final, "error"))), "test")
    header = ["run", "algorithm", "grad evals", "eff. epochs", "steps",
              f"{split} error (%)", f"{split} loss"]  # fmt: skip
    header += [f"δE σ={s:g}" for s in sigmas] + ["train time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        final = run.final
        error_key, loss_key = _eval_key(final, "error"), _eval_key(final, "loss")
        name = run.name if final.get("center_trained", True) else f"{run.name} (centre untrained)"
        cells = [
            name,
            str(final.get("algorithm", run.config.get("algorithm", "?"))),
            _fmt(final.get("grad_evals"), "d"),
            _fmt(final.get("effective_epochs"), ".2f"),
            _fmt(final.get("step"), "d"),
            _fmt(final.get(error_key) if error_key else None, ".2f"),
            _fmt(final.get(loss_key) if loss_key else None, ".4f"),
        ]
        flat = run.flatness
        for s in sigmas:
            if flat is None:
                cells.append("–")
                continue
            i = flat["sigmas"].index(s)
            cells.append(f"{flat['mean'][i]:.3f} ± {flat['stderr'][i]:.3f}")
        cells.append(_fmt(final.get("wall_time"), ".1f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_curves(runs: Sequence[Run], path: Path) -> None:
    matplotlib = require("matplotlib", "the figures of flatjax results")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "the figures of flatjax results")

    panels = [("train_loss", "training loss"), ("error", "error of the evaluated network (%)")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for run in runs:
            rows = run.rows
            if not rows:
                continue
            k = key if key in rows[-1] else _eval_key(rows[-1], key)
            if k is None:
                continue
            x = [r.get("effective_epochs", r.get("epoch", math.nan)) for r in rows]
            ax.plot(x, [r.get(k, math.nan) for r in rows], marker=".", label=run.name)
        ax.set_xlabel("effective epochs (gradient evaluations / (N/B))")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_local_energy(runs: Sequence[Run], path: Path) -> None:
    matplotlib = require("matplotlib", "the figures of flatjax results")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "the figures of flatjax results")

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for run in runs:
        flat = run.flatness
        ax.errorbar(flat["sigmas"], flat["mean"], yerr=flat["stderr"], marker="o",
                    capsize=3, label=run.name)  # fmt: skip
    ax.set_xlabel("σ (multiplicative weight noise)")
    ax.set_ylabel("local energy δE (training error, % points)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(run_dirs: Sequence[str], out: str | os.PathLike) -> tuple[str, list[Path]]:
    """Writes ``results.md`` (the table), ``curves.png`` and ``local_energy.png`` into ``out``.

    Args:
      run_dirs: training run folders.
      out: output folder (must exist).

    Returns:
      ``(table, figures)``: the markdown table and the PNG paths written
      (``local_energy.png`` only when some run has a ``flatness.json``).
    """
    runs = [load_run(d, n) for d, n in zip(run_dirs, _names(run_dirs), strict=True)]
    out = Path(out)
    table = results_table(runs)
    figures = [out / "curves.png"]
    _plot_curves(runs, figures[0])
    with_flatness = [r for r in runs if r.flatness]
    if with_flatness:
        figures.append(out / "local_energy.png")
        _plot_local_energy(with_flatness, figures[1])
    text = ["# flatjax results", "", table, ""]
    text += [f"![{f.stem}]({f.name})" for f in figures]
    (out / TABLE_FILE).write_text("\n".join(text) + "\n")
    return table, figures
