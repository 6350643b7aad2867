"""The target table: every cost of flatness that has a target, against an independent baseline.

One process measures every row; each candidate is timed against a baseline
built without the flatjax code under test, **in the same process, in
interleaved repetitions** (every repetition runs baseline and candidate
once, the order alternating between repetitions). A ratio is the median over
repetitions of candidate_r / baseline_r, its spread the [min, max] of those
per-rep ratios, and ``cpu_ratio`` the same median of process CPU seconds
(all threads). Targets are judged on the wall ratio.

Rows (the functions below build them from the other benchmark modules):

- ``hvp``, ``top_eig``, ``trace``: ``flatjax.hvp``,
  ``hessian_top_eigenvalue`` (20 iterations) and ``hessian_trace`` (20
  probes) on a ``dataset_loss`` of a small CNN with BatchNorm on the sklearn
  digits ÷ one / 20 / 20 plain jitted full-batch HVPs
  (``jax.jvp(jax.grad(loss))``) (:func:`hessian_rows`, ``hessian_bench``);
- ``flatness``: ``flatjax flatness`` of a LeNet-5 run trained for a few
  steps on mnist5k (5 σ × 16 draws on the 4,000 training images) ÷ one
  compile + 80 plain jitted evaluation passes over the same images;
- ``eval``: ``flatjax eval`` of that run (1,000 test images) ÷ one compile +
  one plain evaluation pass. Both call the CLI's own entry point,
  ``flatjax.cli.main``, in this process, with JAX's caches cleared before
  every call on either side, so both sides compile; interpreter start and
  imports are not counted (:func:`checkpoint_rows`);
- ``compile_esgd``: trace + lower + compile of one jitted ``entropy_sgd``
  outer step (L = 1 and L = 5) ÷ the same for the plain SGD step, fresh
  ``jax.jit`` and cleared caches every time (:func:`compile_rows`);
- ``esgd_scan``, ``esgd_stepwise``: one ``entropy_sgd`` outer step (L = 5,
  Langevin noise on) and 5 calls of ``entropy_sgd_stepwise`` ÷ 5 jitted SGD
  steps (:func:`esgd_rows`, ``esgd_bench``);
- ``rsgd``: one step of y = 3 coupled replicas (``replicate``, the default
  ``replica_map`` strategy) ÷ 3 SGD steps, MLP and LeNet-5 at batch 128,
  ResNet-18 at batch 32 (:func:`rsgd_rows`, ``rsgd_bench``).

Example:
  >>> from experiments.benchmarks import targets
  >>> targets.plan(quick=True).esgd_models
  ('mlp_tiny',)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from experiments.benchmarks import compile_bench, esgd_bench, hessian_bench, rsgd_bench

__all__ = ["Plan", "plan", "measure", "hessian_rows", "checkpoint_rows", "compile_rows",
           "esgd_rows", "rsgd_rows", "train_run"]

SIGMAS = (0.0, 0.01, 0.02, 0.05, 0.1)


class Plan(NamedTuple):
    """What the table measures, and how often.

    Attributes:
      hessian_model: ``hessian_bench`` model (``cnn_bn``: BatchNorm in eval mode).
      hessian_iters: power iterations (top eigenvalue) and trace probes.
      hessian_reps: interleaved repetitions of the Hessian rows.
      dataset, model: the trained run of the flatness and eval rows.
      train_steps: its training steps.
      sigmas, num_draws: the flatness measurement (σ values, draws per σ).
      checkpoint_reps: repetitions of the flatness and eval rows.
      compile_model: the model of the compile rows; ``inner_steps`` their L values.
      compile_reps: repetitions of the compile rows.
      esgd_models, rsgd_models: models of the step rows.
      batch_size: their batch; ``esgd_inner_steps`` is L.
      step_reps: repetitions of the step rows.
      resnet: also time Replicated-SGD on ResNet-18 at ``resnet_batch_size``.
      resnet_reps: its repetitions.
    """

    hessian_model: str = "cnn_bn"
    hessian_iters: int = 20
    hessian_reps: int = 3
    dataset: str = "mnist5k"
    model: str = "lenet5"
    train_steps: int = 5
    sigmas: tuple[float, ...] = SIGMAS
    num_draws: int = 16
    checkpoint_reps: int = 3
    compile_model: str = "lenet5"
    inner_steps: tuple[int, ...] = (1, 5)
    compile_reps: int = 3
    esgd_models: tuple[str, ...] = ("mlp", "lenet5")
    rsgd_models: tuple[str, ...] = ("mlp", "lenet5")
    batch_size: int = 128
    esgd_inner_steps: int = 5
    step_reps: int = 7
    resnet: bool = True
    resnet_batch_size: int = 32
    resnet_reps: int = 3


def plan(*, quick: bool = False) -> Plan:
    """The default plan; ``quick``: tiny models and few repetitions (a smoke run)."""
    if quick:
        return Plan(hessian_iters=3, hessian_reps=2, dataset="digits", model="mlp_tiny",
                    train_steps=2, sigmas=(0.0, 0.05), num_draws=2, checkpoint_reps=2,
                    compile_model="mlp_tiny", inner_steps=(1, 2), compile_reps=2,
                    esgd_models=("mlp_tiny",), rsgd_models=("mlp_tiny",), batch_size=8,
                    esgd_inner_steps=2, step_reps=2, resnet=False)
    return Plan()


# --------------------------------------------------------------------------- rows


def _row(key: str, label: str, model: str, candidate: str, baseline: str, measured: dict,
         target: float) -> dict:
    """One table row from a benchmark module's row (``ratio``, ``spread``, medians)."""
    cand_s = measured.get("candidate_median_s", measured.get("flatjax_median_s"))
    return dict(
        key=key, row=label, model=model, candidate=candidate, baseline=baseline,
        ratio=measured["ratio"], spread=measured["spread"],
        cpu_ratio=measured.get("cpu_ratio"), reps=measured["reps"], target=target,
        met=measured["ratio"] <= target, candidate_median_s=cand_s,
        baseline_median_s=measured["baseline_median_s"],
        source=measured.get("benchmark"),
        **{k: measured[k] for k in ("iterations_run", "first_call_s", "baseline_first_call_s")
           if k in measured},
    )  # fmt: skip


