"""Wall time of one training step, after compilation, of LeNet-5 and ResNet-18.

One step is the CIFAR baseline update (SGD, Nesterov momentum 0.9, softmax
cross-entropy, BatchNorm statistics updated) on a random batch, jitted with
params and optimizer state donated. Each case compiles once (reported as
``compile_s``, the first call) and then runs ``--steps`` timed steps,
recording wall time and process CPU time (all threads; the steadier number
on a shared machine).

Cases: ``lenet5`` (batch 128, 28×28×1), ``resnet18`` (batch 128, 32×32×3,
float32), ``resnet18_bf16`` (bfloat16 compute, float32 params),
``resnet18_matmul_bf16`` (float32 under
``jax.default_matmul_precision("bfloat16")``). XLA flags are process-wide,
so compare them with separate runs of ``--xla-flags``.

Usage:
  python -m experiments.benchmarks.model_steps --steps 3 \
      --out experiments/benchmarks/results/model_steps.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).parent / "results" / "model_steps.json"
CASES = ("lenet5", "resnet18", "resnet18_bf16", "resnet18_matmul_bf16")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="lenet5,resnet18", help=f"comma list of {CASES}")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per case")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before jax loads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(args.cases) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; valid: {CASES}")
    if args.steps < 1:
        parser.error(f"--steps must be ≥ 1, got {args.steps}")
    return args


def time_case(case: str, steps: int, batch_size: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from flatjax.models import LeNet5, ResNet18

    if case == "lenet5":
        model, shape = LeNet5(num_classes=10), (batch_size, 28, 28, 1)
    else:
        dtype = jnp.bfloat16 if case == "resnet18_bf16" else jnp.float32
        model, shape = ResNet18(num_classes=10, dtype=dtype), (batch_size, 32, 32, 3)
    precision = (
        jax.default_matmul_precision("bfloat16")
        if case == "resnet18_matmul_bf16"
        else contextlib.nullcontext()
    )
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=batch_size), jnp.int32)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
    opt_state = tx.init(params)

    def loss_fn(params, batch_stats):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates.get("batch_stats", {})

    @partial_jit_donate
    def step(params, opt_state, batch_stats):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, batch_stats, loss

    with precision:
        start = time.perf_counter()
        params, opt_state, batch_stats, loss = jax.block_until_ready(
            step(params, opt_state, batch_stats)
        )
        compile_s = time.perf_counter() - start
        times, cpu_times = [], []
        for _ in range(steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            params, opt_state, batch_stats, loss = jax.block_until_ready(
                step(params, opt_state, batch_stats)
            )
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return {
        "case": case,
        "batch_size": batch_size,
        "input_shape": list(shape),
        "compile_s": compile_s,
        "step_s": times,
        "median_step_s": statistics.median(times),
        "min_step_s": min(times),
        "step_cpu_s": cpu_times,
        "median_step_cpu_s": statistics.median(cpu_times),
        "final_loss": float(loss),
    }


def partial_jit_donate(fn):
    import jax

    return jax.jit(fn, donate_argnums=(0, 1, 2))


def main(argv=None):
    args = parse_args(argv)
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
    import jax

    results = {
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_version": jax.__version__,
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average_before": os.getloadavg(),
        "cases": [],
    }
    for case in args.cases:
        result = time_case(case, args.steps, args.batch_size)
        print(
            f"{case:>22}: compile {result['compile_s']:.1f} s, step median "
            f"{result['median_step_s'] * 1e3:.0f} ms (min {result['min_step_s'] * 1e3:.0f} ms, "
            f"{args.steps} steps; CPU time {result['median_step_cpu_s']:.2f} s), "
            f"loss {result['final_loss']:.3f}",
            flush=True,
        )
        results["cases"].append(result)
    results["load_average_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
