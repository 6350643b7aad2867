"""Cost of ``flatjax.local_energy`` against plain evaluation passes.

A small ReLU MLP (``--dim`` → ``--hidden`` → ``--hidden`` → 10) on ``--n``
synthetic Gaussian-blob examples. Three timings, compilation excluded (each
function runs once before it is timed), interleaved, best of ``--repeats``,
in wall-clock and in process CPU seconds:

- ``plain``: a jitted error-over-the-dataset function (same streaming in
  batches of ``--batch-size`` as ``local_energy``) called M times on the
  unperturbed params, one ``block_until_ready`` per call: the cost of M
  evaluation passes, the lower bound for M perturbed ones;
- ``local_energy``: one ``flatjax.local_energy`` call, one σ, M draws;
- ``naive``: a Python loop of M passes, each drawing the noise eagerly
  (``jax.tree.map``) and calling the jitted evaluation on the perturbed
  params.

Reported: ``ratio = local_energy / plain`` (target ≤ 1.2) and
``speedup = naive / local_energy``.

Usage::

    python -m experiments.benchmarks.local_energy_bench \
        --out experiments/benchmarks/results/local_energy.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import flatjax


class MLP(nn.Module):
    hidden: int
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run(n: int, dim: int, hidden: int, num_draws: int, batch_size: int, repeats: int, seed: int):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(10, dim))
    y = rng.integers(0, 10, size=n).astype(np.int32)
    x = (means[y] + rng.normal(size=(n, dim))).astype(np.float32)
    x, y = jnp.asarray(x), jnp.asarray(y)
    model = MLP(hidden)
    variables = model.init(jax.random.PRNGKey(seed), x[:1])
    apply_fn = lambda v, inputs: model.apply(v, inputs, train=False)
    num_params = sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables["params"]))
    key = jax.random.PRNGKey(seed + 1)
    sigma = 0.01

    error_fn = flatjax.dataset_loss(
        apply_fn, variables, (x, y), batch_size=batch_size, metric="error"
    )
    eval_fn = jax.jit(error_fn)
    eval_fn(variables["params"]).block_until_ready()

    def plain():
        for _ in range(num_draws):
            eval_fn(variables["params"]).block_until_ready()

    def energy():
        flatjax.local_energy(
            apply_fn, variables, (x, y), sigma, key=key, num_draws=num_draws, batch_size=batch_size
        ).mean.block_until_ready()

    def naive():
        params = variables["params"]
        leaves, treedef = jax.tree_util.tree_flatten(params)
        values = []
        for m in range(num_draws):
            keys = jax.random.split(jax.random.fold_in(key, m), len(leaves))
            noisy = [
                w * (1 + sigma * jax.random.normal(k, w.shape))
                for w, k in zip(leaves, keys, strict=True)
            ]
            values.append(eval_fn(jax.tree_util.tree_unflatten(treedef, noisy)))
        jnp.stack(values).block_until_ready()

    energy()  # compile
    naive()  # compile the eager ops
    # Interleaved, best of `repeats`: the machine may be shared, and the
    # minimum is the least disturbed run. CPU time (all threads of this
    # process) is reported too; it is the steadier number under contention.
    times = {"plain": [], "local_energy": [], "naive": []}
    for _ in range(repeats):
        for name, fn in (("plain", plain), ("local_energy", energy), ("naive", naive)):
            times[name].append(_timed(fn))
    wall = {k: min(t[0] for t in v) for k, v in times.items()}
    cpu = {k: min(t[1] for t in v) for k, v in times.items()}
    return {
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "n": n,
        "dim": dim,
        "hidden": hidden,
        "num_params": int(num_params),
        "num_draws": num_draws,
        "batch_size": batch_size,
        "repeats": repeats,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "ratio_local_energy_over_plain": wall["local_energy"] / wall["plain"],
        "speedup_over_naive_loop": wall["naive"] / wall["local_energy"],
        "cpu_ratio_local_energy_over_plain": cpu["local_energy"] / cpu["plain"],
        "cpu_speedup_over_naive_loop": cpu["naive"] / cpu["local_energy"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="experiments/benchmarks/results/local_energy.json")
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--num-draws", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = run(
        args.n, args.dim, args.hidden, args.num_draws, args.batch_size, args.repeats, args.seed
    )
    wall, cpu = result["wall_seconds"], result["cpu_seconds"]
    print(
        f"{result['num_params']} params, {args.n} examples, M = {args.num_draws}, "
        f"backend {result['backend']}; seconds wall (cpu):"
    )
    for name in ("plain", "local_energy", "naive"):
        print(f"  {name:>12}: {wall[name]:.4f} ({cpu[name]:.4f})")
    print(
        f"ratio local_energy / M plain passes = {result['ratio_local_energy_over_plain']:.2f} "
        f"wall, {result['cpu_ratio_local_energy_over_plain']:.2f} cpu"
    )
    print(
        f"speed-up over naive loop = {result['speedup_over_naive_loop']:.1f}x wall, "
        f"{result['cpu_speedup_over_naive_loop']:.1f}x cpu"
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