def hessian_rows(p: Plan) -> list[dict]:
    """hvp, top eigenvalue and trace on a ``dataset_loss`` ÷ plain jitted full-batch HVPs."""
    args = argparse.Namespace(seed=0, batch_size=1000, iters=p.hessian_iters,
                              probes=p.hessian_iters, draws=p.hessian_iters,
                              reps=p.hessian_reps)  # fmt: skip
    result = hessian_bench.run_model(p.hessian_model, args, cases=("hvp", "top_eig", "trace"))
    model = f"{p.hessian_model} on digits ({result['num_params']:,} params, n = {result['n']})"
    n = p.hessian_iters
    spec = {
        "hvp": ("hvp", "one `flatjax.hvp`", "one plain HVP", 1.2),
        "top_eig": (f"top eigenvalue, {n} it", f"`hessian_top_eigenvalue`, {n} iterations",
                    f"{n} plain HVPs (+ normalisation) in a Python loop", 1.3),
        "trace": (f"trace, {n} probes", f"`hessian_trace`, {n} Rademacher probes",
                  f"{n} plain HVPs", 1.3),
    }  # fmt: skip
    rows = []
    for r in result["rows"]:
        label, cand, base, target = spec[r["case"]]
        rows.append(_row(r["case"], label, model, cand + " on a `dataset_loss`",
                         base + " (`jax.jvp(jax.grad(loss))`, jitted)", r, target))
    return rows


def train_run(workdir: str, dataset: str, model: str, steps: int, batch_size: int = 128) -> str:
    """Trains ``model`` on ``dataset`` with SGD for ``steps`` steps into ``workdir``.

    flatjax's own training loop (``flatjax.training.train_and_evaluate``),
    one checkpoint at the end: the run ``flatjax eval`` / ``flatness`` read.
    """
    from flatjax import data, training

    config = training.base_config()
    config.dataset, config.model, config.batch_size = dataset, model, batch_size
    epochs = steps * batch_size / data.get_info(dataset).num_train
    config.num_epochs = config.eval_every_epochs = config.checkpoint_every_epochs = epochs
    config.keep_checkpoints = 1
    config.progress = False
    training.train_and_evaluate(config, workdir)
    return workdir


