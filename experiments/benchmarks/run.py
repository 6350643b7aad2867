"""Benchmark driver: the cost of flatness, measured side by side.

By default (``make bench``) it measures the target table of ``targets.py``
in one process, about 12 minutes on 2 CPU cores: every flatjax cost that has
a target against an independent baseline, interleaved repetitions, median
of per-rep ratios with their [min, max] and the CPU-time ratio. It writes
``--out/targets.json`` (rows, git commit and dirty flag, UTC time, machine,
load average before and after, package versions) and rewrites the table
between ``<!-- targets:start -->`` and ``<!-- targets:end -->`` in the
benchmarks README (``--readme``; not in ``--quick`` runs unless asked).

The older studies are sections (``--only`` picks some, with or without
``targets``; ``--full`` runs all of them). Each runs in a subprocess, so
that XLA flags and device counts stay per benchmark, and writes one JSON per
benchmark to ``--out``; they are merged into ``summary.json`` with a
markdown table: benchmark, model, ratio, target, met?, spread, machine.

- ``rsgd``: Replicated-SGD y = 3 step ÷ 3 SGD steps per ``replica_map``
  strategy, plus the sharded case (emulated devices on CPU) and the coupling
  transform's own cost (``rsgd_bench``);
- ``esgd``: Entropy-SGD scan and stepwise ÷ L SGD steps (``esgd_bench``);
- ``compile``: compile time against L and y (``compile_bench``);
- ``local_energy``: local energy ÷ M evaluation passes (``local_energy_bench``);
- ``hessian``: hvp, top eigenvalue, Hessian trace and local energy on a
  ``dataset_loss`` ÷ plain jitted full-batch HVPs / passes, small CNNs on
  digits (``hessian_bench``);
- ``pipeline``: input-pipeline images/s (``pipeline_bench``; needs
  tensorflow-datasets and grain, skipped where they are missing), divided by
  the training step's images/s measured by ``rsgd``;
- ``devices``: the same Replicated-SGD run on 1, 2, 4 devices (``devices_bench``);
- ``cpu``: ResNet-18 plain step under XLA:CPU settings (flags, bf16), and
  PyTorch eager when ``--torch-python`` points at a Python with torch.

A section whose JSON already exists in ``--out`` and is not re-run (``--only``
leaves it out) is still merged, marked with the time it was written.

Usage::

    .venv/bin/python -m experiments.benchmarks.run                 # the target table
    .venv/bin/python -m experiments.benchmarks.run --quick         # smoke run, < 2 min
    .venv/bin/python -m experiments.benchmarks.run --full          # everything, hours
    .venv/bin/python -m experiments.benchmarks.run --only rsgd esgd --out /tmp/b
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib import metadata

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
README = os.path.join(HERE, "README.md")
TARGETS_JSON = "targets.json"
START, END = "<!-- targets:start -->", "<!-- targets:end -->"
SECTIONS = ("rsgd", "esgd", "compile", "local_energy", "hessian", "pipeline", "devices", "cpu")
PIPELINE_TARGET = 5.0

# XLA:CPU settings tried on the ResNet-18 step: (label, XLA_FLAGS to add, dtype, extra env).
CPU_VARIANTS = [
    ("default", "", "float32", {}),
    ("no_multi_thread_eigen", "--xla_cpu_multi_thread_eigen=false", "float32", {}),
    ("onednn_fusion", "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce",
     "float32", {}),
    ("xnn_fusion", "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce", "float32", {}),
    ("fast_math", "--xla_cpu_enable_fast_math=true", "float32", {}),
    ("bfloat16", "", "bfloat16", {}),
    ("matmul_precision_bf16", "", "float32", {"JAX_DEFAULT_MATMUL_PRECISION": "bfloat16"}),
]


def _python_module(module: str, args: list[str], *, env=None, timeout=3600):
    """Runs ``python -m module args`` from the repository root; returns (ok, stdout|error)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-m", module, *args]
    t = time.perf_counter()
    try:
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout} s"
    print(f"  [{module} {' '.join(args)}: {time.perf_counter() - t:.0f} s]", flush=True)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()
        return False, tail[-1] if tail else f"exit code {out.returncode}"
    return True, out.stdout


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _load(path):
    with open(path) as f:
        return json.load(f)


