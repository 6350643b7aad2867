"""A run's workdir: one run at a time, its history never overwritten, its config checked.

* :class:`WorkdirLock`: an advisory ``fcntl`` lock on ``<workdir>/.lock``
  holding the owner's pid and host; a second run on the same workdir is
  refused with one line (:class:`WorkdirBusyError`), a stale lock (its
  process is gone) is taken over with a warning.
* :func:`move_run_aside`: ``restart=True`` moves an earlier run's files to
  ``old-<time>/`` instead of deleting them.
* The checks a resume makes before anything is written: the saved
  ``config.json`` agrees on :data:`STRUCTURAL_FIELDS`, and a workdir with
  history but no usable checkpoint is refused (:class:`RunHistoryError`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import tempfile
import time
import warnings

import ml_collections

from flatjax.training.metrics import read_json_object, read_metrics

__all__ = [
    "RUN_FILES",
    "STRUCTURAL_FIELDS",
    "ConfigMismatchError",
    "RunHistoryError",
    "WorkdirBusyError",
    "TrainingInterrupted",
    "WorkdirLock",
    "move_run_aside",
    "check_workdir",
    "check_saved_config",
    "check_history",
    "write_json",
    "close_all",
    "restart_hint",
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


def check_workdir(workdir) -> str:
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


def restart_hint() -> str:
    return "rerun with --restart (restart=True) to move the earlier run aside and start over"


def check_saved_config(workdir: str, config: ml_collections.ConfigDict) -> dict:
    """Compares ``config`` with the workdir's ``config.json``; returns it as JSON (unwritten)."""
    path = os.path.join(workdir, "config.json")
    current = json.loads(config.to_json())
    if os.path.exists(path):
        try:
            saved = read_json_object(path)
        except ValueError as error:
            raise RunHistoryError(f"{error}. Restore it, or {restart_hint()}.") from None
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


def write_json(path: str, record: dict, **kw) -> None:
    """Writes ``record`` through a temporary file, so a crash leaves the old file whole."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, **kw)
    os.replace(tmp, path)


def check_history(workdir: str, checkpoint_dir: str, checkpoint_every: int) -> None:
    """Refuses to start from scratch over an earlier run that got past a checkpoint."""
    found = []
    if os.path.isdir(checkpoint_dir):
        aside = sorted(n for n in os.listdir(checkpoint_dir) if n.startswith("corrupt-"))
        if aside:
            found.append(f"unreadable checkpoints {', '.join(aside)}")
    rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    last = max((int(r.get("step", 0)) for r in rows), default=0)
    # A kill between the first checkpoint's metrics row and the checkpoint itself
    # leaves rows up to that step and no checkpoint: nothing is lost by starting over.
    if last > checkpoint_every:
        found.append(f"metrics.jsonl up to step {last}")
    if os.path.exists(os.path.join(workdir, "final.json")):
        found.append("final.json")
    if found:
        raise RunHistoryError(
            f"{workdir} holds an earlier run ({'; '.join(found)}) but no checkpoint to resume "
            f"from. Refusing to restart from scratch over it: {restart_hint()}, or use a "
            "fresh workdir."
        )


def close_all(*closers) -> None:
    """Calls every closer; re-raises the first error once all have run."""
    first = None
    for close in closers:
        try:
            close()
        except Exception as error:  # noqa: BLE001 - re-raised below
            first = first or error
    if first is not None:
        raise first
