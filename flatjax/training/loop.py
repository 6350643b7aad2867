"""``train_and_evaluate(config, workdir)``: the whole run, resumable.

The loop of the flax examples, with the pieces of this package: build the
data stream and the model from the config, create the state, resume from
the latest good checkpoint, run the jitted step, fetch metrics every
``config.log_every_steps`` steps (one host sync), evaluate and checkpoint at
epoch boundaries, and write ``final.json`` and ``curves.png`` at the end.

Reliability: one run per workdir at a time (:class:`WorkdirLock`); history
is never overwritten (a workdir whose metrics or checkpoints cannot be used
is refused until ``restart=True``, which moves them to ``old-<time>/``); the
running train averages are checkpointed, so a resumed run's
``metrics.jsonl`` equals an uninterrupted one's; ``nan_policy='skip'`` warns
and fails past ``max_skipped_fraction``.

Data come from a :class:`DataSource`: :func:`dataset_source` wraps
``flatjax.data`` (the catalogue of offline datasets); :func:`array_source`
wraps arrays in memory with the same resumable batching rule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import itertools
import json
import math
import numbers
import os
import socket
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from flatjax.training.checkpoint import Checkpointer
from flatjax.training.config import plan_steps, validate_config
from flatjax.training.evaluate import evaluate, evaluate_replicas
from flatjax.training.metrics import MetricsWriter, plot_curves, read_json_object, read_metrics
from flatjax.training.state import create_train_state, eval_variables, info_field
from flatjax.training.steps import NonFiniteError, check_finite, make_train_step

__all__ = [
    "DataSource",
    "array_source",
    "dataset_source",
    "train_and_evaluate",
    "ConfigMismatchError",
    "RunHistoryError",
    "WorkdirBusyError",
    "WorkdirLock",
    "TrainingInterrupted",
    "move_run_aside",
    "STRUCTURAL_FIELDS",
]

# What a run writes into its workdir; restart=True moves these aside.
RUN_FILES = (
    "config.json", "metrics.jsonl", "final.json", "curves.png", "flatness.json",
    "checkpoints", "tensorboard",
)

# Fields that change the shapes or the meaning of the saved state: a resumed
# run must agree on them with the run that wrote the checkpoints.
STRUCTURAL_FIELDS = (
    "dataset",
    "model",
    "model_kwargs",
    "algorithm",
    "batch_size",
    "seed",
    "validation_fraction",
    "esgd.inner_steps",
    "esgd.mode",
    "esgd.batch_norm",
    "rsgd.num_replicas",
)


class ConfigMismatchError(ValueError):
    """The workdir holds a run with a different structural configuration."""


class RunHistoryError(RuntimeError):
    """The workdir holds an earlier run that this run cannot resume; refusing to overwrite it."""


class WorkdirBusyError(RuntimeError):
    """Another live process holds the workdir's lock."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message names the step and the last checkpoint."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_owner(path: str) -> dict:
    try:
        with open(path) as f:
            owner = json.loads(f.read() or "{}")
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def untrained_center(row: dict, *, margin: float = 5.0) -> str | None:
    """Why a Replicated-SGD centre is not yet a trained network, or ``None``.

    The centre c = mean of the replicas is the network Replicated-SGD
    evaluates, but early in training, before the coupling has pulled the
    replicas together, it is an average of unrelated networks whose error is
    far above theirs (and whose flatness means nothing). It is flagged when
    its error exceeds the replicas' mean error by more than ``margin`` points
    and by more than half of it.

    Args:
      row: a metrics row or ``final.json`` with ``<split>_error`` and
        ``<split>_replica_error`` (a list, one per replica).
      margin: the tolerated excess in percentage points.

    Returns:
      A one-line explanation, or ``None`` when the centre is trained (or the
      row has no replica errors).

    Example:
      >>> from flatjax.training.loop import untrained_center
      >>> untrained_center({"test_error": 73.0, "test_replica_error": [9.0, 11.0]})[:40]
      'The Replicated-SGD centre has test error'
      >>> untrained_center({"test_error": 4.0, "test_replica_error": [4.5, 5.0]}) is None
      True
    """
    for key, replicas in row.items():
        if not key.endswith("_replica_error") or not isinstance(replicas, (list, tuple)):
            continue
        split = key[: -len("_replica_error")]
        center = row.get(f"{split}_error")
        if center is None or not replicas:
            continue
        mean = sum(float(r) for r in replicas) / len(replicas)
        if float(center) > mean + margin and float(center) > 1.5 * mean:
            return (
                f"The Replicated-SGD centre has {split} error {float(center):.1f} % against its "
                f"replicas' {mean:.1f} %: it is not yet a trained network (the replicas have not "
                "converged to a common region), so its error and flatness are not results. Train "
                "longer or raise the coupling; final.json marks it center_trained = false."
            )
    return None


