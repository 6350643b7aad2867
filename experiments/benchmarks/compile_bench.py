"""Compile time of each train step, and how it grows with L and y.

For every step the first call is split into tracing + lowering
(``jax.jit(f).lower(*args)``) and XLA compilation (``.compile()``); the
persistent compilation cache is off in this process, so nothing is reused.

- plain SGD step;
- Entropy-SGD scan mode for L = 1, 5, 20: the inner loop is a ``lax.scan``,
  so the program (and its compile time) should not grow with L;
- Entropy-SGD stepwise step (independent of L by construction);
- Replicated-SGD for y = 1, 3, 8 with ``replica_map`` strategies ``vmap``
  (one batched program: flat in y) and ``unroll`` (a Python loop over the
  replicas traced into one jit: the program holds y copies of the network,
  so its compile time grows about linearly with y).

Each row reports seconds and the ratio to the smallest L or y, i.e. the
growth factor; the HLO size (characters of the lowered text) shows whether
the program itself grew.

Usage::

    python -m experiments.benchmarks.compile_bench --models lenet5 \
        --out experiments/benchmarks/results/compile.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from experiments.benchmarks import esgd_bench
from experiments.benchmarks.rsgd_bench import (
    machine,
    make_problem,
    rsgd_runner,
    sgd_step,
    write_json,
)


def compile_time(jitted, args) -> dict:
    """Seconds to trace+lower and to compile ``jitted`` at ``args``, and the HLO size.

    ``cpu_s`` is the process CPU time (all threads) of both phases together.
    """
    c0, t0 = time.process_time(), time.perf_counter()
    lowered = jitted.lower(*args)
    t1 = time.perf_counter()
    lowered.compile()
    t2, c2 = time.perf_counter(), time.process_time()
    return dict(lower_s=round(t1 - t0, 3), compile_s=round(t2 - t1, 3),
                total_s=round(t2 - t0, 3), cpu_s=round(c2 - c0, 3),
                hlo_chars=len(lowered.as_text()))


def sgd_program(problem):
    """The jitted plain SGD step (a fresh ``jax.jit``) and the arguments of its first call."""
    step, opt = sgd_step(problem)
    batch = jax.tree.map(lambda x: x[0], problem.batches(1))
    return step, (problem.params, problem.batch_stats, opt.init(problem.params), batch)


def bench_model(name: str, batch_size: int, inner_steps=(1, 5, 20), replicas=(1, 3, 8),
                strategies=("vmap", "unroll")) -> list[dict]:
    problem = make_problem(name, batch_size)
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    emit(dict(benchmark="compile/sgd", model=name, **compile_time(*sgd_program(problem))))

    for mode, runner in [("scan", esgd_bench.scan_runner)]:
        first = None
        for L in inner_steps:
            _, jitted, args = runner(problem, L)
            row = compile_time(jitted, args)
            first = first or row["total_s"]
            emit(dict(benchmark=f"compile/esgd_{mode}", model=name, inner_steps=L,
                      growth=round(row["total_s"] / first, 2), **row))
    _, jitted, args = esgd_bench.stepwise_runner(problem, inner_steps[0])
    emit(dict(benchmark="compile/esgd_stepwise", model=name, **compile_time(jitted, args)))

    for strategy in strategies:
        first = None
        for y in replicas:
            _, jitted, args = rsgd_runner(problem, y, strategy)
            row = compile_time(jitted, args)
            first = first or row["total_s"]
            emit(dict(benchmark=f"compile/rsgd_{strategy}", model=name, num_replicas=y,
                      growth=round(row["total_s"] / first, 2), **row))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--models", nargs="+", default=["mlp", "lenet5"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--inner-steps", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 3, 8])
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)
    rows = []
    for m in args.models:
        rows += bench_model(m, args.batch_size, args.inner_steps, args.replicas)
    report = dict(benchmark="compile", machine=machine(), rows=rows)
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