def _cli(argv: list[str]) -> str:
    """``flatjax <argv>`` in this process (``flatjax.cli.main``); returns its stdout."""
    from flatjax import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main([*argv, "--debug"])
    if code != 0:
        raise RuntimeError(f"flatjax {' '.join(argv)} exited with {code}")
    return out.getvalue()


def _plain_passes(model, variables, x, y, num: int) -> Callable[[], None]:
    """``run()``: jit (a fresh function: one compile) and ``num`` full-batch error passes."""

    def run():
        @jax.jit
        def error(v, x, y):
            logits = model.apply(v, x, train=False)
            return 100.0 * jnp.mean(jnp.argmax(logits, -1) != y)

        jax.block_until_ready([error(variables, x, y) for _ in range(num)])

    return run


def _plain_eval(model, variables, x, y) -> Callable[[], None]:
    """``run()``: jit (one compile) and one full-batch pass of loss and error."""

    def run():
        @jax.jit
        def scores(v, x, y):
            logp = jax.nn.log_softmax(model.apply(v, x, train=False))
            loss = -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))
            return loss, 100.0 * jnp.mean(jnp.argmax(logp, -1) != y)

        jax.block_until_ready(scores(variables, x, y))

    return run


def checkpoint_rows(p: Plan, workdir: str | None = None) -> list[dict]:
    """``flatjax flatness`` and ``flatjax eval`` of a fresh run ÷ plain jitted passes.

    ``workdir``: where to train the run (default: a temporary folder, removed after).
    """
    from flatjax import _restore, data

    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="flatjax_bench_"))
        run_dir = train_run(os.path.join(workdir, "run"), p.dataset, p.model, p.train_steps)
        run = _restore.restore_run(run_dir)  # the network both sides evaluate (untimed)
        train_x, train_y = (jnp.asarray(a) for a in data.load_arrays(p.dataset, "train"))
        test_x, test_y = (jnp.asarray(a) for a in data.load_arrays(p.dataset, "test"))
        passes = len(p.sigmas) * p.num_draws
        flatness_argv = ["flatness", "--workdir", run_dir, "--num-draws", str(p.num_draws),
                         "--sigmas", *map(str, p.sigmas)]
        cases = {
            "flatness": lambda: _cli(flatness_argv),
            "flatness_base": _plain_passes(run.model, run.variables, train_x, train_y, passes),
            "eval": lambda: _cli(["eval", "--workdir", run_dir]),
            "eval_base": _plain_eval(run.model, run.variables, test_x, test_y),
        }
        cpu = {}
        times = rsgd_bench.interleaved(cases, p.checkpoint_reps, cpu, before=jax.clear_caches)
    model = f"{p.model}, {p.train_steps}-step SGD run on {p.dataset}"
    rows = []
    for key, label, cand, base, target in [
        ("flatness", "flatjax flatness",
         f"`flatjax flatness`: {len(p.sigmas)} σ × {p.num_draws} draws on the "
         f"{len(train_y):,} training images (`flatjax.cli.main`, in-process, cold caches)",
         f"one compile + {passes} plain jitted error passes over the same images", 1.2),
        ("eval", "flatjax eval",
         f"`flatjax eval`: {len(test_y):,} test images (`flatjax.cli.main`, in-process, "
         "cold caches)", "one compile + one plain jitted pass (loss and error)", 2.0),
    ]:  # fmt: skip
        measured = rsgd_bench.ratio_row(key, p.model, times[key], times[key + "_base"],
                                        target=target, cpu=(cpu[key], cpu[key + "_base"]))
        rows.append(_row(key, label, model, cand, base, measured, target))
    return rows


@contextlib.contextmanager
def _no_compilation_cache():
    previous = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", previous)


