"""Cost of the Hessian tools and of the local energy on a ``dataset_loss``.

A small CNN (two 3×3 convolutions, with or without BatchNorm in eval mode,
global average pool, dense head) on the 1797 sklearn ``digits`` images
(8×8×1), the loss ``flatjax.dataset_loss`` in batches of ``--batch-size``.
Each flatjax call is compared with an independent plain baseline built
without flatjax: the full-batch mean cross-entropy, its HVP
``jax.jvp(jax.grad(loss), (w,), (v,))`` jitted once and called from a Python
loop. Rows (candidate ÷ baseline, compilation excluded, both warmed up):

- ``hvp``: one ``flatjax.hvp`` ÷ one plain HVP (target ≤ 1.2);
- ``top_eig``: ``flatjax.hessian_top_eigenvalue`` with ``--iters`` iterations
  ÷ the same number of plain HVPs, each followed by the normalisation
  (target ≤ 1.3; if the power iteration stops early on an exact repeat of
  λ, the baseline is scaled to the iterations run);
- ``trace``: ``flatjax.hessian_trace`` with ``--probes`` probes ÷ as many
  plain HVPs on Rademacher probes (target ≤ 1.3);
- ``local_energy``: ``flatjax.local_energy`` at one σ with ``--draws`` draws
  (error metric) ÷ ``--draws`` + 1 calls of a jitted full-batch error
  function (the evaluation passes it needs; target ≤ 1.2).

The repetitions are interleaved (each rep runs every candidate and baseline
once, in rotated order); reported is the median of the per-rep ratios and
their [min, max] spread, in wall-clock seconds, plus the first calls' times
of hvp and local_energy (compilation included) for reference. About 3
minutes on 2 CPU cores with the defaults.

Usage::

    python -m experiments.benchmarks.hessian_bench \
        --out experiments/benchmarks/results/hessian.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import flatjax

CASES = ("hvp", "top_eig", "trace", "local_energy")


class CNN(nn.Module):
    batch_norm: bool = False
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        for features in (16, 32):
            x = nn.Conv(features, (3, 3))(x)
            if self.batch_norm:
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images[..., None] / 16.0).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(d.target.astype(np.int32))


def _block(tree):
    return jax.block_until_ready(tree)


def _timed(fn) -> float:
    t = time.perf_counter()
    _block(fn())
    return time.perf_counter() - t


def _timed_cpu(fn) -> tuple[float, float]:
    """Wall-clock and process CPU seconds (all threads) of ``fn()``, blocked."""
    t, c = time.perf_counter(), time.process_time()
    _block(fn())
    return time.perf_counter() - t, time.process_time() - c


def run_model(name: str, args, cases: tuple[str, ...] = CASES) -> dict:
    """Rows for one model (``cnn`` or ``cnn_bn``): each of ``cases`` ÷ its plain baseline.

    ``args`` carries ``seed``, ``batch_size``, ``iters``, ``probes``,
    ``draws`` and ``reps`` (the command-line options). Every row has the wall
    ratio (median of per-rep ratios, [min, max]) and ``cpu_ratio``, the
    median per-rep ratio of process CPU seconds.
    """
    x, y = _digits()
    model = CNN(batch_norm=name == "cnn_bn")
    variables = model.init(jax.random.PRNGKey(args.seed), x[:1])
    if "batch_stats" in variables:  # statistics of the data, as after training
        _, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        variables = {**variables, **updates}
    params = variables["params"]
    other = {k: v for k, v in variables.items() if k != "params"}
    apply_fn = lambda v, inputs: model.apply(v, inputs, train=False)
    num_params = sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(params))

    # --- the plain baseline: no flatjax -------------------------------------------
    def full_loss(p):
        logits = model.apply({**other, "params": p}, x, train=False)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))

    def full_error(p):
        logits = model.apply({**other, "params": p}, x, train=False)
        return 100.0 * jnp.mean(jnp.argmax(logits, -1) != y)

    plain_hvp = jax.jit(lambda p, v: jax.jvp(jax.grad(full_loss), (p,), (v,))[1])
    plain_error = jax.jit(full_error)
    normalise = jax.jit(
        lambda t: jax.tree.map(lambda a: a / jnp.sqrt(sum(jnp.sum(b * b) for b in
                                                          jax.tree.leaves(t))), t)
    )  # fmt: skip
    key = jax.random.PRNGKey(args.seed + 1)
    flat, unravel = ravel_pytree(params)
    v0 = unravel(jax.random.normal(key, flat.shape))
    probes = [
        unravel(jax.random.rademacher(k, flat.shape, flat.dtype))
        for k in jax.random.split(key, args.probes)
    ]

    def base_hvp():
        return plain_hvp(params, v0)

    def base_power(num=args.iters):
        v = v0
        for _ in range(num):
            v = normalise(plain_hvp(params, v))
        return v

    def base_trace():
        return [plain_hvp(params, p) for p in probes]

    def base_passes():
        return [plain_error(params) for _ in range(args.draws + 1)]

    # --- flatjax on a dataset_loss ---------------------------------------------------
    loss = flatjax.dataset_loss(apply_fn, variables, (x, y), batch_size=args.batch_size)
    iters_run = []

    def fj_hvp():
        return flatjax.hvp(loss, params, v0)

    def fj_top_eig():
        res = flatjax.hessian_top_eigenvalue(loss, params, key=key, num_iters=args.iters,
                                             tol=1e-30)  # fmt: skip
        iters_run.append(int(res.num_iters))
        return res

    def fj_trace():
        return flatjax.hessian_trace(loss, params, key=key, num_samples=args.probes)

    def fj_local_energy():
        return flatjax.local_energy(apply_fn, variables, (x, y), 0.01, key=key,
                                    num_draws=args.draws, batch_size=args.batch_size)  # fmt: skip

    cases = {
        case: spec for case, spec in {
            "hvp": (fj_hvp, base_hvp, 1.2),
            "top_eig": (fj_top_eig, base_power, 1.3),
            "trace": (fj_trace, base_trace, 1.3),
            "local_energy": (fj_local_energy, base_passes, 1.2),
        }.items() if case in cases
    }  # fmt: skip
    # Compile and warm up: the HVP programs are shared by hvp, top_eig and trace,
    # so short runs of the loops suffice (compilation included in these times).
    first = {"hvp": {"flatjax_s": _timed(fj_hvp), "baseline_s": _timed(base_hvp)}}
    if "local_energy" in cases:
        first["local_energy"] = {"flatjax_s": _timed(fj_local_energy),
                                 "baseline_s": _timed(base_passes)}  # fmt: skip
    first = {c: {k: round(t, 3) for k, t in d.items()} for c, d in first.items()}
    _timed(lambda: flatjax.hessian_top_eigenvalue(loss, params, key=key, num_iters=2))
    _timed(lambda: flatjax.hessian_trace(loss, params, key=key, num_samples=2))
    _timed(lambda: base_power(2))
    times = {case: {"flatjax": [], "baseline": []} for case in cases}
    cpu = {case: {"flatjax": [], "baseline": []} for case in cases}
    names = list(cases)
    for rep in range(args.reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for case in order:
            cand, base, _ = cases[case]
            pair = [("flatjax", cand), ("baseline", base)]
            for label, fn in pair if rep % 2 == 0 else pair[::-1]:
                wall, cpu_s = _timed_cpu(fn)
                times[case][label].append(wall)
                cpu[case][label].append(cpu_s)
    rows = []
    for case, (_, _, target) in cases.items():
        cand, base = times[case]["flatjax"], times[case]["baseline"]
        cand_cpu, base_cpu = cpu[case]["flatjax"], cpu[case]["baseline"]
        if case == "top_eig":  # a baseline of as many HVPs as the iterations run
            scale = [it / args.iters for it in iters_run]
            base = [b * f for b, f in zip(base, scale, strict=True)]
            base_cpu = [b * f for b, f in zip(base_cpu, scale, strict=True)]
        ratios = [c / b for c, b in zip(cand, base, strict=True)]
        ratio = statistics.median(ratios)
        rows.append(dict(
            benchmark=f"hessian/{case}", model=f"{name} {num_params} params", case=case,
            ratio=round(ratio, 3), spread=[round(min(ratios), 3), round(max(ratios), 3)],
            cpu_ratio=round(statistics.median(
                [c / b for c, b in zip(cand_cpu, base_cpu, strict=True)]), 3),
            target=target, direction="<=", met=ratio <= target,
            flatjax_median_s=round(statistics.median(cand), 4),
            baseline_median_s=round(statistics.median(base), 4),
            first_call=first.get(case), reps=args.reps,
            **({"iterations_run": sorted(set(iters_run))} if case == "top_eig" else {}),
        ))  # fmt: skip
    return dict(model=name, num_params=num_params, n=int(x.shape[0]), rows=rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="experiments/benchmarks/results/hessian.json")
    parser.add_argument("--models", nargs="+", default=["cnn", "cnn_bn"],
                        choices=["cnn", "cnn_bn"])  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--probes", type=int, default=20)
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from experiments.benchmarks.rsgd_bench import machine

    start = time.perf_counter()
    results = [run_model(m, args) for m in args.models]
    rows = [r for res in results for r in res["rows"]]
    print("| benchmark | model | ratio (median) | spread | target | met? | flatjax s | plain s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['benchmark']} | {r['model']} | {r['ratio']:.3f} | "
              f"[{r['spread'][0]:.3f}, {r['spread'][1]:.3f}] | <= {r['target']} | "
              f"{'yes' if r['met'] else 'NO'} | {r['flatjax_median_s']:.4f} | "
              f"{r['baseline_median_s']:.4f} |")  # fmt: skip
    report = dict(
        benchmark="hessian", machine=machine(), args=vars(args), rows=rows,
        wall_s=round(time.perf_counter() - start, 1),
        command="python -m experiments.benchmarks.hessian_bench "
        + " ".join(argv if argv is not None else sys.argv[1:]),
    )  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out} ({report['wall_s']} s)")
    return report


if __name__ == "__main__":
    main()
