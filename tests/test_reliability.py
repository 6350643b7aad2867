"""Reliability of runs: history kept, one run per workdir, exact resume, checksums, errors."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from flatjax import cli
from flatjax.training import (
    Checkpointer,
    CorruptCheckpointError,
    NonFiniteError,
    base_config,
    plan_steps,
    read_metrics,
    train_and_evaluate,
    validate_config,
)
from flatjax.training.loop import RunHistoryError, WorkdirBusyError, WorkdirLock
from tests.helpers import TinyMLP
from tests.test_checkpoint import blob_source, crashing, run_config


def _between_evals(epochs=2):
    config = run_config("sgd", epochs)
    config.checkpoint_every_epochs = 0.5  # checkpoints at steps 4, 8, ...: between evaluations
    return config


def _rows(workdir):
    return [{k: v for k, v in r.items() if k != "wall_time"}
            for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))]


def test_resume_between_evaluations_gives_the_uninterrupted_metrics(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    train_and_evaluate(_between_evals(), full, model=TinyMLP(), data=blob_source())
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_and_evaluate(_between_evals(), cut, model=TinyMLP(),
                           data=crashing(blob_source(), after=14))
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2.0, "st')  # a write cut short
    with pytest.warns(RuntimeWarning, match="partial last line"):
        train_and_evaluate(_between_evals(), cut, model=TinyMLP(), data=blob_source())
    assert _rows(full) == _rows(cut)


def test_flipped_bytes_fail_the_checksum_and_the_previous_checkpoint_is_used(tmp_path):
    train_and_evaluate(_between_evals(1), tmp_path, model=TinyMLP(), data=blob_source())
    step_dir = tmp_path / "checkpoints" / "8"
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
    big = max(files, key=os.path.getsize)
    size = os.path.getsize(big)
    with open(big, "r+b") as f:
        f.seek(size // 2 - 32)
        chunk = f.read(64)
        f.seek(size // 2 - 32)
        f.write(bytes(b ^ 0xFF for b in chunk))
    from tests.test_checkpoint import _state

    ckpt = Checkpointer(tmp_path / "checkpoints")
    with pytest.warns(RuntimeWarning, match="cannot be read"):
        restored = ckpt.restore_latest(_state())
    ckpt.close()
    assert int(restored.step) == 4 and (tmp_path / "checkpoints" / "corrupt-8").exists()


def test_unusable_history_is_refused_until_restart_moves_it_aside(tmp_path):
    train_and_evaluate(run_config("sgd", 1), tmp_path, model=TinyMLP(), data=blob_source())
    os.remove(tmp_path / "checkpoints" / "8" / "default" / "_METADATA")
    with pytest.warns(RuntimeWarning), pytest.raises(CorruptCheckpointError, match="--restart"):
        train_and_evaluate(run_config("sgd", 1), tmp_path, model=TinyMLP(), data=blob_source())
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(RunHistoryError, match="--restart"):
        train_and_evaluate(run_config("sgd", 1), tmp_path, model=TinyMLP(), data=blob_source())
    assert (tmp_path / "metrics.jsonl").read_text() == before  # history untouched
    with pytest.warns(UserWarning, match="moved the earlier run"):
        train_and_evaluate(run_config("sgd", 1), tmp_path, model=TinyMLP(), data=blob_source(),
                           restart=True)
    (old,) = [p for p in tmp_path.iterdir() if p.name.startswith("old-")]
    assert (old / "metrics.jsonl").read_text() == before
    assert (old / "checkpoints" / "corrupt-8").is_dir()


def test_a_second_run_on_a_locked_workdir_is_refused(tmp_path):
    with WorkdirLock(tmp_path):
        other = WorkdirLock(tmp_path)
        other_fd = os.open(other.path, os.O_RDWR)  # a second open file description
        import fcntl

        with pytest.raises(OSError):
            fcntl.flock(other_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(other_fd)
    # A stale record left by a dead process is taken over with a warning.
    (tmp_path / ".lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": "elsewhere"}))
    with pytest.warns(RuntimeWarning, match="stale lock"), WorkdirLock(tmp_path):
        pass


def test_lock_held_by_another_process_names_it(tmp_path):
    import subprocess
    import sys
    import time

    code = ("import sys, time; from flatjax.training.loop import WorkdirLock; "
            "l = WorkdirLock(sys.argv[1]); l.acquire(); print('ok', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ok"
        with pytest.raises(WorkdirBusyError, match=f"pid {proc.pid}"):
            WorkdirLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait()
    time.sleep(0.1)
    with pytest.warns(RuntimeWarning, match="stale lock"), WorkdirLock(tmp_path):
        pass  # the killed owner's record is stale


def test_skip_policy_fails_when_too_many_steps_are_skipped(tmp_path):
    config = run_config("sgd", 1)
    config.nan_policy = "skip"
    x, y = blob_source().eval_arrays
    bad = blob_source()
    import dataclasses

    def nan_batches(start_step=0, **kw):
        for batch in blob_source().train_batches(start_step, **kw):
            yield {**batch, "image": np.full_like(batch["image"], np.nan)}

    bad = dataclasses.replace(bad, train_batches=nan_batches)
    with pytest.warns(RuntimeWarning, match="skipped"), pytest.raises(NonFiniteError,
                                                                      match="max_skipped"):
        train_and_evaluate(config, tmp_path, model=TinyMLP(), data=bad)


def test_config_checks_stability_duration_and_data_dir(tmp_path):
    config = base_config()
    config.esgd.coupling, config.esgd.coupling_factor = 1e3, 1e4
    with pytest.warns(RuntimeWarning, match="inner Langevin step would be unstable"):
        validate_config(config)
    config = base_config()
    config.data_dir = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="does not exist"):
        validate_config(config)
    assert not (tmp_path / "missing").exists()
    config = base_config()
    config.num_epochs = 1e-9
    with pytest.raises(ValueError, match="shorter than one training step"):
        plan_steps(config, 10)
    config = base_config()
    config.algorithm, config.num_epochs = "replicated_sgd", 1.0
    with pytest.warns(UserWarning, match="coupling_per = 'step'"):
        validate_config(config)


def _cli_error(argv, capsys):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return code, err


def test_cli_errors_are_one_line(tmp_path, capsys, monkeypatch):
    readme = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")
    code, err = _cli_error(["train", "--config", readme, "--workdir", str(tmp_path)], capsys)
    assert code == 2 and "is not a config file" in err
    (tmp_path / "config.json").write_text("")
    (tmp_path / "checkpoints").mkdir()
    code, err = _cli_error(["eval", "--workdir", str(tmp_path)], capsys)
    assert code == 2 and "config.json is not readable JSON" in err

    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "metrics.jsonl")

    monkeypatch.setattr(cli, "_cmd_eval", full)
    code, err = _cli_error(["eval", "--workdir", str(tmp_path)], capsys)
    assert code == 2 and "no space left on device" in err

    def interrupted(*a, **k):
        from flatjax.training.loop import TrainingInterrupted

        raise TrainingInterrupted("interrupted at step 5; the last checkpoint is step 4; rerun")

    monkeypatch.setattr(cli, "_cmd_eval", interrupted)
    code, err = _cli_error(["eval", "--workdir", str(tmp_path)], capsys)
    assert code == 130 and "interrupted at step 5" in err


def test_divergence_right_after_a_restore_blames_the_checkpoint(tmp_path):
    """A checkpoint that passes its checksum but holds NaN params: the message says so."""
    import jax

    from tests.test_checkpoint import _state

    train_and_evaluate(run_config("sgd", 1), tmp_path, model=TinyMLP(), data=blob_source())
    ckpt = Checkpointer(tmp_path / "checkpoints")
    state = ckpt.restore_latest(_state())
    step, loop_state = ckpt.restored_step, ckpt.loop_state(ckpt.restored_step)
    bad = state.replace(params=jax.tree.map(lambda p: p * np.nan, state.params))
    shutil.rmtree(ckpt.step_dir(step))
    ckpt.close()
    ckpt = Checkpointer(tmp_path / "checkpoints")
    ckpt.save(bad, loop_state=loop_state)  # written and hashed: the checksum passes
    ckpt.close()
    expected = f"after resuming from the checkpoint at step {step}"
    with pytest.warns(UserWarning, match="changed config fields"), \
            pytest.raises(NonFiniteError, match=expected):
        train_and_evaluate(run_config("sgd", 2), tmp_path, model=TinyMLP(), data=blob_source())


def test_a_refused_resume_writes_no_config_and_the_original_run_still_resumes(tmp_path):
    from flatjax.training import CheckpointMismatchError

    train_and_evaluate(run_config("sgd", 1), tmp_path, model=TinyMLP(), data=blob_source())
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointMismatchError, match="does not match"):
        train_and_evaluate(run_config("sgd", 1), tmp_path, model=TinyMLP(hidden=4),
                           data=blob_source())
    assert not (tmp_path / "config.json").exists()  # nothing rewritten by the refused run
    out = train_and_evaluate(run_config("sgd", 2), tmp_path, model=TinyMLP(), data=blob_source())
    assert out["epoch"] == 2.0
    assert json.loads((tmp_path / "config.json").read_text())["num_epochs"] == 2