def _write(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def _json_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


# --------------------------------------------------------------------------- sections


def run_sections(args) -> dict[str, str]:
    """Runs the selected sections; returns {section: error} for those that failed."""
    out, q, errors = args.out, args.quick, {}
    gpu = args.backend != "cpu"
    models = ["mlp_tiny"] if q else ["mlp", "lenet5", "resnet18"]
    batch = "8" if q else str(args.batch_size)
    rbatch = batch if q else str(args.resnet_batch_size or args.batch_size)
    reps = "2" if q else str(args.reps)
    rreps = reps if q else str(args.resnet_reps)

    def section(name, module, argv, env=None):
        if name not in args.only:
            return
        print(f"== {name}", flush=True)
        ok, msg = _python_module(module, argv, env=env)
        if not ok:
            errors[name] = msg
            print(f"  {name} failed: {msg}", flush=True)

    rsgd_args = ["--models", *models, "--batch-size", batch, "--resnet-batch-size", rbatch,
                 "--reps", reps, "--resnet-reps", rreps,
                 "--coupling-model", "mlp_tiny" if q else "mlp",
                 "--out", os.path.join(out, "rsgd.json")]
    if not q:
        rsgd_args += ["--with-sharded", "--slice-mean"]
    section("rsgd", "experiments.benchmarks.rsgd_bench", rsgd_args)
    section("esgd", "experiments.benchmarks.esgd_bench",
            ["--models", *models, "--batch-size", batch, "--resnet-batch-size", rbatch,
             "--reps", reps, "--resnet-reps", rreps,
             "--inner-steps", "2" if q else "5",
             "--resnet-inner-steps", "2" if q else str(args.resnet_inner_steps),
             "--out", os.path.join(out, "esgd.json")])
    section("compile", "experiments.benchmarks.compile_bench",
            ["--models", *(["mlp_tiny"] if q else args.compile_models), "--batch-size", batch,
             "--inner-steps", *(["1", "2"] if q else ["1", "5", "20"]),
             "--replicas", *(["1", "2"] if q else ["1", "3", "8"]),
             "--out", os.path.join(out, "compile.json")])
    section("local_energy", "experiments.benchmarks.local_energy_bench",
            (["--n", "200", "--num-draws", "4", "--batch-size", "100", "--repeats", "2"]
             if q else ["--repeats", str(args.reps)])
            + ["--out", os.path.join(out, "local_energy.json")])
    section("hessian", "experiments.benchmarks.hessian_bench",
            (["--models", "cnn", "--iters", "3", "--probes", "3", "--draws", "3", "--reps", "1"]
             if q else [])
            + ["--out", os.path.join(out, "hessian.json")])
    if "pipeline" in args.only:
        if gpu or not (_has("tensorflow_datasets") and _has("grain")):
            errors["pipeline"] = "skipped: needs tensorflow-datasets and grain (CPU host only)"
            print(f"== pipeline {errors['pipeline']}", flush=True)
        else:
            section("pipeline", "experiments.benchmarks.pipeline_bench",
                    ["--steps", "20", "--warmup", "3", "--threads", "0", "4",
                     "--workers", "0", "--out", os.path.join(out, "pipeline.json")])
    section("devices", "experiments.benchmarks.devices_bench",
            (["--devices", "1,2", "--steps", "2", "--reps", "1", "--batch-size", "8",
              "--replicas", "2"] if q else (["--no-emulate"] if gpu else []))
            + ["--out", os.path.join(out, "devices.json")])
    if "cpu" in args.only:
        print("== cpu", flush=True)
        rows = cpu_study(args)
        _write(os.path.join(out, f"cpu_b{8 if q else args.cpu_batch_size}.json"),
               dict(benchmark="cpu", rows=rows))
    return errors


def cpu_study(args) -> list[dict]:
    """ResNet-18 plain step under each XLA:CPU setting, and PyTorch eager alternately."""
    q = args.quick
    model = "mlp_tiny" if q else "resnet18"
    batch = "8" if q else str(args.cpu_batch_size)
    rows = []
    variants = CPU_VARIANTS[:2] if q else [v for v in CPU_VARIANTS if v[0] in args.cpu_variants]
    if args.backend != "cpu":
        variants = [v for v in variants if v[0] in ("default", "bfloat16")]
    torch_py = args.torch_python
    if not (torch_py and os.path.exists(torch_py)):
        torch_py = None
    for label, flags, dtype, extra in variants:
        env = dict(os.environ, **extra)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
        ok, text = _python_module(
            "experiments.benchmarks.rsgd_bench",
            ["--plain", "--models", model, "--batch-size", batch, "--resnet-batch-size", batch,
             "--reps", "2" if q else str(args.cpu_reps), "--dtype", dtype, "--print-json"],
            env=env,
        )
        row = dict(variant=label, flags=flags, dtype=dtype, env=extra)
        if ok:
            row.update(json.loads(text.strip().splitlines()[-1])["rows"][0])
            row["variant"] = label
        else:
            row["error"] = text
        rows.append(row)
        print("  " + json.dumps(row), flush=True)
        if torch_py and label == "default" and not q:
            rows.append(torch_step(torch_py, batch, args.cpu_reps))
    if torch_py and not q:  # a second torch run after the variants: the load drifts
        rows.append(torch_step(torch_py, batch, args.cpu_reps))
    return rows


def torch_step(python: str, batch: str, reps: int) -> dict:
    root = os.path.dirname(os.path.abspath(__file__))
    cmd = [python, os.path.join(root, "torch_resnet18.py"), "--batch-size", batch,
           "--reps", str(reps)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        row = _json_lines(out.stdout)[-1]
    except (subprocess.TimeoutExpired, IndexError) as e:
        row = dict(benchmark="torch_resnet18_step", error=repr(e))
    row["variant"] = "pytorch_eager"
    print("  " + json.dumps(row), flush=True)
    return row


# --------------------------------------------------------------------------- target table


def git_state(root: str = os.path.dirname(os.path.dirname(HERE))) -> dict:
    """The commit measured and whether the working tree differed from it (``git status``)."""

    def git(*cmd):
        out = subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain")
    paths = status.splitlines() if status else []
    return dict(commit=git("rev-parse", "HEAD"), subject=git("log", "-1", "--format=%s"),
                dirty=bool(paths) if status is not None else None,
                dirty_paths=paths[:100])  # fmt: skip


def host() -> dict:
    """CPU model, nproc, backend and the versions of the packages measured."""
    from experiments.benchmarks.rsgd_bench import machine

    m = machine()
    versions = {}
    for package in ("jax", "jaxlib", "flax", "optax"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return dict(cpu=m["cpu"], nproc=os.cpu_count(), backend=m["backend"], device=m["device"],
                python=m["python"], xla_flags=m["xla_flags"], **versions)


def _load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def run_targets(args) -> dict:
    """Measures the target table; returns the report written to ``targets.json``."""
    from experiments.benchmarks import targets

    plan = targets.plan(quick=args.quick)
    # The code measured is the tree at the start (imported then); other work
    # may commit or edit while this runs, which the state at the end shows.
    git, started = git_state(), datetime.datetime.now(datetime.UTC)
    load_before, start = _load_average(), time.perf_counter()
    rows, info = targets.measure(plan)
    git_after = git_state()
    git["changed_during_run"] = git_after != git
    if git["changed_during_run"]:
        git["after"] = git_after
    return dict(
        benchmark="targets",
        command=args.command,
        written=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        started=started.isoformat(timespec="seconds"),
        wall_s=round(time.perf_counter() - start, 1),
        git=git,
        machine=dict(host(), load_avg_before=load_before, load_avg_after=_load_average()),
        plan=plan._asdict(),
        quick=args.quick,
        rows=rows,
        **info,
    )  # fmt: skip


def _fmt(x, digits=2):
    return "–" if x is None else f"{x:.{digits}f}"


def _seconds(x):
    return "–" if x is None else (f"{x:.3g}" if x < 10 else f"{x:.0f}")


def _loads(averages):
    return "–" if averages is None else ", ".join(f"{x:g}" for x in averages)


def targets_markdown(report: dict) -> str:
    """The target table with a line saying what was measured where, and when."""
    m, g = report["machine"], report["git"]
    commit = (g.get("commit") or "unknown")[:10]
    dirty = {True: "working tree dirty", False: "clean", None: "status unknown"}[g.get("dirty")]
    if g.get("changed_during_run"):
        head = g["after"].get("commit")
        dirty += (f"; during the run HEAD became `{(head or '?')[:10]}`"
                  if head != g.get("commit") else "; the tree changed during the run")
    when = report["started"].replace("T", " ").replace("+00:00", " UTC")
    lines = [
        f"Commit `{commit}` ({dirty}), {when}, `{report['command']}` in "
        f"{report['wall_s']:.0f} s wall. Machine: {m['cpu']}, nproc {m['nproc']}, "
        f"backend {m['backend']}; load average (1, 5, 15 min) "
        f"{_loads(m['load_avg_before'])} before, {_loads(m['load_avg_after'])} after; "
        f"jax {m['jax']}, jaxlib {m['jaxlib']}, flax {m['flax']}, optax {m['optax']}.",
        "",
        "| row | model | candidate | independent baseline | ratio, wall: median [min, max] "
        "| ratio, CPU | target | met? | s per rep (cand. / base.) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        spread = f"[{_fmt(r['spread'][0])}, {_fmt(r['spread'][1])}]"
        lines.append(
            f"| {r['row']} | {r['model']} | {r['candidate']} | {r['baseline']} | "
            f"**{_fmt(r['ratio'], 3)}** {spread} ({r['reps']} reps) | {_fmt(r['cpu_ratio'])} | "
            f"≤ {r['target']:.2f} | {'yes' if r['met'] else '**no**'} | "
            f"{_seconds(r['candidate_median_s'])} / {_seconds(r['baseline_median_s'])} |"
        )
    for name, error in report["errors"].items():
        lines.append(f"| {name} | – | failed: {error} | | | | | | |")
    return "\n".join(lines)


def rewrite_readme(path: str, table: str) -> None:
    """Replaces the text between the README's target markers with ``table``."""
    with open(path) as f:
        text = f.read()
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise ValueError(f"{path} has no {START} ... {END} block to rewrite")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as f:
        f.write(f"{head}{START}\n{table}\n{END}{tail}")


# --------------------------------------------------------------------------- summary


def _stamp(path):
    return datetime.datetime.fromtimestamp(os.path.getmtime(path), datetime.UTC).strftime(
        "%Y-%m-%d %H:%M UTC"
    )


def summarise(out: str, errors: dict[str, str], machine: dict, ran: list[str]) -> dict:
    """Merges the per-benchmark JSON files of ``out`` into one list of rows."""
    rows, sources = [], {}

    def source(name):
        path = os.path.join(out, f"{name}.json")
        if not os.path.exists(path):
            return None
        sources[name] = dict(file=os.path.basename(path), written=_stamp(path),
                             rerun=name in ran and name not in errors)
        return _load(path)

    step_ips = {}
    if rsgd := source("rsgd"):
        for r in rsgd["rows"]:
            rows.append(r)
            if r.get("strategy") == "vmap" and "baseline_median_s" in r:
                step_ips[r["model"]] = (r["num_replicas"] * r["batch_size"]
                                        / r["baseline_median_s"])
    if extra := source("rsgd_sharded"):  # a separate re-run of the sharded case
        redone = {(r["benchmark"], r["model"]) for r in extra["rows"] if "ratio" in r}
        rows[:] = [r for r in rows if (r.get("benchmark"), r.get("model")) not in redone]
        rows += extra["rows"]
    if esgd := source("esgd"):
        rows += esgd["rows"]
    if comp := source("compile"):
        for r in comp["rows"]:
            rows.append(dict(r, ratio=r.get("growth"), seconds=r["total_s"]))
    if le := source("local_energy"):
        rows.append(dict(benchmark="local_energy", model=f"mlp {le.get('num_params')} params",
                         ratio=round(le["ratio_local_energy_over_plain"], 3), target=1.2,
                         direction="<=", met=le["ratio_local_energy_over_plain"] <= 1.2,
                         spread=None, num_draws=le.get("num_draws"),
                         note=f"best of {le.get('repeats')} (C's script); "
                              f"{le['speedup_over_naive_loop']:.1f}x faster than a Python loop"))
        rows.append(dict(benchmark="local_energy_speedup_vs_loop", model="mlp",
                         ratio=round(le["speedup_over_naive_loop"], 2), target=None))
    if hess := source("hessian"):
        rows += hess["rows"]
    if pipe := source("pipeline"):
        best = {}
        for r in pipe["results"]:
            best[r["case"]] = max(best.get(r["case"], 0.0), r["images_per_s"])
        for model, cases in (("lenet5", ["mnist5k"]),
                             ("resnet18", ["fake_cifar10", "cifar_like", "cifar10_mock"])):
            case = next((c for c in cases if c in best), None)
            if case and model in step_ips:
                ratio = best[case] / step_ips[model]
                rows.append(dict(benchmark="pipeline_over_step", model=model,
                                 ratio=round(ratio, 2), target=PIPELINE_TARGET, direction=">=",
                                 met=ratio >= PIPELINE_TARGET, spread=None,
                                 pipeline_images_per_s=best[case], pipeline_case=case,
                                 step_images_per_s=round(step_ips[model], 1)))
    if dev := source("devices"):
        for r in dev.get("rows", []):
            mesh = r.get("mesh", r.get("devices"))
            if isinstance(mesh, dict):
                mesh = ",".join(f"{k}={v}" for k, v in mesh.items())
            if r.get("mode"):
                mesh = f"{r['mode']}/{mesh}"
            rows.append(dict(benchmark=f"devices/{mesh}",
                             model=dev.get("model"), ratio=round(r.get("time_vs_first", 0), 3),
                             target=None, note="run time vs 1 device (same cores, emulated)"))
    for name in sorted(f[:-5] for f in os.listdir(out) if f.startswith("cpu_b")
                       and f.endswith(".json")):
        cpu = source(name)
        ref = next((r for r in cpu["rows"] if r.get("variant") == "default"
                    and "step_median_s" in r), None)
        for r in cpu["rows"]:
            if "step_median_s" in r and ref:
                rows.append(dict(benchmark=f"step/{r['variant']}", model=r.get("model"),
                                 ratio=round(r["step_median_s"] / ref["step_median_s"], 3),
                                 target=None, seconds=r["step_median_s"],
                                 cpu_seconds=r.get("cpu_s_median"),
                                 batch_size=r.get("batch_size"),
                                 note="absolute step ÷ flax default (separate processes)"))
            elif "error" in r:
                rows.append(dict(benchmark=f"step/{r['variant']}", model="resnet18",
                                 error=r["error"]))
    if steps := source("model_steps"):  # E's script, merged when its JSON is there
        ref = next((c for c in steps["cases"] if c["case"] == "resnet18"), None)
        for c in steps["cases"]:
            base = ref if c["case"].startswith("resnet18") and ref else c
            rows.append(dict(benchmark=f"model_steps/{c['case']}", model=c["case"].split("_")[0],
                             ratio=round(c["median_step_s"] / base["median_step_s"], 3),
                             target=None, seconds=round(c["median_step_s"], 3),
                             cpu_seconds=round(c["median_step_cpu_s"], 3),
                             batch_size=c.get("batch_size"),
                             note="E's script; ratio to the float32 step of the same net"))
    for name, err in errors.items():
        rows.append(dict(benchmark=name, error=err))
    return dict(written=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                machine=machine, sources=sources, rows=rows)


def markdown(summary: dict) -> str:
    m = summary["machine"]
    if m.get("backend") == "cpu":
        host = f"{m.get('cpu')}, {m.get('cpus')} cpus"
    else:
        host = f"{m.get('backend')}: {m.get('device')}"
    lines = ["| benchmark | model | ratio (wall; cpu) | target | met? | spread | machine |",
             "|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['benchmark']} | {r.get('model', '-')} | - | - | - | "
                         f"{r.get('error') or r.get('skipped')} | {host} |")
            continue
        target = "-" if r.get("target") is None else f"{r.get('direction', '<=')} {r['target']}"
        met = {True: "yes", False: "**no**", None: "-"}[r.get("met")]
        spread = r.get("spread")
        spread = f"[{spread[0]}, {spread[1]}] ({r.get('reps')} reps)" if spread else "-"
        ratio = r.get("ratio")
        if r.get("cpu_ratio") is not None:
            ratio = f"{ratio} (cpu {r['cpu_ratio']})"
        if "seconds" in r:
            cpu = f", {r['cpu_seconds']} s cpu" if r.get("cpu_seconds") else ""
            ratio = f"{ratio} ({r['seconds']} s{cpu})"
        model = r.get("model", "-")
        for key in ("num_replicas", "inner_steps"):
            if key in r and r["benchmark"].startswith("compile"):
                model = f"{model} {'y' if key == 'num_replicas' else 'L'}={r[key]}"
        if r.get("batch_size"):
            model = f"{model} (B={r['batch_size']})"
        lines.append(f"| {r['benchmark']} | {model} | {ratio} | {target} | {met} | {spread} "
                     f"| {host} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny models, 2 reps, under 2 minutes")
    parser.add_argument("--full", action="store_true",
                        help="the target table and every older study (hours)")
    parser.add_argument("--out", default=None,
                        help=f"JSON folder (default {RESULTS}; with --quick a temp folder)")
    parser.add_argument("--readme", default=None,
                        help="README whose target block is rewritten (default: this folder's, "
                             "not with --quick)")
    parser.add_argument("--no-readme", action="store_true", help="leave the README alone")
    parser.add_argument("--table-only", action="store_true",
                        help="measure nothing: print the table of --out/targets.json and "
                             "rewrite the README's with it")
    parser.add_argument("--merge-only", action="store_true",
                        help="run nothing; merge the JSON files of --out into summary.json")
    parser.add_argument("--only", nargs="+", choices=("targets", *SECTIONS), default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--resnet-batch-size", type=int, default=None,
                        help="ResNet-18 batch (default: --batch-size on GPU, 32 on CPU)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--resnet-reps", type=int, default=None,
                        help="ResNet-18 repetitions (default: --reps on GPU, 2 on CPU)")
    parser.add_argument("--resnet-inner-steps", type=int, default=5)
    parser.add_argument("--compile-models", nargs="+", default=["lenet5"])
    parser.add_argument("--cpu-batch-size", type=int, default=128)
    parser.add_argument("--cpu-reps", type=int, default=2)
    parser.add_argument("--cpu-variants", nargs="+", default=[v[0] for v in CPU_VARIANTS],
                        choices=[v[0] for v in CPU_VARIANTS])
    parser.add_argument("--torch-python", default="/tmp/torchvenv/bin/python")
    args = parser.parse_args(argv)
    args.command = " ".join(["python -m experiments.benchmarks.run",
                             *(sys.argv[1:] if argv is None else argv)])

    import jax  # after argument parsing: --help stays fast

    from experiments.benchmarks.rsgd_bench import machine

    args.backend = jax.default_backend()
    cpu = args.backend == "cpu"
    if args.out is None:
        args.out = (os.path.join(tempfile.gettempdir(), "flatjax_bench_quick") if args.quick
                    else RESULTS)  # fmt: skip
    if args.resnet_batch_size is None:
        args.resnet_batch_size = 32 if cpu else args.batch_size
    if args.resnet_reps is None:
        args.resnet_reps = 2 if cpu else args.reps
    if args.only is None:
        args.only = ["targets", *SECTIONS] if args.full else ["targets"]
        if not cpu:
            args.only = [s for s in args.only if s not in ("pipeline",)]
    if args.merge_only:
        args.only = []
    os.makedirs(args.out, exist_ok=True)
    result = {}
    if args.table_only:
        args.only = ["targets"]
    if "targets" in args.only:
        if args.table_only:
            report = _load(os.path.join(args.out, TARGETS_JSON))
        else:
            report = run_targets(args)
            _write(os.path.join(args.out, TARGETS_JSON), report)
        table = targets_markdown(report)
        print(table)
        readme = args.readme or (None if args.quick else README)
        if readme and not args.no_readme:
            rewrite_readme(readme, table)
            print(f"rewrote the target table in {readme}")
        if not args.table_only:
            print(f"wrote {os.path.join(args.out, TARGETS_JSON)} ({report['wall_s']} s)")
        result["targets"] = report
    legacy = [s for s in args.only if s != "targets"]
    if legacy or args.merge_only:
        args.only = legacy
        start = time.perf_counter()
        errors = run_sections(args)
        summary = summarise(args.out, errors, machine(), args.only)
        summary["command"] = args.command
        summary["wall_s"] = round(time.perf_counter() - start, 1)
        _write(os.path.join(args.out, "summary.json"), summary)
        print(markdown(summary))
        result.update(summary)
    return result


if __name__ == "__main__":
    main()
