"""Two local CPU processes run Replicated-SGD together (jax.distributed + gloo).

Each process of tests/_multihost_worker.py has two emulated devices; the
replicas are split over the processes, each process loads only its slice
of every batch, and both save and restore an orbax checkpoint in a shared
directory. The gathered result must equal the single-process run.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest

from flatjax.training import make_train_step
from tests import _multihost_worker as worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 180


def _reference_params():
    config = worker.make_config()
    state = worker.make_state(config, worker.make_model())
    step = make_train_step(config)
    for batch in worker.global_batches():
        state, _ = step(state, batch)
    return jax.device_get(state.params)


def _launch(out_dir, ckpt_dir):
    port = portpicker.pick_unused_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ)
        env.update(
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
            XLA_FLAGS="--xla_force_host_platform_device_count=2 "
            "--xla_cpu_collective_call_terminate_timeout_seconds=600",
            JAX_PLATFORMS="cpu",
            PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests._multihost_worker", out_dir, ckpt_dir],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
        )
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"the 2-process run did not finish within {TIMEOUT_S} s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for pid, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"process {pid} failed:\n{out[-3000:]}"


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    out_dir, ckpt_dir = tmp_path / "out", tmp_path / "ckpt"
    out_dir.mkdir()
    _launch(str(out_dir), str(ckpt_dir))
    reference = _reference_params()
    flat_ref = {
        "/".join(str(k.key) for k in path): v
        for path, v in jax.tree_util.tree_flatten_with_path(reference)[0]
    }
    for pid in range(2):
        result = np.load(out_dir / f"result_{pid}.npz")
        for name, ref in flat_ref.items():
            assert result[name].shape == ref.shape  # the whole y = 2 replicas, gathered
            np.testing.assert_allclose(result[name], ref, rtol=2e-5, atol=2e-6)
            np.testing.assert_array_equal(result["restored/" + name], result[name])
        assert int(result["restored_step"]) == worker.STEPS
        # Each host loaded only its own replica's minibatches (all B rows of it).
        assert {tuple(map(tuple, s)) for s in result["slices"]} == {
            ((pid, pid + 1), (0, worker.BATCH))
        }
    assert sorted(os.listdir(ckpt_dir)) == [str(worker.STEPS)]
