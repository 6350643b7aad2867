"""Where training metrics go: JSON lines, TensorBoard, a progress bar, PNG curves.

Per evaluation (by default once per epoch) one row is appended to
``<workdir>/metrics.jsonl``: ``epoch`` (in the unit of ``config.num_epochs``),
``step`` (training steps), ``grad_evals`` (gradient evaluations so far, the
honest cost: one Entropy-SGD outer step is L, one Replicated-SGD step y),
``effective_epochs`` (= grad_evals / (N/B), passes of SGD-equivalent
compute), ``train_loss``/``train_error`` (means over the training minibatches
since the previous row), ``<split>_loss``/``<split>_error`` for the evaluation
split (``test``, or ``val`` with a validation hold-out), ``coupling`` (γ),
``wall_time`` (seconds since the run started, summed over resumes), plus
algorithm-specific entries (replica and ensemble errors for Replicated-SGD).
The same scalars go to TensorBoard event files (tensorboardX, no TensorFlow)
under ``<workdir>/tensorboard``, with grouped tags (``test/error``,
``train/loss``, ``optimizer/coupling``, see :func:`tensorboard_tag`) whose
x-axis is the number of gradient evaluations, the axis on which SGD,
Entropy-SGD and Replicated-SGD runs compare; the same scalars against
training steps are under ``by_step/``. Every ``config.log_every_steps``
steps the training scalars of one step (loss, error, learning rate,
coupling, gradient norm, centre distance) go under ``train_step/``, and
the run's hyperparameters with its final metrics to the HParams tab.
:func:`plot_curves` draws them to PNG.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence

from tqdm.auto import tqdm

from flatjax._extras import require

__all__ = ["MetricsWriter", "MetricsFileError", "read_metrics", "plot_curves", "tensorboard_tag"]


class MetricsFileError(ValueError):
    """A ``metrics.jsonl`` line other than the last is not a JSON object."""


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``metrics.jsonl`` file (``[]`` if it does not exist).

    A last line that is not valid JSON (a write cut short by a crash or a
    full disk) is dropped with a one-line warning; the rows before it are
    complete.

    Raises:
      MetricsFileError: a line before the last is not a JSON object (naming
        the file and the line).

    Example:
      >>> from flatjax.training import read_metrics
      >>> read_metrics("/nonexistent/metrics.jsonl")
      []
    """
    if not os.path.exists(path):
        return []
    with open(path, errors="replace") as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    rows = []
    for k, (number, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            if k == len(lines) - 1:
                warnings.warn(
                    f"{path}: dropped its partial last line {number} (a write cut short); "
                    "the rows before it are complete.",
                    RuntimeWarning,
                    stacklevel=2,
                )
                break
            raise MetricsFileError(
                f"{path}: line {number} is not a JSON object ({error}); the file is damaged. "
                "Restore it, or rerun with --restart to move the earlier run aside."
            ) from None
        rows.append(row)
    return rows


_SPLITS = ("train", "test", "val", "replica", "ensemble", "center")


def tensorboard_tag(key: str) -> str:
    """The grouped TensorBoard tag of a metrics key: ``test_error`` → ``test/error``.

    Keys that start with a split name (train, test, val, replica, ensemble,
    center) go under it; the coupling and other optimizer quantities under
    ``optimizer/``; counters and times under ``progress/``.

    Example:
      >>> from flatjax.training.metrics import tensorboard_tag
      >>> tensorboard_tag("test_error"), tensorboard_tag("coupling"), tensorboard_tag("epoch")
      ('test/error', 'optimizer/coupling', 'progress/epoch')
    """
    head, _, rest = key.partition("_")
    if head in _SPLITS and rest:
        return f"{head}/{rest}"
    if key in ("epoch", "grad_evals", "effective_epochs", "wall_time", "skipped_steps"):
        return f"progress/{key}"
    return f"optimizer/{key}"


def read_json_object(path: str | os.PathLike) -> dict | None:
    """A run file holding one JSON object (config.json, final.json, ...); ``None`` if absent.

    Raises:
      ValueError: the file is empty, truncated or not a JSON object (naming it).
    """
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except ValueError as error:
        raise ValueError(
            f"{path} is not readable JSON ({' '.join(str(error).split())}; empty or truncated?)"
        ) from None
    return record


def _scalars(row: dict):
    for key, value in row.items():
        if isinstance(value, bool) or key == "step":
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            yield key, float(value)
        elif isinstance(value, Sequence) and not isinstance(value, str):
            for i, v in enumerate(value):
                if isinstance(v, (int, float)) and math.isfinite(v):
                    yield f"{key}/{i}", float(v)


class MetricsWriter:
    """Appends metric rows to JSON lines and TensorBoard; drives a tqdm bar.

    On resume (``resume_step > 0``) rows written after ``resume_step`` (by
    the interrupted run, past its last checkpoint) are dropped, and a partial
    last line is repaired, so the file reads as one uninterrupted run. The
    rewrite goes through a temporary file, so a crash mid-rewrite loses
    nothing.

    Args:
      workdir: the run's directory.
      total_steps: length of the progress bar.
      resume_step: step the run continues from.
      progress: show the progress bar.
      tensorboard: write TensorBoard event files.

    Example:
      >>> import tempfile
      >>> from flatjax.training.metrics import MetricsWriter, read_metrics
      >>> workdir = tempfile.mkdtemp()
      >>> with MetricsWriter(workdir, total_steps=10, progress=False) as writer:
      ...     writer.write({"epoch": 1.0, "step": 10, "train_loss": 0.5})
      >>> read_metrics(f"{workdir}/metrics.jsonl")
      [{'epoch': 1.0, 'step': 10, 'train_loss': 0.5}]
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        total_steps: int,
        resume_step: int = 0,
        progress: bool = True,
        tensorboard: bool = True,
    ):
        self.path = os.path.join(workdir, "metrics.jsonl")
        rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        tmp = f"{self.path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(tmp, self.path)
        self.rows = rows
        self._tb = None
        if tensorboard:
            summary = require("tensorboardX", "TensorBoard event files (tensorboard=True)")
            self._tb = summary.SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._bar = tqdm(
            total=total_steps, initial=resume_step, disable=not progress, unit="step",
            dynamic_ncols=True,
        )

    def progress(self, step: int, **postfix) -> None:
        """Moves the bar to ``step`` and shows ``postfix`` (loss, error, γ)."""
        self._bar.update(step - self._bar.n)
        self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def write(self, row: dict) -> None:
        """Appends one row (JSON-serialisable values) to the file and TensorBoard."""
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)
        if self._tb is not None:
            step = int(row["step"])
            grad_evals = int(row.get("grad_evals", step))
            for key, value in _scalars(row):
                tag = tensorboard_tag(key)
                self._tb.add_scalar(f"{tag}", value, global_step=grad_evals)
                self._tb.add_scalar(f"by_step/{tag}", value, global_step=step)
            self._tb.flush()

    def log_step(self, step: int, grad_evals: int, scalars: dict) -> None:
        """TensorBoard scalars of one training step, under ``train_step/`` (and ``by_step/``).

        The loop calls it every ``config.log_every_steps`` steps with the
        step's minibatch loss and error, the learning rate, the applied
        coupling γ, the gradient norm and, for Replicated-SGD, the replicas'
        mean squared distance to their centre.
        """
        if self._tb is None:
            return
        for key, value in scalars.items():
            if math.isfinite(float(value)):
                self._tb.add_scalar(f"train_step/{key}", float(value), global_step=grad_evals)
                self._tb.add_scalar(f"by_step/train_step/{key}", float(value), global_step=step)

    def log_hparams(self, hparams: dict, metrics: dict) -> None:
        """The run's hyperparameters and final metrics for TensorBoard's HParams tab."""
        if self._tb is None:
            return
        flat = {k: v for k, v in hparams.items() if isinstance(v, (bool, int, float, str))}
        scores = {f"hparam/{k}": float(v) for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)
                  and math.isfinite(float(v))}
        self._tb.add_hparams(flat, scores, name="hparams")

    def close(self) -> None:
        """Closes the bar and the TensorBoard writer."""
        self._bar.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _curve_label(key: str) -> str:
    """``test_replica_error`` -> ``test, replicas (mean)``; ``train_loss`` -> ``train``."""
    split, _, rest = key.partition("_")
    kind = rest.rpartition("_")[0]
    what = {"": "", "replica": ", replicas (mean)", "ensemble": ", ensemble"}.get(kind, f", {kind}")
    return split + what


def plot_curves(rows: list[dict], path: str | os.PathLike, *, title: str = "") -> None:
    """Draws loss and error against effective epochs (gradient evaluations / (N/B)) to a PNG.

    Args:
      rows: metric rows (as written to ``metrics.jsonl``).
      path: the PNG file to write.
      title: figure title.

    Example:
      >>> import os, tempfile
      >>> from flatjax.training import plot_curves
      >>> path = os.path.join(tempfile.mkdtemp(), "curves.png")
      >>> plot_curves([{"epoch": 1, "step": 5, "train_loss": 0.7, "test_error": 40.0},
      ...              {"epoch": 2, "step": 10, "train_loss": 0.4, "test_error": 20.0}], path)
      >>> os.path.getsize(path) > 0
      True
    """
    matplotlib = require("matplotlib", "plot_curves")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "plot_curves")

    coupled = any(float(r.get("coupling", 0.0)) > 0 for r in rows)
    fig, axes = plt.subplots(1, 3 if coupled else 2, figsize=(13 if coupled else 9, 3.6))
    x = [r.get("effective_epochs", r["epoch"]) for r in rows]
    for ax, what in zip(axes[:2], ("loss", "error"), strict=True):
        for key in sorted({k for r in rows for k in r if k.endswith("_" + what)}):
            values = [r.get(key, math.nan) for r in rows]
            if any(isinstance(v, (list, tuple)) for v in values):  # one value per replica
                values = [sum(v) / len(v) if isinstance(v, (list, tuple)) and v else math.nan
                          for v in values]
            ax.plot(x, values, marker=".", label=_curve_label(key))
        ax.set_ylabel(what + (" (%)" if what == "error" else ""))
        ax.legend(fontsize=8)
    if coupled:
        axes[2].plot(x, [r.get("coupling", 0.0) for r in rows], marker=".")
        axes[2].set_ylabel("coupling γ")
        axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("effective epochs (gradient evaluations / (N/B))")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
