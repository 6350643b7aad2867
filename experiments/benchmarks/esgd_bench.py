"""Entropy-SGD step cost against plain SGD steps.

Two ratios per model, each against its baseline in the same process:

- scan mode (``flatjax.entropy_sgd``): one jitted outer step, whose L inner
  Langevin steps run in a ``lax.scan`` calling ``grad_fn(walker, i)`` on the
  i-th of L stacked minibatches, ÷ L calls of a jitted plain SGD step;
- stepwise mode (``flatjax.entropy_sgd_stepwise``): L calls of a jitted step
  doing one Langevin step each (the L-th also lands the outer step) ÷ L
  calls of the plain SGD step. Per call this is the stepwise step ÷ one SGD
  step.

A reference row per model (not ResNet-18, to save time): L plain SGD steps
inside one jitted ``lax.scan`` ÷ L separate calls, rolled and with
``unroll=L``; it separates what the scan (an XLA while loop) costs on this
backend from what Entropy-SGD itself costs.

The loss is the model's training loss (BatchNorm in training mode; its
updated statistics are discarded inside the scan, as the 'anchor' mode of
``flatjax.training`` would, and carried by the plain steps). Timing and
statistics as in ``rsgd_bench`` (interleaved repetitions, median of per-rep
ratios, [min, max] spread).

Usage::

    python -m experiments.benchmarks.esgd_bench --models lenet5 --inner-steps 5 \
        --out experiments/benchmarks/results/esgd.json
"""

from __future__ import annotations

import argparse
import json

import jax
import optax

import flatjax
from experiments.benchmarks.rsgd_bench import (
    LEARNING_RATE,
    Problem,
    base_optimizer,
    interleaved,
    machine,
    make_problem,
    ratio_row,
    sequential_sgd,
    sgd_step,
    timed_first_call,
    write_json,
)

TARGET = 1.10


def scan_runner(problem: Problem, inner_steps: int):
    """``run()`` for one jitted Entropy-SGD outer step (scan mode), and its jitted function."""
    opt = flatjax.entropy_sgd(LEARNING_RATE, inner_steps=inner_steps, coupling=0.03)
    batches = problem.batches(inner_steps)

    def step(params, batch_stats, opt_state, batches):
        def grad_fn(walker, i):
            batch = jax.tree.map(lambda x: x[i], batches)
            return jax.grad(lambda w: problem.loss(w, batch_stats, batch)[0])(walker)

        updates, opt_state = opt.update(None, opt_state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), opt_state

    jitted = jax.jit(step)
    args = (problem.params, problem.batch_stats, opt.init(problem.params), batches)

    def run():
        jax.block_until_ready(jitted(*args))

    return run, jitted, args


def stepwise_runner(problem: Problem, inner_steps: int):
    """``run()`` doing L calls of the jitted stepwise Entropy-SGD step (one outer step)."""
    opt = flatjax.entropy_sgd_stepwise(LEARNING_RATE, inner_steps=inner_steps, coupling=0.03)
    batches = problem.batches(inner_steps)
    batch_list = [jax.tree.map(lambda x, i=i: x[i], batches) for i in range(inner_steps)]

    step, _ = sgd_step(problem, opt)  # the plain training step, with the stepwise transform
    init = (problem.params, problem.batch_stats, opt.init(problem.params))

    def run():
        p, bs, s = init
        for b in batch_list:
            p, bs, s, loss = step(p, bs, s, b)
        jax.block_until_ready((p, loss))

    return run, step, (*init, batch_list[0])


def sgd_scan_runner(problem: Problem, inner_steps: int, unroll: bool):
    """``run()`` for L plain SGD steps inside one jitted ``lax.scan`` (``unroll``: fully).

    Not Entropy-SGD: the reference that separates the cost of running steps
    inside a scan (an XLA while loop) from the cost of the algorithm.
    """
    opt = base_optimizer()
    batches = problem.batches(inner_steps)

    def body(carry, batch):
        params, batch_stats, opt_state = carry
        (loss, batch_stats), grads = jax.value_and_grad(problem.loss, has_aux=True)(
            params, batch_stats, batch
        )
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    @jax.jit
    def steps(params, batch_stats, opt_state, batches):
        return jax.lax.scan(body, (params, batch_stats, opt_state), batches,
                            unroll=inner_steps if unroll else 1)

    args = (problem.params, problem.batch_stats, opt.init(problem.params), batches)
    return lambda: jax.block_until_ready(steps(*args))


def bench_model(name: str, batch_size: int, reps: int, inner_steps: int,
                scan_reference: bool = True) -> list[dict]:
    """Rows for one model: scan and stepwise Entropy-SGD ÷ L SGD steps.

    ``scan_reference`` adds L plain SGD steps inside a ``lax.scan`` (rolled
    and fully unrolled) ÷ the same L steps as separate calls.
    """
    problem = make_problem(name, batch_size)
    baseline, _ = sequential_sgd(problem, inner_steps)
    scan, _, _ = scan_runner(problem, inner_steps)
    stepwise, _, _ = stepwise_runner(problem, inner_steps)
    cases = {"baseline": baseline, "scan": scan, "stepwise": stepwise}
    if scan_reference:
        cases["sgd_in_scan"] = sgd_scan_runner(problem, inner_steps, unroll=False)
        cases["sgd_in_unrolled_scan"] = sgd_scan_runner(problem, inner_steps, unroll=True)
    first = {k: timed_first_call(run) for k, run in cases.items()}
    cpu = {}
    times = interleaved(cases, reps, cpu)
    rows = []
    for mode, desc in [
        ("scan", f"one outer step (L = {inner_steps} inner steps in a lax.scan)"),
        ("stepwise", f"{inner_steps} stepwise calls (one Langevin step each)"),
    ]:
        rows.append(ratio_row(
            f"esgd_{mode}", name, times[mode], times["baseline"], target=TARGET,
            cpu=(cpu[mode], cpu["baseline"]),
            inner_steps=inner_steps, batch_size=batch_size, candidate_desc=desc,
            baseline_desc=f"{inner_steps} sequential jitted SGD steps",
            first_call_s=round(first[mode], 3),
            baseline_first_call_s=round(first["baseline"], 3),
        ))
        print(json.dumps(rows[-1]), flush=True)
    for mode in ("sgd_in_scan", "sgd_in_unrolled_scan"):
        if mode in cases:
            rows.append(ratio_row(
                f"reference/{mode}", name, times[mode], times["baseline"], target=None,
                cpu=(cpu[mode], cpu["baseline"]),
                inner_steps=inner_steps, batch_size=batch_size,
                candidate_desc=f"{inner_steps} plain SGD steps in one jitted lax.scan"
                + (" (unroll=L)" if mode.endswith("unrolled_scan") else ""),
                baseline_desc=f"{inner_steps} sequential jitted SGD steps",
                first_call_s=round(first[mode], 3),
            ))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--models", nargs="+", default=["mlp", "lenet5", "resnet18"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--resnet-batch-size", type=int, default=None)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--resnet-reps", type=int, default=None)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--resnet-inner-steps", type=int, default=None)
    args = parser.parse_args(argv)
    rows = []
    for m in args.models:
        resnet = m == "resnet18"
        rows += bench_model(
            m,
            (args.resnet_batch_size or args.batch_size) if resnet else args.batch_size,
            (args.resnet_reps or args.reps) if resnet else args.reps,
            (args.resnet_inner_steps or args.inner_steps) if resnet else args.inner_steps,
            scan_reference=not resnet,
        )
    report = dict(benchmark="esgd", machine=machine(), rows=rows)
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