class WorkdirLock:
    """An advisory lock on ``<workdir>/.lock``: one training run per workdir.

    ``fcntl.flock`` holds the lock for as long as the process lives (the
    kernel drops it when the process dies); the file records the owner's pid
    and hostname. A lock file whose recorded owner is gone (left by a process
    that died) is taken over with a warning. On filesystems without
    ``flock`` the recorded pid decides: a live pid on this host holds the
    lock, a dead one is stale.

    Example:
      >>> import tempfile
      >>> from flatjax.training.loop import WorkdirLock, WorkdirBusyError
      >>> workdir = tempfile.mkdtemp()
      >>> with WorkdirLock(workdir):
      ...     pass
    """

    def __init__(self, workdir: str | os.PathLike):
        self.path = os.path.join(os.fspath(workdir), ".lock")
        self._fd = None

    def acquire(self) -> None:
        """Takes the lock, or raises :class:`WorkdirBusyError` naming the owner."""
        host = socket.gethostname()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flocked = True
        except OSError as error:
            if error.errno in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                owner = _read_owner(self.path)
                raise WorkdirBusyError(self._busy(owner)) from None
            flocked = False  # no flock on this filesystem: the recorded pid decides
        owner = _read_owner(self.path)
        pid, owner_host = owner.get("pid"), owner.get("host")
        if isinstance(pid, int) and pid != os.getpid():
            if not flocked and owner_host == host and _pid_alive(pid):
                os.close(fd)
                raise WorkdirBusyError(self._busy(owner))
            warnings.warn(
                f"{self.path}: took over the stale lock of pid {pid} on {owner_host} "
                "(that run ended without releasing it).",
                RuntimeWarning,
                stacklevel=3,
            )
        record = json.dumps({"pid": os.getpid(), "host": host, "since": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        self._fd = fd

    def _busy(self, owner: dict) -> str:
        who = f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}"
        return (
            f"{os.path.dirname(self.path)} is in use by another run ({who}; lock file "
            f"{self.path}). Wait for it to finish, stop it, or use another workdir."
        )

    def release(self) -> None:
        """Clears the owner record and drops the lock."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def move_run_aside(workdir: str | os.PathLike) -> str | None:
    """Moves a run's files (metrics, checkpoints, config, ...) to ``workdir/old-<time>/``.

    Nothing is deleted. Returns the new folder, or None when there was
    nothing to move.
    """
    workdir = os.fspath(workdir)
    present = [n for n in RUN_FILES if os.path.lexists(os.path.join(workdir, n))]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside = os.path.join(workdir, f"old-{stamp}")
    n = 1
    while os.path.exists(aside):
        n += 1
        aside = os.path.join(workdir, f"old-{stamp}-{n}")
    os.makedirs(aside)
    for name in present:
        os.rename(os.path.join(workdir, name), os.path.join(aside, name))
    return aside


@dataclasses.dataclass(frozen=True)
class DataSource:
    """The data a run needs, independent of where it comes from.

    Attributes:
      info: object or mapping with ``num_classes`` and ``input_shape``.
      data_steps_per_epoch: minibatches per pass over the training set (N/B).
      train_batches: ``train_batches(start_step, num_replicas, stack)`` → an
        endless iterator of ``{'image', 'label'}`` numpy batches with leading
        axes ``[y, L, B]`` (each only when given); step k must be a pure
        function of the seed and k, so a resumed stream is bitwise the same.
      eval_split: name of the evaluation split ('test' or 'val').
      eval_arrays: ``(x, y)`` of the evaluation split.
      stats_batches: ``stats_batches()`` → a few training batches ``[B, ...]``
        for recomputing BatchNorm statistics of the centre.
    """

    info: Any
    data_steps_per_epoch: int
    train_batches: Callable[..., Iterator[dict]]
    eval_split: str
    eval_arrays: tuple
    stats_batches: Callable[[], list]


def array_source(
    train: tuple,
    evaluation: tuple,
    *,
    num_classes: int,
    batch_size: int,
    seed: int = 0,
    eval_split: str = "test",
) -> DataSource:
    """A :class:`DataSource` over arrays in memory.

    Batch j of replica r holds examples π_{r,e}(jB − eN/B·B …) of the
    permutation π_{r,e} = ``default_rng([seed, r, e]).permutation(N)`` of
    epoch e = ⌊j / (N/B)⌋ (the last partial batch of each epoch is dropped),
    so every step is a pure function of ``(seed, step)`` and streams resume
    exactly.

    Args:
      train: ``(x [N, ...], y [N])`` training arrays.
      evaluation: ``(x, y)`` of the evaluation split.
      num_classes: number of classes.
      batch_size: B.
      seed: shuffling seed.
      eval_split: name for the evaluation split in metrics.

    Returns:
      A :class:`DataSource`.

    Example:
      >>> import numpy as np
      >>> from flatjax.training import array_source
      >>> x, y = np.zeros((10, 3), np.float32), np.arange(10) % 2
      >>> data = array_source((x, y), (x, y), num_classes=2, batch_size=4)
      >>> data.data_steps_per_epoch, next(data.train_batches(0, 3, 2))["image"].shape
      (2, (3, 2, 4, 3))
    """
    for name, value in (("batch_size", batch_size), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    for name, (xs, ys) in (("train", train), ("evaluation", evaluation)):
        if len(xs) != len(ys):
            raise ValueError(
                f"{name} inputs and labels must have the same length, got x with {len(xs)} "
                f"rows and y with {len(ys)} labels."
            )
    x, y = np.asarray(train[0], np.float32), np.asarray(train[1], np.int32)
    n = len(y)
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size={batch_size} exceeds the {n} training examples.")

    def batch(replica, j):
        epoch, pos = divmod(j, per_epoch)
        order = np.random.default_rng([seed, replica, epoch]).permutation(n)
        idx = order[pos * batch_size : (pos + 1) * batch_size]
        return {"image": x[idx], "label": y[idx]}

    def train_batches(start_step=0, num_replicas=None, stack=None):
        step = start_step
        while True:
            replicas = []
            for r in range(num_replicas or 1):
                if stack:
                    parts = [batch(r, step * stack + i) for i in range(stack)]
                    replicas.append({k: np.stack([p[k] for p in parts]) for k in parts[0]})
                else:
                    replicas.append(batch(r, step))
            if num_replicas is None:
                yield replicas[0]
            else:
                yield {k: np.stack([b[k] for b in replicas]) for k in replicas[0]}
            step += 1

    def stats_batches():
        return [batch(0, j) for j in range(min(per_epoch, 10))]

    info = {"num_classes": num_classes, "input_shape": tuple(x.shape[1:]), "num_train": n}
    evaluation = (np.asarray(evaluation[0], np.float32), np.asarray(evaluation[1], np.int32))
    return DataSource(info, per_epoch, train_batches, eval_split, evaluation, stats_batches)


def dataset_source(config: ml_collections.ConfigDict) -> DataSource:
    """A :class:`DataSource` over ``flatjax.data``'s catalogue dataset ``config.dataset``.

    Evaluation uses the ``test`` split, or the ``validation`` hold-out (the
    tail ``config.validation_fraction`` of train) when that is > 0.

    Example:
      >>> from flatjax.training import base_config, dataset_source
      >>> config = base_config()
      >>> config.dataset = "digits"
      >>> dataset_source(config).data_steps_per_epoch  # doctest: +SKIP
      11
    """
    from flatjax import data

    name, data_dir = config.dataset, config.data_dir
    fraction = config.validation_fraction
    info = data.get_info(name, data_dir=data_dir)
    per_epoch = data.steps_per_epoch(
        name, config.batch_size, validation_fraction=fraction, data_dir=data_dir
    )

    def train_batches(start_step=0, num_replicas=None, stack=None):
        return data.train_batches(
            name, batch_size=config.batch_size, seed=config.seed, num_replicas=num_replicas,
            stack=stack, augment=config.augment, start_step=start_step, data_dir=data_dir,
            validation_fraction=fraction,
        )

    split = "validation" if fraction > 0 else "test"
    arrays = data.load_arrays(name, split, data_dir=data_dir, validation_fraction=fraction)

    def stats_batches():
        it = data.eval_batches(
            name, "train", config.batch_size, data_dir=data_dir, validation_fraction=fraction
        )
        return [b for _, b in zip(range(10), it, strict=False)]

    return DataSource(info, per_epoch, train_batches, "val" if fraction > 0 else "test",
                      arrays, stats_batches)


def _check_workdir(workdir) -> str:
    workdir = os.path.abspath(os.fspath(workdir))
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir):
            pass
    except OSError as error:
        raise PermissionError(
            f"The workdir {workdir} cannot be created or written to ({error}). "
            "Pass a writable directory."
        ) from error
    return workdir


def _lookup(config_dict: dict, dotted: str):
    value = config_dict
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _restart_hint() -> str:
    return "rerun with --restart (restart=True) to move the earlier run aside and start over"


def _check_saved_config(workdir: str, config: ml_collections.ConfigDict) -> dict:
    """Compares ``config`` with the workdir's ``config.json``; returns it as JSON (unwritten)."""
    path = os.path.join(workdir, "config.json")
    current = json.loads(config.to_json())
    if os.path.exists(path):
        try:
            saved = read_json_object(path)
        except ValueError as error:
            raise RunHistoryError(f"{error}. Restore it, or {_restart_hint()}.") from None
        differ = [
            f"{k}: saved {_lookup(saved, k)!r}, now {_lookup(current, k)!r}"
            for k in STRUCTURAL_FIELDS
            if _lookup(saved, k) != _lookup(current, k)
        ]
        if differ:
            raise ConfigMismatchError(
                f"The workdir {workdir} holds a run with a different configuration "
                f"({'; '.join(differ)}). Use a fresh workdir, or restore the config."
            )
        changed = sorted(
            k for k in set(saved) | set(current)
            if k not in ("progress",) and saved.get(k) != current.get(k)
        )
        if changed:
            warnings.warn(
                f"Resuming in {workdir} with changed config fields {changed}: schedules and "
                "durations follow the new values, so the run will not equal an uninterrupted one.",
                UserWarning,
                stacklevel=3,
            )
    return current


def _write_json(path: str, record: dict, **kw) -> None:
    """Writes ``record`` through a temporary file, so a crash leaves the old file whole."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, **kw)
    os.replace(tmp, path)


def _check_history(workdir: str, checkpoint_dir: str, checkpoint_every: int) -> None:
    """Refuses to start from scratch over an earlier run that got past a checkpoint."""
    found = []
    if os.path.isdir(checkpoint_dir):
        aside = sorted(n for n in os.listdir(checkpoint_dir) if n.startswith("corrupt-"))
        if aside:
            found.append(f"unreadable checkpoints {', '.join(aside)}")
    rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    last = max((int(r.get("step", 0)) for r in rows), default=0)
    if last >= checkpoint_every:
        found.append(f"metrics.jsonl up to step {last}")
    if os.path.exists(os.path.join(workdir, "final.json")):
        found.append("final.json")
    if found:
        raise RunHistoryError(
            f"{workdir} holds an earlier run ({'; '.join(found)}) but no checkpoint to resume "
            f"from. Refusing to restart from scratch over it: {_restart_hint()}, or use a "
            "fresh workdir."
        )


def _close_all(*closers) -> None:
    """Calls every closer; re-raises the first error once all have run."""
    first = None
    for close in closers:
        try:
            close()
        except Exception as error:  # noqa: BLE001 - re-raised below
            first = first or error
    if first is not None:
        raise first


def _evaluate(state, config, data: DataSource) -> dict:
    x, y = data.eval_arrays
    split = data.eval_split
    recompute = (
        state.algorithm == "replicated_sgd"
        and bool(state.batch_stats)
        and config.rsgd.center_batch_stats == "recompute"
    )
    batches = data.stats_batches() if recompute else None
    variables = eval_variables(
        state, center_batch_stats=config.rsgd.center_batch_stats, batches=batches
    )
    out = evaluate(state.apply_fn, variables, x, y, batch_size=config.eval_batch_size)
    row = {f"{split}_loss": out["loss"], f"{split}_error": out["error"]}
    if state.algorithm == "replicated_sgd":
        replicated = {"params": state.params}
        if state.batch_stats:
            replicated["batch_stats"] = state.batch_stats
        rep = evaluate_replicas(state.apply_fn, replicated, x, y, batch_size=config.eval_batch_size)
        row.update({f"{split}_{k}": v for k, v in rep.items()})
    return row


def _batch_shape(config):
    if config.algorithm == "replicated_sgd":
        return {"num_replicas": int(config.rsgd.num_replicas)}
    if config.algorithm == "entropy_sgd" and config.esgd.mode == "scan":
        return {"stack": int(config.esgd.inner_steps)}
    return {}


def _mesh(config):
    """The ``("replica", "data")`` mesh of ``config.mesh``, or None for one device."""
    replica, data = int(config.mesh.replica), int(config.mesh.data)
    if replica * data == 1:
        return None
    import flatjax

    if replica > 1 and config.algorithm != "replicated_sgd":
        raise ValueError(
            f"mesh.replica = {replica} needs algorithm 'replicated_sgd' (got "
            f"{config.algorithm!r}); SGD and Entropy-SGD use the 'data' axis only."
        )
    return flatjax.make_mesh(replica=replica, data=data)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | os.PathLike,
    *,
    model=None,
    data: DataSource | None = None,
    restart: bool = False,
) -> dict:
    """Trains per ``config``, evaluating and checkpointing in ``workdir``; resumes if possible.

    Files in ``workdir``: ``config.json`` (checked on resume: structural
    fields must match), ``checkpoints/<step>/`` (orbax, the last
    ``keep_checkpoints``), ``metrics.jsonl``, ``tensorboard/``,
    ``final.json`` (the last row plus run facts) and ``curves.png``;
    ``.lock`` while it runs (:class:`WorkdirLock`).

    Resuming: the latest checkpoint that passes its checksum is restored
    with the loop's running train sums, so ``metrics.jsonl`` ends up as an
    uninterrupted run's would (apart from ``wall_time``). A workdir whose
    history cannot be used (checkpoints that cannot be read, metrics past
    any checkpoint, a damaged ``config.json`` or ``metrics.jsonl``) is
    refused until ``restart=True``, which moves the earlier run to
    ``old-<time>/`` (nothing is deleted). ``config.json`` is written only
    once every check has passed.

    Args:
      config: a config from :func:`flatjax.training.base_config`.
      workdir: the run's directory (created; must be writable).
      model: a flax module to use instead of ``flatjax.models.get_model(
        config.model, num_classes, **config.model_kwargs)``.
      data: a :class:`DataSource` to use instead of :func:`dataset_source`.
      restart: move an earlier run in ``workdir`` aside and start from scratch.

    Returns:
      The final metrics: the last evaluation row (``epoch``, ``step``,
      ``grad_evals``, ``train_loss``, ``train_error``, ``test_loss``,
      ``test_error``, ``coupling``, ...).

    Raises:
      ValueError: invalid config values.
      PermissionError: the workdir is not writable.
      ConfigMismatchError: the workdir holds a run of another configuration.
      flatjax.training.CheckpointMismatchError: its checkpoints do not fit the model/optimizer.
      flatjax.training.CorruptCheckpointError: checkpoints exist but none can be read.
      flatjax.training.NonFiniteError: divergence under ``nan_policy='stop'``;
        under ``'skip'``, more than ``max_skipped_fraction`` of the steps
        skipped or a non-finite final loss.
      RunHistoryError: an earlier run in ``workdir`` cannot be resumed.
      WorkdirBusyError: another live run holds ``workdir``.
      TrainingInterrupted: Ctrl-C (a KeyboardInterrupt naming the step and
        the last checkpoint).

    Example:
      >>> import tempfile, numpy as np
      >>> from flatjax.models.mlp import MLPTiny
      >>> from flatjax.training import array_source, base_config, train_and_evaluate
      >>> x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
      >>> y = (x[:, 0] > 0).astype(np.int32)
      >>> config = base_config()
      >>> config.batch_size, config.num_epochs, config.progress = 16, 1, False
      >>> data = array_source((x, y), (x, y), num_classes=2, batch_size=16)
      >>> out = train_and_evaluate(config, tempfile.mkdtemp(), model=MLPTiny(num_classes=2),
      ...                          data=data)
      >>> out["epoch"], out["step"], out["grad_evals"]
      (1.0, 4, 4)
    """
    validate_config(config)
    workdir = _check_workdir(workdir)
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else None
    if lock is not None:
        lock.acquire()
    try:
        if restart:
            aside = move_run_aside(workdir)
            if aside is not None:
                warnings.warn(f"restart: moved the earlier run to {aside}.", UserWarning,
                              stacklevel=2)
        return _train(config, workdir, model, data)
    finally:
        if lock is not None:
            lock.release()


def _guard_finite(metrics: dict, step: int, restored_step: int | None, window: int,
                  checkpoint_dir: str) -> None:
    """check_finite, saying when the divergence comes right after a restore."""
    try:
        check_finite(metrics, step)
    except NonFiniteError as error:
        if restored_step is None or step > restored_step + window:
            raise
        path = os.path.join(checkpoint_dir, str(restored_step))
        raise NonFiniteError(
            f"{error} This is {step - restored_step} step(s) after resuming from the "
            f"checkpoint at step {restored_step}: the restored checkpoint may be bad. Move "
            f"{path} aside to resume from the previous one, or rerun with --restart."
        ) from None


def _skip_failure(skipped: int, done: int, limit: float) -> str | None:
    """The failure message when more than ``limit`` of ``done`` steps were skipped."""
    if done and skipped / done > limit:
        return (
            f"nan_policy='skip' skipped {skipped} of {done} steps ({100 * skipped / done:.1f}%, "
            f"more than max_skipped_fraction = {limit:g}): the run is not training. Lower the "
            "learning rate or bound the coupling, or raise config.max_skipped_fraction."
        )
    return None


def _train(config, workdir: str, model, data) -> dict:
    data = data if data is not None else dataset_source(config)
    if model is None:
        from flatjax import models

        num_classes = int(info_field(data.info, "num_classes"))
        model = models.get_model(config.model, num_classes, **dict(config.model_kwargs))
    current_config = _check_saved_config(workdir, config)

    plan = plan_steps(config, int(data.data_steps_per_epoch))
    shape = _batch_shape(config)
    balance = None
    if config.algorithm == "replicated_sgd" and config.rsgd.coupling is None:
        # The authors' balanced γ_0: the mean training loss at initialisation,
        # over one pass of the training set unless rsgd.balance_batches says fewer.
        count = config.rsgd.balance_batches or int(data.data_steps_per_epoch)
        balance = itertools.islice(data.train_batches(0), count)
    state = create_train_state(
        config, model, data.info, jax.random.PRNGKey(config.seed), plan=plan,
        balance_batches=balance,
    )
    checkpoint_dir = os.path.join(workdir, "checkpoints")
    checkpointer = Checkpointer(checkpoint_dir, keep=config.keep_checkpoints, cleanup_tmp=True)
    try:
        restored = checkpointer.restore_latest(state)
        if restored is None:
            _check_history(workdir, checkpoint_dir, plan.checkpoint_every)
            loop_state = None
        else:
            state = restored
            loop_state = checkpointer.loop_state(checkpointer.restored_step)
        start = int(state.step)
        writer = MetricsWriter(
            workdir, total_steps=plan.total_steps, resume_step=start, progress=config.progress
        )
    except BaseException:
        checkpointer.close()
        raise
    # Every check has passed: only now does the workdir's config.json change.
    _write_json(os.path.join(workdir, "config.json"), current_config, indent=2, sort_keys=True)
    wall_offset = float(writer.rows[-1].get("wall_time", 0.0)) if writer.rows else 0.0

    train_step = make_train_step(config)
    place = lambda batch: batch
    mesh = _mesh(config)
    if mesh is not None:
        import flatjax

        layout = flatjax.batch_layout(config)
        train_step = flatjax.shard_train_step(train_step, mesh, state, layout)
        state = flatjax.shard_train_state(state, mesh)

        def place(batch):
            # Every process draws the same global batch (same seed) and hands
            # over only the rows its own devices hold.
            local = {k: v[flatjax.process_batch_slice(mesh, layout, v.shape)]
                     for k, v in batch.items()}
            shapes = {k: v.shape for k, v in batch.items()}
            return flatjax.host_batch_to_global(local, mesh, layout, shapes)

    # The running train sums since the last evaluation row are part of the
    # checkpoint, so a resume between evaluations continues them exactly.
    loop_state = loop_state or {}
    sums = {"loss": 0.0, "error": 0.0, **loop_state.get("sums", {})}
    count = int(loop_state.get("count", 0))
    skipped = int(loop_state.get("skipped", 0))
    limit = float(config.get("max_skipped_fraction", 0.1))
    batches = iter(data.train_batches(start, **shape))
    started = time.time()
    pending = []
    last_row: dict = writer.rows[-1] if writer.rows else {}
    clamp_warned = skip_warned = False
    restored_step = checkpointer.restored_step
    done = start
    failing = True
    try:
        for step in range(start, plan.total_steps):
            state, metrics = train_step(state, place(next(batches)))
            pending.append(metrics)
            done = step + 1
            at_eval = done % plan.eval_every == 0 or done == plan.total_steps
            at_ckpt = done % plan.checkpoint_every == 0 or done == plan.total_steps
            if not (at_eval or at_ckpt or done % config.log_every_steps == 0):
                continue
            fetched = jax.device_get(pending)
            for i, m in enumerate(fetched):
                step_i = done - len(fetched) + i + 1
                if config.nan_policy == "stop":
                    _guard_finite(m, step_i, restored_step, config.log_every_steps,
                                  checkpoint_dir)
                if not bool(m["finite"]):
                    skipped += 1
                    continue
                sums["loss"] += float(m["loss"])
                sums["error"] += float(m["error"])
                count += 1
            pending = []
            if skipped and not skip_warned:
                skip_warned = True
                warnings.warn(
                    f"step {done}: nan_policy='skip' has skipped {skipped} step(s) with a "
                    "non-finite loss or gradient (logged as skipped_steps); the run fails if "
                    f"more than max_skipped_fraction = {limit:g} of its steps are skipped.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            latest = fetched[-1]
            requested = float(latest.get("requested_coupling", latest["coupling"]))
            if requested > float(latest["coupling"]) * (1 + 1e-6) and not clamp_warned:
                clamp_warned = True
                warnings.warn(
                    f"step {done}: the coupling schedule asks for γ = {requested:.4g}, past "
                    "the stability bound of the explicit coupling step; it is clamped to "
                    f"γ = {float(latest['coupling']):.4g} (logged as coupling, the request "
                    "as requested_coupling).",
                    stacklevel=2,
                )
            writer.progress(
                done, loss=float(latest["loss"]), error=float(latest["error"]),
                coupling=float(latest["coupling"]),
            )
            if at_eval:
                grad_evals = done * plan.grads_per_step
                row = {
                    "epoch": done / plan.steps_per_epoch,
                    "step": done,
                    "grad_evals": grad_evals,
                    "effective_epochs": grad_evals / plan.data_steps_per_epoch,
                    "train_loss": sums["loss"] / count if count else float("nan"),
                    "train_error": sums["error"] / count if count else float("nan"),
                    "coupling": float(latest["coupling"]),
                    "requested_coupling": requested,
                    "skipped_steps": skipped,
                }
                if "replica_distance" in latest:
                    row["replica_distance"] = float(latest["replica_distance"])
                row.update(_evaluate(state, config, data))
                row["wall_time"] = wall_offset + time.time() - started
                writer.write(row)
                last_row = row
                sums, count = {"loss": 0.0, "error": 0.0}, 0
            if at_ckpt:
                checkpointer.save(
                    state, loop_state={"sums": sums, "count": count, "skipped": skipped}
                )
            if at_eval and config.nan_policy == "skip":
                message = _skip_failure(skipped, done, limit)
                if message:
                    raise NonFiniteError(message)
        failing = False
    except KeyboardInterrupt:
        steps = checkpointer.all_steps()
        last = f"the last checkpoint is step {steps[-1]}" if steps else "there is no checkpoint yet"
        raise TrainingInterrupted(
            f"interrupted at step {done}; {last}; rerun the same command to resume"
        ) from None
    finally:
        if failing:  # the run's own error matters more than one from closing
            with contextlib.suppress(Exception):
                _close_all(writer.close, checkpointer.close)
        else:
            _close_all(writer.close, checkpointer.close)

    final = dict(last_row)
    final.update(
        algorithm=config.algorithm, dataset=config.dataset, model=config.model,
        total_steps=plan.total_steps, grads_per_step=plan.grads_per_step,
        data_steps_per_epoch=plan.data_steps_per_epoch,
    )
    untrained = untrained_center(final)
    if untrained is not None:
        final["center_trained"] = False
        warnings.warn(untrained, RuntimeWarning, stacklevel=2)
    elif any(k.endswith("_replica_error") for k in final):
        final["center_trained"] = True
    _write_json(os.path.join(workdir, "final.json"), final, indent=2)
    if writer.rows:
        plot_curves(
            writer.rows, os.path.join(workdir, "curves.png"),
            title=f"{config.algorithm} · {config.model} · {config.dataset}",
        )
    losses = {k: v for k, v in last_row.items() if k.endswith("_loss") and k.count("_") == 1}
    bad = [f"{k} = {v}" for k, v in losses.items() if not math.isfinite(float(v))]
    if bad:
        raise NonFiniteError(
            f"The run finished with a non-finite loss ({', '.join(bad)}; "
            f"{skipped} of {plan.total_steps} steps skipped); the final network is not usable. "
            "Lower the learning rate or bound the coupling."
        )
    return final
