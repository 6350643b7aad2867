"""Checkpoints: exact structure, bitwise resume, corrupt/mismatched/interrupted checkpoints."""

from __future__ import annotations

import dataclasses
import glob
import os
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flatjax.training import (
    Checkpointer,
    CheckpointMismatchError,
    CorruptCheckpointError,
    array_source,
    base_config,
    create_train_state,
    read_metrics,
    train_and_evaluate,
)
from flatjax.training.checkpoint import checkpoint_tree
from tests.helpers import TinyBNMLP, TinyMLP, blobs

INFO = {"input_shape": (8,), "num_train": 256, "num_classes": 2}
ALGORITHMS = ("sgd", "entropy_sgd", "replicated_sgd")


def run_config(algorithm: str, num_epochs: int = 3):
    """Smallest useful run: 8 steps per epoch, a checkpoint and an evaluation per epoch."""
    config = base_config()
    config.algorithm = algorithm
    config.batch_size = 32
    config.num_epochs = num_epochs
    config.learning_rate = 0.05
    config.progress = False
    config.keep_checkpoints = 2
    config.log_every_steps = 4
    config.esgd.inner_steps = 2
    config.esgd.coupling = 0.1
    config.esgd.coupling_factor = 10.0
    config.rsgd.num_replicas = 2
    config.rsgd.coupling = 0.1
    config.rsgd.coupling_factor = 10.0
    return config


def blob_source():
    x, y = blobs(n=320, dim=8, seed=0)
    return array_source((x[:256], y[:256]), (x[256:], y[256:]), num_classes=2, batch_size=32)


def crashing(data, after: int):
    """The same data source, raising after ``after`` training steps (a simulated crash)."""

    def train_batches(start_step=0, **kw):
        for i, batch in enumerate(data.train_batches(start_step, **kw)):
            if i == after:
                raise RuntimeError("simulated crash")
            yield batch

    return dataclasses.replace(data, train_batches=train_batches)


def final_arrays(workdir):
    """Leaves (and structure) of the latest checkpoint, read without a target."""
    manager = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), item_handlers=ocp.StandardCheckpointHandler()
    )
    step = manager.latest_step()
    tree = manager.restore(step)
    manager.close()
    return step, jax.tree.leaves(tree)


