"""Wall time of the same Replicated-SGD run on 1, 2 and 4 (emulated) devices.

The run: ``flatjax.training.make_train_step`` for Replicated-SGD (y replicas
of ``--model`` on random 28×28 images, batch B per replica, Nesterov SGD,
``rsgd.strategy='vmap'``), compiled for a mesh by ``flatjax.training.shard_train_step``
with the replicas spread over the devices (``make_mesh(replica=n)``; with
``--data`` the devices beyond y split each minibatch). The single-device
run uses the same code on a 1×1 mesh.

XLA reads ``--xla_force_host_platform_device_count`` when jax is imported,
so each device count runs in its own subprocess (``--worker N``). Each
worker reports the first call (trace + compile + one step) and the steady
state: the median over ``--reps`` repetitions of the time of ``--steps``
steps (blocking every 5 steps: long queues of collective steps abort
XLA:CPU on this machine), and the final mean loss and centre norm, which
must agree across device counts (same numbers up to float rounding).

On a CPU the emulated devices share the same cores, so this measures the
overhead of partitioning and collectives, not a speed-up; on a GPU/TPU host
run it with the real devices (no ``XLA_FLAGS``: ``--devices`` is then
capped by ``jax.device_count()``).

``--modes jit,shard_map`` (the default) times both forms of the step:
``jit`` is the training library's step under ``flatjax.training.shard_train_step``
(XLA's GSPMD partitioner splits the vmapped replicas), ``shard_map`` the
same update written per device with ``flatjax.rsgd_shard_map_step`` (each
device runs its own replicas; constant coupling, as the ``jit`` run has
within its first epoch). Rows report ``time_vs_first``: the ratio to the
first row (1 device, ``jit``).

Usage::

    nice -n 10 python -m experiments.benchmarks.devices_bench \
        --devices 1,2,4 --out experiments/benchmarks/results/devices.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, NamedTuple

BLOCK_EVERY = 5


def _worker(args) -> dict:
    import jax
    import numpy as np
    import optax

    import flatjax
    from flatjax.models import get_model
    from flatjax.training import base_config, create_train_state, make_train_step

    n = args.worker
    if jax.device_count() < n:
        raise SystemExit(f"asked for {n} devices, jax sees {jax.device_count()}")
    config = base_config()
    config.algorithm = "replicated_sgd"
    config.model = args.model
    config.batch_size = args.batch_size
    config.rsgd.num_replicas = args.replicas
    config.rsgd.coupling = 0.5
    config.rsgd.strategy = "vmap"
    replica = min(n, args.replicas) if not args.data else max(1, n // args.data)
    mesh = flatjax.make_mesh(replica=replica, data=n // replica, devices=jax.devices()[:n])
    model = get_model(args.model, 10)
    info = {"input_shape": (28, 28, 1), "num_train": 60000}
    state = create_train_state(config, model, info, jax.random.PRNGKey(0))
    if args.mode == "jit":
        step = flatjax.training.shard_train_step(make_train_step(config), mesh, state, "replicas")
        state = flatjax.training.shard_train_state(state, mesh)
    else:  # the same update written per device: flatjax.rsgd_shard_map_step
        step, state = _shard_map_step(config, model, mesh, state)
    rng = np.random.default_rng(0)
    shape = (args.replicas, args.batch_size)
    batches = [
        flatjax.shard_batch(
            {
                "image": rng.normal(size=(*shape, 28, 28, 1)).astype(np.float32),
                "label": rng.integers(0, 10, size=shape).astype(np.int32),
            },
            mesh,
            "replicas",
        )
        for _ in range(BLOCK_EVERY)
    ]

    start = time.perf_counter()
    state, metrics = step(state, batches[0])
    jax.block_until_ready(state)
    first_call = time.perf_counter() - start

    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        for t in range(args.steps):
            state, metrics = step(state, batches[t % BLOCK_EVERY])
            if t % BLOCK_EVERY == BLOCK_EVERY - 1:
                jax.block_until_ready(state)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    center = flatjax.replica_center(state.params)
    return {
        "mode": args.mode,
        "devices": n,
        "mesh": {"replica": mesh.shape["replica"], "data": mesh.shape["data"]},
        "backend": jax.default_backend(),
        "first_call_s": first_call,
        "steps": args.steps,
        "reps": args.reps,
        "run_s_median": statistics.median(times),
        "run_s_all": times,
        "step_ms_median": 1000 * statistics.median(times) / args.steps,
        "final_loss": float(metrics["loss"]),
        "center_norm": float(optax.global_norm(center)),
    }


def _shard_map_step(config, model, mesh, state):
    """``step(state, batch) -> (state, metrics)`` over ``rsgd_shard_map_step``.

    The same optimizer as ``make_optimizer`` with a constant coupling (the
    model has no BatchNorm and no dropout, so the loss needs no key). The
    state is the TrainState with params and the shard_map's optimizer state.
    """
    import optax

    import flatjax
    from flatjax.training.steps import cross_entropy

    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch["image"], train=True)
        return cross_entropy(logits, batch["label"])

    base = optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(config.learning_rate, config.momentum, config.nesterov),
    )
    init, step = flatjax.rsgd_shard_map_step(
        loss_fn, mesh, base, config.rsgd.num_replicas, config.rsgd.coupling,
    )
    params = flatjax.training.shard_train_state(state, mesh).params
    opt_state = init(params)

    def train_step(carry, batch):
        params, opt_state = carry
        params, opt_state, loss = step(params, opt_state, batch)
        return _Carry(params, opt_state), {"loss": loss}

    return train_step, _Carry(params, opt_state)


class _Carry(NamedTuple):
    """(params, opt_state): a pytree (so ``block_until_ready`` waits on it) with ``params``."""

    params: Any
    opt_state: Any


def _run_worker(n: int, args) -> dict:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if "xla_force_host_platform_device_count" not in f)
    if args.emulate:
        flags += f" --xla_force_host_platform_device_count={n}"
        # On an overloaded CPU an emulated device can reach a collective more than
        # XLA:CPU's default 40 s after the others, which aborts the process.
        flags += " --xla_cpu_collective_call_terminate_timeout_seconds=900"
        flags += " --xla_cpu_collective_call_warn_stuck_timeout_seconds=300"
    env["XLA_FLAGS"] = flags.strip()
    cmd = [sys.executable, "-m", "experiments.benchmarks.devices_bench", "--worker", str(n),
           "--model", args.model, "--replicas", str(args.replicas), "--batch-size",
           str(args.batch_size), "--steps", str(args.steps), "--reps", str(args.reps),
           "--data", str(args.data), "--mode", args.mode]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"worker with {n} devices failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="1,2,4", help="comma-separated device counts")
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--data", type=int, default=0,
                        help="data-axis size (0: all devices on the replica axis, up to y)")
    parser.add_argument("--modes", default="jit,shard_map",
                        help="comma-separated: jit = flatjax.training.shard_train_step of the "
                        "training step (GSPMD); shard_map = flatjax.rsgd_shard_map_step "
                        "(per-device code)")
    parser.add_argument("--mode", default="jit", help=argparse.SUPPRESS)
    parser.add_argument("--no-emulate", dest="emulate", action="store_false",
                        help="use the real devices (GPU/TPU) instead of emulated CPU devices")
    parser.add_argument("--out", default="experiments/benchmarks/results/devices.json")
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return {}
    modes = args.modes.split(",")
    if not set(modes) <= {"jit", "shard_map"}:
        parser.error(f"--modes must list jit and/or shard_map, got {args.modes!r}")
    rows = []
    for n in (int(s) for s in args.devices.split(",")):
        for mode in modes:  # interleaved, so both modes see the same machine load
            args.mode = mode
            row = _run_worker(n, args)
            rows.append(row)
            print(
                f"{mode}: {n} device(s), mesh {row['mesh']}: first call "
                f"{row['first_call_s']:.2f} s, {row['steps']} steps {row['run_s_median']:.3f} s "
                f"(median of {row['reps']}), {row['step_ms_median']:.1f} ms/step, "
                f"loss {row['final_loss']:.6f}, centre norm {row['center_norm']:.6f}",
                flush=True,
            )
    base = rows[0]
    for row in rows:
        row["time_vs_first"] = row["run_s_median"] / base["run_s_median"]
        row["loss_diff_vs_first"] = abs(row["final_loss"] - base["final_loss"])
        row["center_norm_diff_vs_first"] = abs(row["center_norm"] - base["center_norm"])
    result = {
        "benchmark": "devices",
        "command": " ".join([os.path.basename(sys.executable), "-m",
                             "experiments.benchmarks.devices_bench", *(argv or sys.argv[1:])]),
        "modes": modes,
        "model": args.model,
        "replicas": args.replicas,
        "batch_size": args.batch_size,
        "emulated": args.emulate,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