def compile_rows(p: Plan) -> list[dict]:
    """Compile time of one jitted ``entropy_sgd`` outer step (each L) ÷ the plain SGD step's."""
    problem = rsgd_bench.make_problem(p.compile_model, p.batch_size)
    builders = {"sgd": lambda: compile_bench.sgd_program(problem)}
    for L in p.inner_steps:
        builders[f"esgd_L{L}"] = lambda L=L: esgd_bench.scan_runner(problem, L)[1:]
    times = {k: [] for k in builders}
    cpu = {k: [] for k in builders}
    names = list(builders)
    with _no_compilation_cache():
        for rep in range(p.compile_reps):
            for name in names if rep % 2 == 0 else names[::-1]:
                jax.clear_caches()
                jitted, args = builders[name]()
                measured = compile_bench.compile_time(jitted, args)
                times[name].append(measured["total_s"])
                cpu[name].append(measured["cpu_s"])
    rows = []
    for L in p.inner_steps:
        key = f"esgd_L{L}"
        measured = rsgd_bench.ratio_row(f"compile/{key}", p.compile_model, times[key],
                                        times["sgd"], target=1.5, cpu=(cpu[key], cpu["sgd"]))
        rows.append(_row(f"compile_{key}", f"compile eSGD L={L}",
                         f"{p.compile_model} (B={p.batch_size})",
                         f"trace + lower + compile of one jitted `entropy_sgd` outer step, L={L}",
                         "the same for the plain jitted SGD step (Nesterov 0.9)", measured, 1.5))
    return rows


def esgd_rows(p: Plan) -> list[dict]:
    """``entropy_sgd`` outer step and the stepwise mode ÷ L jitted SGD steps."""
    L = p.esgd_inner_steps
    rows = []
    for model in p.esgd_models:
        for r in esgd_bench.bench_model(model, p.batch_size, p.step_reps, L,
                                        scan_reference=False):
            scan = r["benchmark"] == "esgd_scan"
            rows.append(_row(
                r["benchmark"], "eSGD outer step" if scan else "eSGD stepwise",
                f"{model} (B={p.batch_size})",
                f"one `entropy_sgd` outer step, L={L} in a `lax.scan`, noise on" if scan
                else f"{L} calls of the `entropy_sgd_stepwise` step",
                f"{L} jitted SGD steps", r, esgd_bench.TARGET,
            ))  # fmt: skip
    return rows


def rsgd_rows(p: Plan, models: tuple[str, ...] | None = None, batch_size: int | None = None,
              reps: int | None = None) -> list[dict]:
    """One step of y = 3 coupled replicas (default strategy) ÷ 3 jitted SGD steps."""
    rows = []
    for model in p.rsgd_models if models is None else models:
        bs = batch_size or p.batch_size
        target = 0.90 if model == "resnet18" else 1.00
        (r,) = rsgd_bench.bench_model(model, bs, reps or p.step_reps, ["auto"])
        rows.append(_row("rsgd_y3", "rSGD y=3", f"{model} (B={bs})",
                         f"one `replicate` y=3 step (`replica_map` default: "
                         f"{r['resolves_to']} here)", "3 jitted SGD steps", r, target))
    return rows


def measure(p: Plan, log: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    """Every row of the plan.

    Returns:
      ``(rows, info)``: ``info['errors']`` maps a failed section to its error
      (its rows are missing, the others still run), ``info['section_s']``
      gives each section's wall seconds.
    """
    sections = [("hessian", lambda: hessian_rows(p)),
                ("checkpoint", lambda: checkpoint_rows(p)),
                ("compile", lambda: compile_rows(p)),
                ("esgd", lambda: esgd_rows(p)),
                ("rsgd", lambda: rsgd_rows(p))]
    if p.resnet:
        sections.append(("rsgd_resnet18", lambda: rsgd_rows(
            p, ("resnet18",), p.resnet_batch_size, p.resnet_reps)))
    rows, errors, seconds = [], {}, {}
    for name, fn in sections:
        log(f"== {name}")
        start = time.perf_counter()
        try:
            rows += fn()
        except Exception as error:  # noqa: BLE001 -- reported in the table, the rest still runs
            errors[name] = f"{type(error).__name__}: {error}".splitlines()[0]
            log(f"  {name} failed: {errors[name]}")
        seconds[name] = round(time.perf_counter() - start, 1)
        log(f"  [{name}: {seconds[name]} s]")
    return rows, dict(errors=errors, section_s=seconds)