def assert_bitwise_equal(dir_a, dir_b):
    step_a, leaves_a = final_arrays(dir_a)
    step_b, leaves_b = final_arrays(dir_b)
    assert step_a == step_b
    assert len(leaves_a) == len(leaves_b)
    for a, b in zip(leaves_a, leaves_b, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]
    assert strip(read_metrics(os.path.join(dir_a, "metrics.jsonl"))) == strip(
        read_metrics(os.path.join(dir_b, "metrics.jsonl"))
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Workdirs of uninterrupted runs, one per algorithm, made on first use."""
    runs = {}

    def get(algorithm):
        if algorithm not in runs:
            workdir = tmp_path_factory.mktemp(f"full_{algorithm}")
            train_and_evaluate(run_config(algorithm), workdir, model=TinyMLP(),
                               data=blob_source())
            runs[algorithm] = str(workdir)
        return runs[algorithm]

    return get


def _state(algorithm="sgd", model=None, seed=0, **rsgd):
    config = run_config(algorithm.replace("_stepwise", ""))
    config.esgd.mode = "stepwise" if algorithm.endswith("_stepwise") else "scan"
    config.rsgd.update(rsgd)
    return create_train_state(config, model or TinyMLP(), INFO, jax.random.PRNGKey(seed))


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("algorithm", [*ALGORITHMS, "entropy_sgd_stepwise"])
def test_round_trip_preserves_structure_dtypes_and_values(algorithm, tmp_path):
    saved = _state(algorithm, model=TinyBNMLP(), seed=0).replace(step=jnp.int32(7))
    ckpt = Checkpointer(tmp_path, keep=2)
    ckpt.save(saved)
    fresh = _state(algorithm, model=TinyBNMLP(), seed=1)
    restored = ckpt.restore_latest(fresh)
    ckpt.close()
    # Same treedef: NamedTuples stay NamedTuples, tuples stay tuples (ferminet#105).
    tree = lambda state: jax.tree.structure(checkpoint_tree(state))
    assert tree(restored) == tree(saved)
    assert type(restored.opt_state) is type(saved.opt_state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert int(restored.step) == 7


def test_keeps_only_the_last_k_checkpoints(tmp_path):
    state = _state()
    ckpt = Checkpointer(tmp_path, keep=2)
    for step in range(1, 5):
        ckpt.save(state.replace(step=jnp.int32(step)))
    assert ckpt.all_steps() == [3, 4]
    ckpt.close()


def test_restore_latest_without_checkpoints_returns_none(tmp_path):
    assert Checkpointer(tmp_path).restore_latest(_state()) is None


def test_checkpointer_rejects_bad_keep(tmp_path):
    with pytest.raises(ValueError, match="keep must be an integer >= 1"):
        Checkpointer(tmp_path, keep=0)


# ----------------------------------------------------------------------------- faults


def _corrupt(step_dir):
    files = [f for f in glob.glob(f"{step_dir}/**/d/*", recursive=True) if os.path.isfile(f)]
    assert files
    for f in files:
        with open(f, "r+b") as handle:
            handle.truncate(10)


def test_corrupt_latest_checkpoint_falls_back_to_previous_with_warning(tmp_path):
    state = _state()
    ckpt = Checkpointer(tmp_path, keep=3)
    ckpt.save(state.replace(step=jnp.int32(1)))
    ckpt.save(state.replace(step=jnp.int32(2)))
    ckpt.close()
    _corrupt(tmp_path / "2")
    ckpt = Checkpointer(tmp_path, keep=3)
    with pytest.warns(RuntimeWarning, match="cannot be read"):
        restored = ckpt.restore_latest(state)
    assert int(restored.step) == 1
    assert ckpt.all_steps() == [1] and (tmp_path / "corrupt-2").exists()


def test_all_checkpoints_corrupt_stops_instead_of_restarting(tmp_path):
    state = _state()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(state.replace(step=jnp.int32(1)))
    ckpt.close()
    os.remove(tmp_path / "1" / "default" / "_METADATA")
    with pytest.warns(RuntimeWarning), pytest.raises(CorruptCheckpointError, match="Refusing"):
        Checkpointer(tmp_path).restore_latest(state)


def test_interrupted_write_leaves_previous_checkpoint_intact(tmp_path):
    state = _state()
    ckpt = Checkpointer(tmp_path)
    ckpt.save(state.replace(step=jnp.int32(1)))
    ckpt.close()
    # What a process killed mid-save leaves: orbax's temporary directory, never renamed.
    partial = tmp_path / "2.orbax-checkpoint-tmp-1234567"
    (partial / "default").mkdir(parents=True)
    (partial / "default" / "_METADATA").write_text("{trunc")
    ckpt = Checkpointer(tmp_path)
    assert ckpt.all_steps() == [1]
    assert int(ckpt.restore_latest(state).step) == 1
    assert partial.exists()  # a reader never deletes a save that may be in progress
    ckpt.close()
    owner = Checkpointer(tmp_path, cleanup_tmp=True)  # the run's owner cleans up
    owner.save(state.replace(step=jnp.int32(3)))
    owner.close()
    assert not partial.exists()
    assert Checkpointer(tmp_path).all_steps() == [1, 3]


@pytest.mark.parametrize(
    "saved, target, message",
    [
        (dict(model=TinyMLP(hidden=16)), dict(model=TinyMLP(hidden=32)),
         r"params\.Dense_0\.kernel: checkpoint shape/dtype \(\(8, 16\)"),
        (dict(algorithm="replicated_sgd", num_replicas=3),
         dict(algorithm="replicated_sgd", num_replicas=2),
         r"params\.Dense_0\.kernel: checkpoint shape/dtype \(\(3, 8, 16\)"),
        (dict(algorithm="sgd"), dict(algorithm="entropy_sgd"), r"opt_state\."),
    ],
)
def test_mismatched_checkpoint_raises_naming_the_difference(saved, target, message, tmp_path):
    ckpt = Checkpointer(tmp_path)
    ckpt.save(_state(**saved))
    with pytest.raises(CheckpointMismatchError, match=message):
        ckpt.restore_latest(_state(**target))
    assert ckpt.all_steps() == [0]  # a mismatch is not corruption: nothing moved aside


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_resumed_run_equals_uninterrupted_run_bitwise(algorithm, uninterrupted, tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_and_evaluate(run_config(algorithm), tmp_path, model=TinyMLP(),
                           data=crashing(blob_source(), after=13))
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [8]
    train_and_evaluate(run_config(algorithm), tmp_path, model=TinyMLP(), data=blob_source())
    assert_bitwise_equal(uninterrupted(algorithm), tmp_path)


def test_resume_after_corrupt_latest_checkpoint_still_matches(uninterrupted, tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_and_evaluate(run_config("sgd"), tmp_path, model=TinyMLP(),
                           data=crashing(blob_source(), after=20))
    _corrupt(tmp_path / "checkpoints" / "16")
    with pytest.warns(RuntimeWarning, match="checkpoints/16 cannot be read"):
        train_and_evaluate(run_config("sgd"), tmp_path, model=TinyMLP(), data=blob_source())
    assert_bitwise_equal(uninterrupted("sgd"), tmp_path)


def test_resume_into_another_model_raises(uninterrupted, tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_and_evaluate(run_config("sgd"), tmp_path, model=TinyMLP(),
                           data=crashing(blob_source(), after=9))
    with pytest.raises(CheckpointMismatchError, match="Dense_0"):
        train_and_evaluate(run_config("sgd"), tmp_path, model=TinyMLP(hidden=4),
                           data=blob_source())


SCRIPT = """
import sys
from tests.helpers import TinyMLP
from tests.test_checkpoint import blob_source, run_config
from flatjax.training import train_and_evaluate
train_and_evaluate(run_config("sgd", int(sys.argv[2])), sys.argv[1], model=TinyMLP(),
                   data=blob_source())
"""


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(tmp_path):
    epochs = 12
    reference = tmp_path / "reference"
    train_and_evaluate(run_config("sgd", epochs), reference, model=TinyMLP(), data=blob_source())

    seed = int.from_bytes(os.urandom(4), "little")
    rows_before_kill = random.Random(seed).randint(1, epochs // 2)
    workdir = tmp_path / "killed"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(workdir), str(epochs)], cwd=root,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(read_metrics(metrics)) >= rows_before_kill:
            time.sleep(random.Random(seed).uniform(0.0, 0.05))
            break
        time.sleep(0.005)
    assert proc.poll() is None, (
        f"the run ended before it could be killed (seed {seed}): {proc.stderr.read()[-2000:]}"
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = len(read_metrics(metrics))
    assert killed_at < epochs

    train_and_evaluate(run_config("sgd", epochs), workdir, model=TinyMLP(), data=blob_source())
    assert_bitwise_equal(reference, workdir)
