"""Checkpoints with orbax: periodic saves, keep-last-k, exact resume, fault handling.

A checkpoint holds the whole :class:`~flatjax.training.TrainState` pytree
(step, params, batch_stats, optimizer state, PRNG key), so a resumed run
continues bitwise where it stopped: the data stream restarts at the saved
step and every key is in the state.

Guarantees:

* Structure. Restores go against an abstract target built from the freshly
  created state, so NamedTuples and tuples in the optimizer state come back
  as such (ferminet#105), not as dicts or lists.
* Mismatch. Before restoring, the checkpoint's array names, shapes and
  dtypes are compared with the target's; a different model, optimizer or
  number of replicas raises :class:`CheckpointMismatchError` naming the
  differing arrays.
* Corruption. If the latest checkpoint cannot be read (truncated or missing
  files), it is moved aside to ``corrupt-<step>`` with a warning and the
  previous one is tried; when none can be read, :class:`CorruptCheckpointError`
  stops the run. A run never silently restarts from scratch over existing
  checkpoints.
* Integrity. Orbax checks no checksum of the array data (only zarr3 shard
  indices carry a crc32c), so after orbax has committed a checkpoint the
  sha256 of every file in its step directory is written to
  ``<step>/flatjax.sha256`` (the format of ``sha256sum``, so
  ``sha256sum -c flatjax.sha256`` verifies it by hand) and checked before
  every restore; a mismatch counts as corruption. A checkpoint without the
  manifest (written before it existed, or killed between orbax's commit and
  the manifest) is restored unchecked.
* Loop state. ``save(state, loop_state=...)`` stores a small JSON record
  (the running train-metric sums of the loop) in ``<step>/loop_state.json``,
  covered by the manifest; :meth:`Checkpointer.loop_state` reads it back.
* Interrupted writes. Orbax writes a checkpoint into a temporary directory
  and renames it when complete (``commit_success.txt``); a process killed
  mid-save leaves only the temporary directory, which is ignored, and the
  previous checkpoints are untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import jax
import orbax.checkpoint as ocp

from flatjax.training.state import TrainState

__all__ = [
    "Checkpointer",
    "CheckpointMismatchError",
    "CorruptCheckpointError",
    "checkpoint_tree",
    "write_manifest",
    "verify_manifest",
]


class CheckpointMismatchError(ValueError):
    """The checkpoint's arrays do not match the run's state (model, optimizer, replicas)."""


class CorruptCheckpointError(RuntimeError):
    """Checkpoints exist but none of them can be read."""


def checkpoint_tree(state: TrainState) -> dict:
    """The pytree a checkpoint stores: ``step, params, batch_stats, opt_state, rng``.

    Plus ``hparams`` when the state has measured hyperparameters (the
    balanced γ_0 of Replicated-SGD), so that a restore rebuilds the same
    optimizer without measuring again.
    """
    tree = {
        "step": state.step,
        "params": state.params,
        "batch_stats": state.batch_stats,
        "opt_state": state.opt_state,
        "rng": state.rng,
    }
    if state.hparams:
        tree["hparams"] = state.hparams
    return tree


MANIFEST = "flatjax.sha256"
LOOP_STATE = "loop_state.json"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _step_files(step_dir: str) -> list[str]:
    """Paths of every file under ``step_dir`` relative to it, sorted, the manifest excluded."""
    out = []
    for root, _, files in os.walk(step_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(step_dir: str) -> None:
    """Writes ``flatjax.sha256``: the sha256 of every file in ``step_dir`` (sha256sum format)."""
    lines = [f"{_sha256(os.path.join(step_dir, rel))}  {rel}\n" for rel in _step_files(step_dir)]
    _write_atomic(os.path.join(step_dir, MANIFEST), "".join(lines))


def verify_manifest(step_dir: str) -> bool:
    """Checks ``step_dir`` against its manifest; False when there is no manifest.

    Raises:
      CorruptCheckpointError: a file is missing, added or differs from its sha256.
    """
    path = os.path.join(step_dir, MANIFEST)
    if not os.path.exists(path):
        return False
    expected = {}
    with open(path, errors="replace") as f:
        for line in f:
            digest, sep, rel = line.rstrip("\n").partition("  ")
            if not sep or len(digest) != 64:
                raise CorruptCheckpointError(f"{path} is not a sha256 manifest")
            expected[rel] = digest
    present = set(_step_files(step_dir))
    for rel in sorted(set(expected) | present):
        if rel not in present:
            raise CorruptCheckpointError(f"{rel} listed in the manifest is missing")
        if rel not in expected:
            raise CorruptCheckpointError(f"{rel} is not in the manifest")
        if _sha256(os.path.join(step_dir, rel)) != expected[rel]:
            raise CorruptCheckpointError(f"{rel} does not match its sha256 in the manifest")
    return True


def _key_name(key) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _target_arrays(tree) -> dict:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        ".".join(_key_name(k) for k in path): (tuple(leaf.shape), str(leaf.dtype))
        for path, leaf in leaves
    }


def _saved_arrays(metadata) -> dict:
    tree = getattr(metadata, "tree", metadata)
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "name"))
    return {leaf.name: (tuple(leaf.shape), str(leaf.dtype)) for leaf in leaves}


def _describe_mismatch(saved: dict, target: dict) -> list[str]:
    problems = []
    for name in sorted(set(saved) | set(target)):
        if name not in target:
            problems.append(f"{name}: in the checkpoint {saved[name][0]}, not in this run")
        elif name not in saved:
            problems.append(f"{name}: in this run {target[name][0]}, not in the checkpoint")
        elif saved[name] != target[name]:
            problems.append(
                f"{name}: checkpoint shape/dtype {saved[name]} vs this run {target[name]}"
            )
    return problems


class Checkpointer:
    """Saves and restores :class:`~flatjax.training.TrainState` under ``directory``.

    Args:
      directory: where step directories ``<step>/`` are written (created).
      keep: how many of the latest checkpoints to keep.
      cleanup_tmp: delete temporary directories left by interrupted saves.
        Only the process that owns the run should: another process (e.g. an
        evaluation while training runs) would delete a save in progress.

    Example:
      >>> import tempfile, jax, jax.numpy as jnp, optax
      >>> from flatjax.training import Checkpointer, TrainState
      >>> tx = optax.sgd(0.1, momentum=0.9)
      >>> params = {"w": jnp.ones(3)}
      >>> state = TrainState(step=jnp.int32(5), params=params, batch_stats={},
      ...                    opt_state=tx.init(params), rng=jax.random.PRNGKey(0),
      ...                    apply_fn=None, tx=tx)
      >>> ckpt = Checkpointer(tempfile.mkdtemp(), keep=2)
      >>> ckpt.save(state)
      >>> fresh = state.replace(step=jnp.int32(0), params={"w": jnp.zeros(3)})
      >>> restored = ckpt.restore_latest(fresh)
      >>> int(restored.step), restored.params["w"].tolist(), type(restored.opt_state[0]).__name__
      (5, [1.0, 1.0, 1.0], 'TraceState')
      >>> ckpt.close()
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, cleanup_tmp: bool = False):
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an integer >= 1, got {keep!r}.")
        self.directory = os.path.abspath(os.fspath(directory))
        self._keep = keep
        self.restored_step = None
        self._cleanup_tmp = bool(cleanup_tmp)
        self._manager = self._open()

    def _open(self):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self._keep,
            create=True,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=self._cleanup_tmp,
        )
        return ocp.CheckpointManager(
            self.directory, options=options, item_handlers=ocp.StandardCheckpointHandler()
        )

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        return sorted(self._manager.all_steps())

    def step_dir(self, step: int) -> str:
        """The directory of checkpoint ``step``."""
        return os.path.join(self.directory, str(step))

    def save(self, state: TrainState, loop_state: dict | None = None) -> None:
        """Writes a checkpoint at ``state.step`` (synchronously; no-op if it exists).

        Args:
          state: the state to save.
          loop_state: a JSON-serialisable record saved with it (see :meth:`loop_state`).
        """
        step = int(state.step)
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.StandardSave(checkpoint_tree(state)), force=True)
        self._manager.wait_until_finished()
        step_dir = self.step_dir(step)
        # One writer per checkpoint (process 0 on a shared filesystem); the others
        # wait for it, so that no process reads the step before its manifest exists.
        if jax.process_index() == 0 and os.path.isdir(step_dir):
            if loop_state is not None:
                _write_atomic(os.path.join(step_dir, LOOP_STATE), json.dumps(loop_state))
            write_manifest(step_dir)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"flatjax checkpoint {step} manifest")

    def loop_state(self, step: int) -> dict | None:
        """The ``loop_state`` saved with checkpoint ``step``; None if it has none."""
        path = os.path.join(self.step_dir(step), LOOP_STATE)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def restore(self, state: TrainState, step: int) -> TrainState:
        """Restores checkpoint ``step`` into the structure of ``state``.

        Args:
          state: a freshly created state; its pytree structure, shapes and
            dtypes are the target (only abstract values are used).
          step: which checkpoint.

        Returns:
          ``state`` with the checkpoint's values.

        Raises:
          CheckpointMismatchError: the checkpoint's arrays differ from the
            target's (names, shapes or dtypes), listing the differences.
          CorruptCheckpointError: a file differs from its sha256 in the manifest.
          Exception: whatever orbax raises for unreadable files.
        """
        verify_manifest(self.step_dir(step))
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, checkpoint_tree(state))
        metadata = self._manager.item_metadata(step)
        if metadata is None:
            raise CorruptCheckpointError(f"checkpoint {step}: its metadata cannot be read")
        problems = _describe_mismatch(_saved_arrays(metadata), _target_arrays(target))
        if problems:
            shown = "\n  ".join(problems[:6])
            more = f"\n  ... and {len(problems) - 6} more" if len(problems) > 6 else ""
            raise CheckpointMismatchError(
                f"The checkpoint at step {step} in {self.directory} does not match this run's "
                f"state (different model, optimizer or number of replicas?):\n  {shown}{more}\n"
                "Use a fresh workdir for a different configuration."
            )
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(target))
        return state.replace(**restored)

    def restore_latest(self, state: TrainState) -> TrainState | None:
        """Restores the latest readable checkpoint; None when there is none at all.

        A checkpoint that cannot be read or fails its checksum is renamed
        ``corrupt-<step>`` with a one-line warning and the previous one is
        tried. ``self.restored_step`` is the step restored (None if none).

        Raises:
          CheckpointMismatchError: see :meth:`restore`.
          CorruptCheckpointError: checkpoints exist but none can be read.
        """
        self.restored_step = None
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                restored = self.restore(state, step)
                self.loop_state(step)  # part of the checkpoint: must be readable too
            except CheckpointMismatchError:
                raise
            except Exception as error:  # orbax/tensorstore raise many types for bad files
                self._set_aside(step, error)
                continue
            self.restored_step = step
            return restored
        if steps:
            raise CorruptCheckpointError(
                f"None of the checkpoints {steps} in {self.directory} can be read (moved to "
                "corrupt-<step>). Refusing to restart from scratch over them: rerun with "
                "--restart (restart=True) to move the earlier run aside and start over."
            )
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        path = os.path.join(self.directory, str(step))
        aside = os.path.join(self.directory, f"corrupt-{step}")
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
        if os.path.exists(aside):
            aside += f"-{os.getpid()}"
        warnings.warn(
            f"Checkpoint {path} cannot be read ({reason}); "
            f"moved it to {aside} and trying the previous checkpoint.",
            RuntimeWarning,
            stacklevel=3,
        )
        self._manager.close()
        os.rename(path, aside)
        self._manager = self._open()

    def close(self) -> None:
        """Waits for pending writes and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
