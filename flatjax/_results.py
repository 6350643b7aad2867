"""From run folders to one table and figures: what ``flatjax results`` does.

Each run folder (:func:`flatjax.training.train_and_evaluate`, and
``flatness.json`` from ``flatjax flatness``) becomes one row of a markdown
table: cost (gradient evaluations, effective epochs), training and test
error, for Replicated-SGD the replicas' and the ensemble's test error, and
the local energy δE(σ); figures: learning curves, δE(σ), and test error
against local energy, one point per run, coloured by algorithm.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from flatjax._extras import require
from flatjax._restore import (
    CONFIG_FILE,
    FINAL_FILE,
    FLATNESS_FILE,
    METRICS_FILE,
    TABLE_FILE,
    read_run_json,
)

__all__ = ["Run", "load_run", "results_table", "write_results"]


class Run(NamedTuple):
    """What a run folder holds, read back (missing files give empty values)."""

    name: str
    path: Path
    config: dict
    rows: list
    final: dict
    flatness: dict | None


def load_run(run_dir: str | os.PathLike, name: str | None = None) -> Run:
    """Reads a run folder's config, metrics, final metrics and flatness record."""
    from flatjax.training import read_metrics

    path = Path(run_dir)
    final = read_run_json(path / FINAL_FILE)
    rows = read_metrics(path / METRICS_FILE)
    if final is None and not rows:
        raise FileNotFoundError(
            f"{run_dir} holds no {FINAL_FILE} or {METRICS_FILE}: not a finished training run"
        )
    return Run(
        name or path.name,
        path,
        read_run_json(path / CONFIG_FILE) or {},
        rows,
        final or dict(rows[-1]),
        read_run_json(path / FLATNESS_FILE),
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


def _mean(values) -> float | None:
    return sum(float(v) for v in values) / len(values) if values else None


def _algorithm(run: Run) -> str:
    return str(run.final.get("algorithm", run.config.get("algorithm", "?")))


def results_table(runs: Sequence[Run]) -> str:
    """A markdown table, one row per run: cost, training and test error, local energy.

    Columns: run, algorithm, gradient evaluations, effective epochs
    (gradient evaluations / (N/B): SGD-epochs of compute), training steps,
    training error (mean over the last evaluation interval's minibatches),
    test (or validation) error and loss of the evaluation network, for
    Replicated-SGD runs the replicas' mean test error and the
    output-averaged ensemble's, δE at up to four σ > 0 measured for every
    run (mean ± stderr, percentage points of training error), and training
    wall time. A Replicated-SGD run whose centre is not yet a trained
    network (``center_trained = false`` in its ``final.json``) is marked
    "(centre untrained)".
    """
    sigmas = _table_sigmas(runs)
    split = next((k.split("_")[0] for r in runs if (k := _eval_key(r.final, "error"))), "test")
    replicated = any(_eval_key(r.final, "replica_error") for r in runs)
    header = ["run", "algorithm", "grad evals", "eff. epochs", "steps", "train error (%)",
              f"{split} error (%)", f"{split} loss"]  # fmt: skip
    if replicated:
        header += [f"{split} error, replicas (%)", f"{split} error, ensemble (%)"]
    header += [f"δE σ={s:g}" for s in sigmas] + ["train time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        final = run.final
        error_key, loss_key = _eval_key(final, "error"), _eval_key(final, "loss")
        name = run.name if final.get("center_trained", True) else f"{run.name} (centre untrained)"
        cells = [
            name,
            _algorithm(run),
            _fmt(final.get("grad_evals"), "d"),
            _fmt(final.get("effective_epochs"), ".2f"),
            _fmt(final.get("step"), "d"),
            _fmt(final.get("train_error"), ".2f"),
            _fmt(final.get(error_key) if error_key else None, ".2f"),
            _fmt(final.get(loss_key) if loss_key else None, ".4f"),
        ]
        if replicated:
            replicas = final.get(_eval_key(final, "replica_error") or "", [])
            ensemble = final.get(_eval_key(final, "ensemble_error") or "")
            cells += [_fmt(_mean(replicas), ".2f"), _fmt(ensemble, ".2f")]
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


def _pyplot():
    """matplotlib.pyplot on the Agg backend (files only), or the extra's install hint."""
    matplotlib = require("matplotlib", "the figures of flatjax results")
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "the figures of flatjax results")


def _finish(plt, fig, axes, path) -> None:
    """Grid and legend on every panel, then the PNG."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_curves(runs: Sequence[Run], path: Path) -> None:
    plt = _pyplot()
    panels = [("train_loss", "training loss"), ("error", "test error of the evaluated network (%)")]
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
    axes[0].set_yscale("log")
    _finish(plt, fig, axes, path)


def _plot_local_energy(runs: Sequence[Run], path: Path) -> None:
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for run in runs:
        flat = run.flatness
        ax.errorbar(flat["sigmas"], flat["mean"], yerr=flat["stderr"], marker="o",
                    capsize=3, label=run.name)  # fmt: skip
    ax.set_xlabel("σ (multiplicative weight noise)")
    ax.set_ylabel("local energy δE (training error, % points)")
    _finish(plt, fig, [ax], path)


def _plot_error_vs_flatness(runs: Sequence[Run], path: Path, sigma: float) -> None:
    """Test error against δE(σ), one point per run (± stderr), one colour per algorithm."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    algorithms = sorted({_algorithm(r) for r in runs})
    for k, algorithm in enumerate(algorithms):
        xs, ys, errs = [], [], []
        for run in runs:
            key = _eval_key(run.final, "error")
            if _algorithm(run) != algorithm or key is None:
                continue
            i = run.flatness["sigmas"].index(sigma)
            xs.append(run.flatness["mean"][i])
            errs.append(run.flatness["stderr"][i])
            ys.append(run.final[key])
        ax.errorbar(xs, ys, xerr=errs, fmt="o", capsize=3, color=colors[k % len(colors)],
                    label=algorithm)
    ax.set_xlabel(f"local energy δE(σ = {sigma:g}) (training error, % points)")
    ax.set_ylabel("test error of the evaluated network (%)")
    _finish(plt, fig, [ax], path)


def write_results(run_dirs: Sequence[str], out: str | os.PathLike) -> tuple[str, list[Path]]:
    """Writes ``results.md`` (the table), ``curves.png`` and ``local_energy.png`` into ``out``.

    Args:
      run_dirs: training run folders.
      out: output folder (must exist).

    Returns:
      ``(table, figures)``: the markdown table and the PNG paths written
      (``local_energy.png`` and ``error_vs_local_energy.png``, test error
      against δE at the largest σ of the table, only when some run has a
      ``flatness.json``).
    """
    runs = [load_run(d, n) for d, n in zip(run_dirs, _names(run_dirs), strict=True)]
    out = Path(out)
    table = results_table(runs)
    figures = [out / "curves.png"]
    _plot_curves(runs, figures[0])
    with_flatness = [r for r in runs if r.flatness]
    if with_flatness:
        figures.append(out / "local_energy.png")
        _plot_local_energy(with_flatness, figures[-1])
        sigmas = _table_sigmas(with_flatness)
        if sigmas:
            figures.append(out / "error_vs_local_energy.png")
            _plot_error_vs_flatness(with_flatness, figures[-1], sigmas[-1])
    text = ["# flatjax results", "", table, ""]
    text += [f"![{f.stem}]({f.name})" for f in figures]
    (out / TABLE_FILE).write_text("\n".join(text) + "\n")
    return table, figures
