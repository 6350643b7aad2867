"""One process of the 2-process Replicated-SGD run of tests/test_multihost.py.

Run as ``python -m tests._multihost_worker OUT_DIR CKPT_DIR`` with
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
set, and ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (two CPU
devices per process, four in all). The mesh is (replica 2, data 2): each
process holds one replica, split over its two devices. Each process loads
only its slice of every batch (``flatjax.process_batch_slice``) and
assembles the global batch with ``flatjax.host_batch_to_global``. After
``STEPS`` steps both processes save an orbax checkpoint into the shared
``CKPT_DIR``, restore it into a fresh state, and write
``OUT_DIR/result_<process>.npz``: the gathered final params, the restored
params, and the slices the process loaded.

The setup functions are imported by the test for the single-process reference.
"""

from __future__ import annotations

import sys

import jax
import numpy as np

STEPS = 4
REPLICAS = 2
BATCH = 8
DIM = 3
NUM_TRAIN = 256


def make_config():
    from flatjax.training import base_config

    config = base_config()
    config.algorithm = "replicated_sgd"
    config.batch_size = BATCH
    config.learning_rate = 0.1
    config.rsgd.num_replicas = REPLICAS
    config.rsgd.coupling = 0.5
    config.rsgd.strategy = "vmap"
    return config


def make_model():
    from flatjax.models.mlp import MLPTiny

    return MLPTiny(num_classes=2)


def make_state(config, model):
    from flatjax.training import create_train_state

    info = {"input_shape": (DIM,), "num_train": NUM_TRAIN}
    return create_train_state(config, model, info, jax.random.PRNGKey(0))


def global_batches():
    """The global batches [y, B, DIM]; a real loader would produce only its slice."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(NUM_TRAIN, DIM)).astype(np.float32)
    y = (x[:, 0] + 0.3 * rng.normal(size=NUM_TRAIN) > 0).astype(np.int32)
    out = []
    for _ in range(STEPS):
        idx = rng.integers(0, NUM_TRAIN, size=(REPLICAS, BATCH))
        out.append({"image": x[idx], "label": y[idx]})
    return out


def main(out_dir: str, ckpt_dir: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import flatjax
    from flatjax.training import Checkpointer, make_train_step

    assert flatjax.initialize_distributed() is True
    from jax.experimental import multihost_utils

    pid = jax.process_index()
    assert jax.process_count() == 2 and jax.local_device_count() == 2, (
        jax.process_count(),
        jax.local_device_count(),
    )
    config, model = make_config(), make_model()
    mesh = flatjax.make_mesh(replica=REPLICAS)
    fresh = make_state(config, model)
    state = flatjax.training.shard_train_state(fresh, mesh)
    step = flatjax.training.shard_train_step(make_train_step(config), mesh, state, "replicas")

    slices = []
    for t, batch in enumerate(global_batches()):
        local = {}
        for key, value in batch.items():
            where = flatjax.process_batch_slice(mesh, "replicas", value.shape)
            local[key] = value[where]  # this host's replicas and rows only
            slices.append([(s.start, s.stop) for s in where[:2]])
        state, _ = step(state, flatjax.host_batch_to_global(local, mesh, "replicas"))
        if t % 2 == 1:
            jax.block_until_ready(state)
    params = multihost_utils.process_allgather(state.params, tiled=True)

    checkpointer = Checkpointer(ckpt_dir, keep=2)
    checkpointer.save(state)
    restored = checkpointer.restore_latest(flatjax.training.shard_train_state(fresh, mesh))
    checkpointer.close()
    restored_params = multihost_utils.process_allgather(restored.params, tiled=True)
    restored_step = int(restored.step.addressable_data(0))  # replicated: any shard
    multihost_utils.sync_global_devices("done")

    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
        for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    flat_restored = {
        "restored/" + "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
        for path, v in jax.tree_util.tree_flatten_with_path(restored_params)[0]
    }
    np.savez(
        f"{out_dir}/result_{pid}.npz",
        slices=np.asarray(slices),
        restored_step=restored_step,
        **flat,
        **flat_restored,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
