"""Replicated-SGD step cost against y sequential SGD steps, and the shared timing harness.

One jitted step of y = 3 coupled replicas (forward/backward of every replica
through ``flatjax.replica_map`` + the ``flatjax.replicate`` update) is timed
against three calls of a jitted single-network SGD step, for each execution
strategy of ``replica_map``:

- ``vmap`` and ``unroll`` (a Python loop traced into one jit), in this process;
- ``sharded``: ``vmap`` under ``jit`` with the replica axis of params,
  optimizer state and batches sharded over y devices by a ``NamedSharding``.
  On CPU the y devices are emulated (``--xla_force_host_platform_device_count``
  is read when jax is imported, so the driver runs this case in a subprocess:
  ``--sharded``); the baseline is timed in that same subprocess;
- ``auto`` (the default): the strategy ``replica_map`` resolves to on this
  backend. When its lowered program is identical to that strategy's (checked
  on the HLO text), the timings are shared rather than measured twice.

Both sides use SGD with Nesterov momentum 0.9 (``replicate`` around it, with
the default proximal coupling step). Timing: every repetition runs the
baseline and each candidate once, in an order that alternates between
repetitions; the ratio of a candidate is the median over repetitions of
candidate_r / baseline_r, and its spread the [min, max] of those per-rep
ratios. The first call (trace + compile + one run) is reported separately.

The helpers here (``make_problem``, ``sgd_step``, ``interleaved``,
``ratio_row``) are shared by the other benchmark scripts of this folder.

Usage::

    python -m experiments.benchmarks.rsgd_bench --models lenet5 --reps 5 \
        --out experiments/benchmarks/results/rsgd.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flatjax
from flatjax._rsgd import _axis as _replicate
from flatjax.models import get_model

INPUT_SHAPES = {
    "mlp": (28, 28, 1),
    "lenet5": (28, 28, 1),
    "resnet18": (32, 32, 3),
    "mlp_tiny": (8, 8, 1),  # smoke runs
}
NUM_CLASSES = 10
LEARNING_RATE = 0.05


# --------------------------------------------------------------------------- harness


class Problem(NamedTuple):
    """A model with random data, ready to time.

    Attributes:
      name: model name (a key of ``INPUT_SHAPES``).
      params: the ``params`` collection of one network.
      batch_stats: its ``batch_stats`` collection (``{}`` without BatchNorm).
      loss: ``loss(params, batch_stats, batch) -> (loss, new_batch_stats)`` in
        training mode.
      batches: ``batches(n)`` -> ``n`` random batches stacked on a leading axis.
      batch_size: examples per batch.
    """

    name: str
    params: Any
    batch_stats: Any
    loss: Callable
    batches: Callable
    batch_size: int


def make_problem(name: str, batch_size: int, *, dtype=jnp.float32, seed: int = 0) -> Problem:
    """A ``Problem`` for model ``name`` (mlp, lenet5, resnet18) on random inputs."""
    if name not in INPUT_SHAPES:
        raise ValueError(f"model must be one of {sorted(INPUT_SHAPES)}, got {name!r}")
    kwargs = {} if name.startswith("mlp") else {"dtype": dtype}
    model = get_model(name, NUM_CLASSES, **kwargs)
    shape = INPUT_SHAPES[name]
    variables = model.init(jax.random.key(seed), jnp.zeros((1, *shape), jnp.float32))
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    has_bn = bool(jax.tree.leaves(batch_stats))

    def loss(params, batch_stats, batch):
        v = {"params": params}
        if has_bn:
            v["batch_stats"] = batch_stats
            logits, mutated = model.apply(v, batch["image"], train=True, mutable=["batch_stats"])
            batch_stats = mutated["batch_stats"]
        else:
            logits = model.apply(v, batch["image"], train=True)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        return jnp.mean(ce), batch_stats

    def batches(n):
        rng = np.random.default_rng(seed + n)
        return {
            "image": jnp.asarray(rng.normal(size=(n, batch_size, *shape)), jnp.float32),
            "label": jnp.asarray(rng.integers(0, NUM_CLASSES, (n, batch_size)), jnp.int32),
        }

    return Problem(name, params, batch_stats, loss, batches, batch_size)


def base_optimizer():
    """The optimizer of every baseline: SGD with Nesterov momentum 0.9."""
    return optax.sgd(LEARNING_RATE, momentum=0.9, nesterov=True)


def sgd_step(problem: Problem, optimizer=None):
    """Jitted plain step ``(params, batch_stats, opt_state, batch) -> same + loss``."""
    optimizer = optimizer or base_optimizer()

    @jax.jit
    def step(params, batch_stats, opt_state, batch):
        (loss, batch_stats), grads = jax.value_and_grad(problem.loss, has_aux=True)(
            params, batch_stats, batch
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return step, optimizer


def sequential_sgd(problem: Problem, n: int):
    """``run()`` doing n calls of the jitted SGD step (state threaded), blocking at the end."""
    step, opt = sgd_step(problem)
    batches = problem.batches(n)
    batch_list = [jax.tree.map(lambda x, i=i: x[i], batches) for i in range(n)]
    init = (problem.params, problem.batch_stats, opt.init(problem.params))

    def run():
        p, bs, s = init
        for b in batch_list:
            p, bs, s, loss = step(p, bs, s, b)
        jax.block_until_ready((p, loss))

    return run, step


def timed_first_call(run: Callable) -> float:
    """Seconds of the first call (tracing + compilation + one execution)."""
    t = time.perf_counter()
    run()
    return time.perf_counter() - t


def interleaved(cases: dict[str, Callable], reps: int,
                cpu: dict[str, list[float]] | None = None,
                before: Callable[[], Any] | None = None) -> dict[str, list[float]]:
    """Wall-clock seconds of ``reps`` calls of every case, interleaved.

    Repetition r runs every case once; the order is reversed on odd r so that
    slow drifts of the (shared, noisy) machine hit all cases alike. When
    ``cpu`` is a dict it receives the process CPU seconds (all threads) of
    every call: on an oversubscribed machine the steadier measure of work.
    ``before`` (e.g. ``jax.clear_caches``) runs, untimed, before every call.
    """
    names = list(cases)
    times = {n: [] for n in names}
    for r in range(reps):
        for n in names if r % 2 == 0 else names[::-1]:
            if before is not None:
                before()
            t, c = time.perf_counter(), time.process_time()
            cases[n]()
            times[n].append(time.perf_counter() - t)
            if cpu is not None:
                cpu.setdefault(n, []).append(time.process_time() - c)
    return times


def ratio_row(
    benchmark: str,
    model: str,
    candidate: list[float],
    baseline: list[float],
    *,
    target: float | None,
    direction: str = "<=",
    cpu: tuple[list[float], list[float]] | None = None,
    **extra,
) -> dict:
    """A result row: median per-rep ratio candidate/baseline, its [min, max], medians.

    ``cpu`` = (candidate, baseline) process CPU seconds adds ``cpu_ratio``,
    the median per-rep ratio of CPU time.
    """
    if cpu is not None:
        extra["cpu_ratio"] = round(statistics.median(
            [c / b for c, b in zip(*cpu, strict=True)]), 3)
    ratios = [c / b for c, b in zip(candidate, baseline, strict=True)]
    ratio = statistics.median(ratios)
    met = None
    if target is not None:
        met = ratio <= target if direction == "<=" else ratio >= target
    return dict(
        benchmark=benchmark,
        model=model,
        ratio=round(ratio, 3),
        target=target,
        direction=direction,
        met=met,
        spread=[round(min(ratios), 3), round(max(ratios), 3)],
        reps=len(ratios),
        candidate_median_s=round(statistics.median(candidate), 5),
        baseline_median_s=round(statistics.median(baseline), 5),
        **extra,
    )


def machine() -> dict:
    """The host and software the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    devices = jax.devices()
    return dict(
        backend=jax.default_backend(),
        device=devices[0].device_kind,
        num_devices=len(devices),
        cpu=cpu,
        cpus=os.cpu_count(),
        load_avg_1m=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        jax=jax.__version__,
        python=platform.python_version(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )


def write_json(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


# --------------------------------------------------------------------------- Replicated-SGD


def replicated_optimizer(num_replicas: int, base=None):
    """``flatjax.replicate`` around ``base`` (default: the baseline SGD), the authors' rule."""
    return flatjax.replicate(base or base_optimizer(), num_replicas, 0.1)


def uncoupled(base):
    """``base`` vmapped over the replica axis: y independent networks, no coupling."""
    return optax.GradientTransformation(jax.vmap(base.init), jax.vmap(base.update))


def rsgd_step(problem: Problem, strategy: str, optimizer):
    """Replicated step over stacked params, batch_stats and batches (not jitted)."""
    grad = flatjax.replica_map(
        jax.value_and_grad(problem.loss, has_aux=True), strategy=strategy
    )

    def step(params, batch_stats, opt_state, batches):
        (loss, batch_stats), grads = grad(params, batch_stats, batches)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, jnp.mean(loss)

    return step


def replicated_state(problem: Problem, num_replicas: int, opt):
    """y slightly different copies of the problem's network, and the optimizer state."""

    def stack(x, spread):
        offsets = spread * jnp.arange(num_replicas, dtype=x.dtype)
        return jnp.stack([x] * num_replicas) + offsets.reshape(-1, *[1] * x.ndim)

    params = jax.tree.map(lambda x: stack(x, 0.01), problem.params)
    batch_stats = jax.tree.map(lambda x: stack(x, 0.0), problem.batch_stats)
    return params, batch_stats, opt.init(params)


def rsgd_runner(problem: Problem, num_replicas: int, strategy: str, *, optimizer=None,
                sharding=None):
    """``run()`` for one jitted replicated step; ``sharding`` places the replica axis."""
    optimizer = optimizer or replicated_optimizer(num_replicas)
    step = rsgd_step(problem, strategy, optimizer)
    state = replicated_state(problem, num_replicas, optimizer)
    batches = problem.batches(num_replicas)
    if sharding is not None:
        scalar = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        state, batches = jax.tree.map(
            lambda x: jax.device_put(x, sharding if jnp.ndim(x) else scalar), (state, batches)
        )
    jitted = jax.jit(step)

    def run():
        jax.block_until_ready(jitted(*state, batches))

    return run, jitted, (*state, batches)


def resolved_auto(problem: Problem | None = None) -> str:
    """What ``replica_map``'s ``"auto"`` runs for ``problem``'s gradient on this backend.

    On CPU it unrolls functions that convolve and vmaps the rest (decided by
    ``flatjax._rsgd._replicas._convolves`` on the per-replica gradient).
    """
    if jax.default_backend() != "cpu":
        return "vmap"
    if problem is None:
        return "unroll"
    from flatjax._rsgd._replicas import _convolves

    batch = jax.tree.map(lambda x: x[0], problem.batches(1))
    grad = jax.value_and_grad(problem.loss, has_aux=True)
    return "unroll" if _convolves(grad, (problem.params, problem.batch_stats, batch)) else "vmap"


def bench_model(name: str, batch_size: int, reps: int, strategies: list[str],
                num_replicas: int = 3, sharded: bool = False,
                slice_mean: bool = False) -> list[dict]:
    """Rows for one model: each strategy's y-replica step ÷ y SGD steps.

    ``slice_mean`` adds the default strategy with the replica mean patched to
    a sum of slices (`slice_sum_mean`), labelled ``auto+slice_mean``.
    """
    problem = make_problem(name, batch_size)
    baseline, _ = sequential_sgd(problem, num_replicas)
    cases = {"baseline": baseline}
    first = {"baseline": timed_first_call(baseline)}
    programs = {}
    aliases = {}
    for strategy in strategies:
        if sharded:
            mesh = jax.make_mesh((num_replicas,), ("replica",),
                                 axis_types=(jax.sharding.AxisType.Auto,))
            sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("replica"))
            run, jitted, args = rsgd_runner(problem, num_replicas, "vmap", sharding=sharding)
            label = "sharded"
        else:
            run, jitted, args = rsgd_runner(problem, num_replicas, strategy)
            label = strategy
        text = jitted.lower(*args).as_text()
        same = [s for s, t in programs.items() if t == text]
        programs[label] = text
        if same:
            aliases[label] = same[0]
            continue
        cases[label] = run
        first[label] = timed_first_call(run)
    if slice_mean and not sharded:
        with slice_sum_mean():
            run, jitted, args = rsgd_runner(problem, num_replicas, "auto")
            programs["auto+slice_mean"] = None
            cases["auto+slice_mean"] = run
            first["auto+slice_mean"] = timed_first_call(run)
    cpu = {}
    times = interleaved(cases, reps, cpu)
    rows = []
    for label in programs:
        measured = aliases.get(label, label)
        resolved = resolved_auto(problem) if label.startswith("auto") else None
        rows.append(ratio_row(
            f"rsgd_step_y{num_replicas}/{label}",
            name,
            times[measured],
            times["baseline"],
            cpu=(cpu[measured], cpu["baseline"]),
            target=0.75 if label == "auto" and name in ("lenet5", "resnet18") else None,
            strategy=label,
            resolves_to=resolved,
            shared_program_with=aliases.get(label),
            batch_size=batch_size,
            num_replicas=num_replicas,
            first_call_s=round(first[measured], 3),
            baseline_first_call_s=round(first["baseline"], 3),
            baseline_desc=f"{num_replicas} sequential jitted SGD steps",
        ))
        print(json.dumps(rows[-1]), flush=True)
    return rows


@contextlib.contextmanager
def slice_sum_mean():
    """Within the block, flatjax's replica mean is Σ_a x[a] / y instead of ``jnp.mean(x, 0)``.

    XLA:CPU reduces over a leading axis of size 3 some 100x slower than it adds
    three slices (measured here: 28 ms vs 0.1 ms on a (3, 784, 300) array); the
    patched variant shows what the coupling costs without that. Functions
    traced inside the block keep the patched mean.
    """
    original = _replicate._tree_mean

    def tree_mean(tree, axis_name):
        def mean(x):
            return sum(x[a] for a in range(x.shape[0])) / x.shape[0]

        out = jax.tree.map(mean, tree)
        if _replicate._bound_axis_size(axis_name) is not None:
            out = jax.lax.pmean(out, axis_name)
        return out

    _replicate._tree_mean = tree_mean
    try:
        yield
    finally:
        _replicate._tree_mean = original


def bench_coupling(name: str, batch_size: int, reps: int, num_replicas: int = 3) -> list[dict]:
    """Cost of the coupling: ``replicate(optax.sgd)`` ÷ ``optax.sgd`` on the same replicas.

    Two rows: the optimizer update alone (jitted ``update`` + ``apply_updates``
    on stacked params and gradients), and the whole replicated step (default
    strategy), where the reference runs ``optax.sgd`` vmapped over the replicas
    with no coupling.
    """
    problem = make_problem(name, batch_size)
    sgd = optax.sgd(LEARNING_RATE)
    coupled = replicated_optimizer(num_replicas, sgd)
    plain = uncoupled(sgd)
    params, _, _ = replicated_state(problem, num_replicas, plain)
    grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params)

    def update_runner(opt):
        @jax.jit
        def update(grads, state, params):
            updates, state = opt.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        state = opt.init(params)
        return lambda: jax.block_until_ready(update(grads, state, params))

    cases = {"sgd": update_runner(plain), "replicate": update_runner(coupled)}
    with slice_sum_mean():
        cases["replicate_slice_mean"] = update_runner(coupled)
        cases["replicate_slice_mean"]()  # traced and cached with the patched mean
    for run in cases.values():
        run()
    cpu = {}
    times = interleaved(cases, reps * 5, cpu)
    rows = [ratio_row("coupling_update_only", name, times["replicate"], times["sgd"],
                      target=1.05, num_replicas=num_replicas,
                      cpu=(cpu["replicate"], cpu["sgd"]),
                      baseline_desc="optax.sgd vmapped over the replicas (update + apply)"),
            ratio_row("coupling_update_only/slice_mean", name, times["replicate_slice_mean"],
                      times["sgd"], target=1.05, num_replicas=num_replicas,
                      cpu=(cpu["replicate_slice_mean"], cpu["sgd"]),
                      note="replicate with its replica mean computed as a sum of slices "
                           "(patched in this benchmark only)",
                      baseline_desc="optax.sgd vmapped over the replicas (update + apply)")]
    for row in rows:
        print(json.dumps(row), flush=True)

    cases = {
        "sgd": rsgd_runner(problem, num_replicas, "auto", optimizer=plain)[0],
        "replicate": rsgd_runner(problem, num_replicas, "auto", optimizer=coupled)[0],
    }
    for run in cases.values():
        run()
    cpu = {}
    times = interleaved(cases, reps, cpu)
    rows.append(ratio_row("coupling_whole_step", name, times["replicate"], times["sgd"],
                          cpu=(cpu["replicate"], cpu["sgd"]),
                          target=1.05, num_replicas=num_replicas, batch_size=batch_size,
                          baseline_desc="same replicated step with optax.sgd, no coupling"))
    print(json.dumps(rows[-1]), flush=True)
    return rows


def run_sharded_subprocess(models, batch_sizes, reps, num_replicas, timeout=3000):
    """Runs the sharded case in a child process with y emulated host devices."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    if jax.default_backend() == "cpu":
        flags += f" --xla_force_host_platform_device_count={num_replicas}"
    env["XLA_FLAGS"] = flags.strip()
    rows = []
    for model in models:
        cmd = [sys.executable, "-m", "experiments.benchmarks.rsgd_bench", "--sharded",
               "--models", model, "--batch-size", str(batch_sizes[model]), "--reps", str(reps),
               "--num-replicas", str(num_replicas), "--print-json"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            rows.append(dict(benchmark=f"rsgd_step_y{num_replicas}/sharded", model=model,
                             error=out.stderr.strip().splitlines()[-1:]))
            continue
        rows.extend(json.loads(out.stdout.strip().splitlines()[-1])["rows"])
    return rows


def plain_step_times(name: str, batch_size: int, reps: int, dtype: str = "float32") -> dict:
    """Absolute time of one jitted plain SGD step (after a first, compiling call).

    Wall-clock and process CPU seconds (all threads): on a shared machine the
    CPU time is the steadier of the two.

    Used by the CPU-settings study: the caller sets ``XLA_FLAGS`` or jax config
    in the environment of the process; ``dtype`` is the model's compute dtype.
    """
    problem = make_problem(name, batch_size, dtype=jnp.dtype(dtype))
    run, _ = sequential_sgd(problem, 1)
    first = timed_first_call(run)
    times, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return dict(benchmark="plain_step", model=name, batch_size=batch_size, dtype=dtype,
                cpu_s_median=round(statistics.median(cpu), 4),
                first_call_s=round(first, 3), step_median_s=round(statistics.median(times), 4),
                step_min_s=round(min(times), 4), step_max_s=round(max(times), 4), reps=reps,
                images_per_s=round(batch_size / statistics.median(times), 1),
                xla_flags=os.environ.get("XLA_FLAGS", ""),
                matmul_precision=str(jax.config.jax_default_matmul_precision))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--models", nargs="+", default=["mlp", "lenet5", "resnet18"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--resnet-batch-size", type=int, default=None,
                        help="batch of resnet18 (default: --batch-size)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--resnet-reps", type=int, default=None)
    parser.add_argument("--num-replicas", type=int, default=3)
    parser.add_argument("--strategies", nargs="+", default=["vmap", "unroll", "auto"])
    parser.add_argument("--sharded", action="store_true",
                        help="(internal) time the sharded case; needs >= y devices")
    parser.add_argument("--with-sharded", action="store_true",
                        help="also run the sharded case in a subprocess")
    parser.add_argument("--coupling-model", default=None,
                        help="also time the coupling transform's own cost on this model")
    parser.add_argument("--slice-mean", action="store_true",
                        help="also time auto with the replica mean as a sum of slices")
    parser.add_argument("--plain", action="store_true",
                        help="only time the plain SGD step of each model (absolute seconds)")
    parser.add_argument("--dtype", default="float32", help="compute dtype (with --plain)")
    parser.add_argument("--print-json", action="store_true")
    args = parser.parse_args(argv)
    bs = {m: (args.resnet_batch_size or args.batch_size) if m == "resnet18" else args.batch_size
          for m in args.models}
    reps = {m: (args.resnet_reps or args.reps) if m == "resnet18" else args.reps
            for m in args.models}
    rows = []
    if args.plain:
        rows = [plain_step_times(m, bs[m], reps[m], args.dtype) for m in args.models]
    elif args.sharded:
        if len(jax.devices()) < args.num_replicas:
            raise SystemExit(f"--sharded needs {args.num_replicas} devices, "
                             f"found {len(jax.devices())}")
        for m in args.models:
            rows += bench_model(m, bs[m], reps[m], ["sharded"], args.num_replicas, sharded=True)
    else:
        for m in args.models:
            rows += bench_model(m, bs[m], reps[m], args.strategies, args.num_replicas,
                                slice_mean=args.slice_mean)
        if args.with_sharded:
            if jax.default_backend() == "cpu" or len(jax.devices()) >= args.num_replicas:
                for m in args.models:
                    rows += run_sharded_subprocess([m], bs, reps[m], args.num_replicas)
            else:
                rows.append(dict(benchmark=f"rsgd_step_y{args.num_replicas}/sharded",
                                 model="-", skipped=f"needs {args.num_replicas} devices"))
    if args.coupling_model and not (args.sharded or args.plain):
        rows += bench_coupling(args.coupling_model, args.batch_size, args.reps,
                               args.num_replicas)
    report = dict(benchmark="rsgd", machine=machine(), rows=rows)
    if args.out:
        write_json(args.out, report)
    if args.print_json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
