"""Where the step time of Entropy-SGD and Replicated-SGD goes: timings and an XLA profile.

For one model, the steps the other benchmarks time (built by their own
runners: ``esgd_bench.scan_runner`` / ``stepwise_runner``,
``rsgd_bench.rsgd_runner`` and ``sequential_sgd``) are

(a) timed side by side, every repetition running every case once in an
    order that alternates (``rsgd_bench.interleaved``); a ratio is the median
    of the per-rep ratios candidate_r / baseline_r, with their [min, max]:

    - ``esgd_scan``: one ``entropy_sgd`` outer step (L inner steps, Langevin
      noise on) ÷ L jitted plain SGD steps;
    - ``esgd_stepwise``: L calls of the ``entropy_sgd_stepwise`` step ÷ the
      same L SGD steps;
    - ``rsgd``: one step of y coupled replicas (``replicate``, default
      strategy) ÷ y SGD steps, and ``rsgd_uncoupled``, the same replicated
      step with optax SGD vmapped over the replicas and no coupling ÷ y SGD
      steps (what the y forward/backward passes cost without the coupling);

(b) profiled: every case runs ``--profile-reps`` times under
    ``jax.profiler.trace``; the trace's XLA:CPU thunk events (one per
    executed HLO instruction: fusions, dots, copies) are matched to the
    compiled HLO module (``jit(...).lower(...).compile().as_text()``), whose
    stack frames say which source line each instruction came from. An
    instruction is attributed to the innermost frame among

    ========================  =================================================
    gradient                  the model (flax, ``flatjax.models``) and the loss;
                              also convolutions, pooling windows and scatters
                              that XLA left without a source frame
    noise                     ``flatjax/_esgd/_noise.py`` (the Langevin draw)
    esgd_langevin             ``EntropySGDCore.langevin_step`` (coupling pull,
                              walker and running-average updates)
    esgd_outer                the outer step and the coupling schedule
    esgd_other                the rest of ``flatjax/_esgd`` (stepwise landing)
    rsgd_coupling             ``flatjax/_rsgd`` except ``replica_map``
                              (centre, coupling, replica mean)
    rsgd_replicas             ``replica_map`` (slicing and stacking replicas)
    optax                     optax transforms: momentum, ``apply_updates``
    copies                    HLO ``copy`` instructions, whatever their source
    other                     anything else: instructions XLA made without a
                              source frame (constants, glue), unless their
                              name says ``jvp``/``transpose`` (gradient)
    ========================  =================================================

    A fusion holding a dot or convolution is charged to that instruction's
    category; any other fusion is split among categories in proportion to
    its fused arithmetic instructions (data movement such as slices,
    broadcasts and concatenations counts only when a fusion does nothing
    else). Per category the report gives the thunk time per step
    (summed over threads, so comparable with CPU time, not with wall time)
    and the bytes its instructions read and write per step in units of the
    model's parameter bytes: "passes over the parameters" (a fused
    ``x ← x + a·y`` over all parameters counts 3: two reads, one write).

Usage::

    python -m experiments.benchmarks.profile_bench --model mlp --reps 7 \
        --out experiments/benchmarks/results/profile
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import os
import re
import statistics
import tempfile

import jax

from experiments.benchmarks.esgd_bench import scan_runner, stepwise_runner
from experiments.benchmarks.rsgd_bench import (
    base_optimizer,
    interleaved,
    machine,
    make_problem,
    ratio_row,
    rsgd_runner,
    sequential_sgd,
    uncoupled,
    write_json,
)

__all__ = ["CATEGORIES", "categorise", "parse_hlo", "profile_case", "main"]

CATEGORIES = ("gradient", "noise", "esgd_langevin", "esgd_outer", "esgd_other",
              "rsgd_coupling", "rsgd_replicas", "optax", "copies", "other")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$")
_COMP = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")
_NESTING = {"conditional", "while", "call", "parameter", "constant", "tuple",
            "get-tuple-element", "bitcast"}  # thunks that enclose others, or no work
_MODEL_OPS = {"convolution", "reduce-window", "select-and-scatter", "scatter"}
_HEAVY = {"dot", "convolution", "custom-call"}  # a fusion holding one is charged to it
_MOVES = {"slice", "dynamic-slice", "dynamic-update-slice", "broadcast", "reshape",
          "transpose", "concatenate", "iota", "copy", "convert", "pad", "reverse"}


def _bytes(shape: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(shape):
        total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _split_shape(rest: str) -> tuple[str, str]:
    """(shape, remainder) of the text after ``name = `` in an HLO instruction."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].lstrip()
    shape, _, remainder = rest.partition(" ")
    return shape, remainder


def _operands(call: str) -> tuple[str, list[str], str]:
    """(opcode, operand names, attributes) of ``opcode(%a, %b), attrs``."""
    opcode, _, args = call.partition("(")
    depth, end = 1, len(args)
    for i, ch in enumerate(args):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            end = i
            break
    return opcode, re.findall(r"%([\w.\-]+)", args[:end]), args[end + 1:]


def parse_hlo(text: str) -> dict:
    """Instructions, computations and stack frames of a compiled HLO module's text.

    Returns a dict with ``instrs`` (name -> dict(opcode, bytes_out, operands,
    frame, calls, computation)), ``computations`` (name -> instruction
    names) and ``frames`` (stack frame id -> list of (file, function),
    innermost first).
    """
    section, files, functions, locations, parents = None, {}, {}, {}, {}
    instrs, computations, current = {}, {}, None
    for line in text.splitlines():
        head = line.strip()
        if head in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = head
            continue
        if section and head and head[0].isdigit():
            idx, _, body = head.partition(" ")
            idx = int(idx)
            if section == "FileNames":
                files[idx] = body.strip('"')
            elif section == "FunctionNames":
                functions[idx] = body.strip('"')
            elif section == "FileLocations":
                f = re.search(r"file_name_id=(\d+)", body)
                fn = re.search(r"function_name_id=(\d+)", body)
                locations[idx] = (int(f.group(1)) if f else 0, int(fn.group(1)) if fn else 0)
            else:
                loc = re.search(r"file_location_id=(\d+)", body)
                par = re.search(r"parent_frame_id=(\d+)", body)
                parents[idx] = (int(loc.group(1)) if loc else 0, int(par.group(1)) if par else 0)
            continue
        comp = _COMP.match(line)
        if comp and "=" not in line.split("{")[0].split("(")[0]:
            section, current = None, comp.group(1)
            computations[current] = []
            continue
        m = _INSTR.match(line)
        if not m or current is None:
            continue
        section = None
        name, rest = m.groups()
        shape, call = _split_shape(rest)
        opcode, operands, attrs = _operands(call)
        frame = re.search(r"stack_frame_id=(\d+)", attrs)
        op_name = re.search(r'op_name="([^"]*)"', attrs)
        calls = re.search(r"calls=%([\w.\-]+)", attrs)
        instrs[name] = dict(opcode=opcode, bytes_out=_bytes(shape), operands=operands,
                            frame=int(frame.group(1)) if frame else None,
                            op_name=op_name.group(1) if op_name else "",
                            calls=calls.group(1) if calls else None, computation=current)
        computations[current].append(name)

    frames = {}
    for fid in parents:
        chain, seen, f = [], set(), fid
        while f in parents and f not in seen:
            seen.add(f)
            loc, parent = parents[f]
            file_id, fn_id = locations.get(loc, (0, 0))
            chain.append((files.get(file_id, ""), functions.get(fn_id, "")))
            if parent == f:
                break
            f = parent
        frames[fid] = chain
    return dict(instrs=instrs, computations=computations, frames=frames)


def categorise(chain: list[tuple[str, str]], opcode: str = "") -> str:
    """The category (see the module docstring) of an instruction with this stack."""
    if opcode in ("copy", "copy-start", "copy-done"):
        return "copies"
    if not chain and opcode in _MODEL_OPS:
        return "gradient"  # made by XLA (e.g. a weight-gradient convolution); no optimizer op
    for file, function in chain:
        path = file.replace(os.sep, "/")
        if path.endswith("_esgd/_noise.py"):
            return "noise"
        if path.endswith("_esgd/_core.py"):
            return "esgd_langevin" if function.endswith("langevin_step") else "esgd_outer"
        if "/_esgd/" in path:
            return "esgd_other"
        if path.endswith("_rsgd/_replicas.py"):
            return "rsgd_replicas"
        if "/_rsgd/" in path:
            return "rsgd_coupling"
        if "/flax/" in path or "/flatjax/models/" in path or "/optax/losses/" in path:
            return "gradient"
        if "/optax/" in path:
            return "optax"
        if path.endswith("benchmarks/rsgd_bench.py") and function.endswith("loss"):
            return "gradient"
    return "other"


def _instruction_weights(hlo: dict) -> dict[str, dict[str, float]]:
    """name -> {category: share} for every thunk-level instruction."""
    instrs, frames = hlo["instrs"], hlo["frames"]

    def own(name):
        ins = instrs[name]
        cat = categorise(frames.get(ins["frame"], []), ins["opcode"])
        if cat == "other" and re.search(r"\b(jvp|transpose)\(", ins["op_name"]):
            cat = "gradient"  # no source frame left, but named by autodiff
        return cat

    weights = {}
    for name, ins in instrs.items():
        if ins["opcode"] == "fusion" and ins["calls"] in hlo["computations"]:
            fused = [n for n in hlo["computations"][ins["calls"]]
                     if instrs[n]["opcode"] not in _NESTING]
            heavy = [n for n in fused if instrs[n]["opcode"] in _HEAVY]
            work = [n for n in fused if instrs[n]["opcode"] not in _MOVES]
            counts = collections.Counter(own(n) for n in heavy or work or fused)
            if set(counts) <= {"other"}:
                counts = collections.Counter([own(name)])
            total = sum(counts.values())
            weights[name] = ({k: v / total for k, v in counts.items()} if total
                             else {own(name): 1.0})
        else:
            weights[name] = {own(name): 1.0}
    return weights


def _trace_events(run, n: int, workdir: str) -> list[tuple[str, float]]:
    """(thunk name, seconds) of the XLA:CPU thunks of ``n`` calls of ``run``."""
    with jax.profiler.trace(workdir):
        for _ in range(n):
            run()
    path = sorted(glob.glob(os.path.join(workdir, "**", "*.xplane.pb"), recursive=True))[-1]
    events = []
    for plane in jax.profiler.ProfileData.from_file(path).planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            events.extend((e.name, e.duration_ns * 1e-9) for e in line.events)
    return events


def profile_case(run, jitted, args, param_bytes: int, n: int, workdir: str) -> dict:
    """Per-category thunk seconds and parameter passes per call of ``run``.

    ``jitted(*args)`` is the program ``run`` executes (its HLO is read from
    ``jitted.lower(*args).compile()``); ``run`` may call it several times.
    """
    compiled = jitted.lower(*args).compile()
    hlo = parse_hlo(compiled.as_text())
    weights = _instruction_weights(hlo)
    instrs = hlo["instrs"]
    seconds = collections.Counter()
    passes = collections.Counter()
    unmatched = 0.0
    thunks = 0
    for name, dt in _trace_events(run, n, workdir):
        ins = instrs.get(name)
        if ins is None:
            if not name.startswith(("end:", "Thunk", "Threadpool")):
                unmatched += dt
            continue
        if ins["opcode"] in _NESTING:
            continue
        thunks += 1
        moved = ins["bytes_out"] + sum(instrs[o]["bytes_out"] for o in ins["operands"]
                                       if o in instrs)
        for cat, share in weights[name].items():
            seconds[cat] += share * dt / n
            passes[cat] += share * moved / param_bytes / n
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0]
    return dict(
        thunk_ms={c: round(1e3 * seconds[c], 3) for c in CATEGORIES if seconds[c]},
        param_passes={c: round(passes[c], 1) for c in CATEGORIES if passes[c]},
        thunk_ms_total=round(1e3 * sum(seconds.values()), 3),
        unmatched_ms=round(1e3 * unmatched / n, 3),
        thunks_per_call=round(thunks / n, 1),
        xla_flops=cost.get("flops"), xla_bytes_accessed=cost.get("bytes accessed"),
        xla_transcendentals=cost.get("transcendentals"),
    )


def build_cases(model: str, batch_size: int, inner_steps: int, num_replicas: int) -> dict:
    """name -> (run, jitted, args) for the candidates and their SGD baselines."""
    problem = make_problem(model, batch_size)
    sgd_l, step = sequential_sgd(problem, inner_steps)
    sgd_y, step_y = sequential_sgd(problem, num_replicas)
    opt = base_optimizer()
    one_batch = jax.tree.map(lambda x: x[0], problem.batches(1))
    sgd_args = (problem.params, problem.batch_stats, opt.init(problem.params), one_batch)
    return dict(
        problem=problem,
        cases={
            f"sgd_x{inner_steps}": (sgd_l, step, sgd_args),
            "esgd_scan": scan_runner(problem, inner_steps),
            "esgd_stepwise": stepwise_runner(problem, inner_steps),
            f"sgd_x{num_replicas}": (sgd_y, step_y, sgd_args),
            "rsgd": rsgd_runner(problem, num_replicas, "auto"),
            "rsgd_uncoupled": rsgd_runner(problem, num_replicas, "auto",
                                          optimizer=uncoupled(base_optimizer())),
        },
    )


def _table(profiles: dict[str, dict], key: str) -> str:
    cats = [c for c in CATEGORIES if any(c in p[key] for p in profiles.values())]
    head = "| case | " + " | ".join(cats) + " | total |"
    rows = [head, "|" + "---|" * (len(cats) + 2)]
    for case, p in profiles.items():
        vals = [p[key].get(c, 0.0) for c in cats]
        total = p["thunk_ms_total"] if key == "thunk_ms" else round(sum(vals), 1)
        rows.append(f"| {case} | " + " | ".join(f"{v:g}" for v in vals) + f" | {total:g} |")
    return "\n".join(rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp", choices=["mlp", "lenet5", "mlp_tiny"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7, help="interleaved timing repetitions")
    parser.add_argument("--profile-reps", type=int, default=3, help="calls traced per case")
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--num-replicas", type=int, default=3)
    parser.add_argument("--out", default=None, help="folder for profile_<model>.json")
    args = parser.parse_args(argv)

    built = build_cases(args.model, args.batch_size, args.inner_steps, args.num_replicas)
    cases, problem = built["cases"], built["problem"]
    n_params = sum(x.size for x in jax.tree.leaves(problem.params))
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(problem.params))
    for run, _, _ in cases.values():
        run()  # compile
    runs = {k: v[0] for k, v in cases.items()}
    cpu = {}
    times = interleaved(runs, args.reps, cpu)
    base_l, base_y = f"sgd_x{args.inner_steps}", f"sgd_x{args.num_replicas}"
    rows = []
    for case, base in [("esgd_scan", base_l), ("esgd_stepwise", base_l), ("rsgd", base_y),
                       ("rsgd_uncoupled", base_y)]:
        rows.append(ratio_row(f"profile/{case}", args.model, times[case], times[base],
                              target=None, cpu=(cpu[case], cpu[base]), baseline_case=base,
                              batch_size=args.batch_size))
        print(json.dumps(rows[-1]), flush=True)

    profiles = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (case, (run, jitted, jargs)) in enumerate(cases.items()):
            p = profile_case(run, jitted, jargs, param_bytes, args.profile_reps,
                             os.path.join(tmp, str(i)))
            p["wall_median_ms"] = round(1e3 * statistics.median(times[case]), 3)
            p["cpu_median_ms"] = round(1e3 * statistics.median(cpu[case]), 3)
            profiles[case] = p
    print(f"\n{args.model}: {n_params} parameters ({param_bytes} bytes), batch "
          f"{args.batch_size}; per call of each case (the SGD baselines: all "
          f"{args.inner_steps} or {args.num_replicas} steps)")
    print("\nthunk ms per call, by category (summed over threads):\n")
    print(_table(profiles, "thunk_ms"))
    print("\nparameter passes per call (bytes read + written ÷ parameter bytes):\n")
    print(_table(profiles, "param_passes"))
    print("\nwall and CPU: medians of the timed reps; XLA columns: cost_analysis of one "
          "program call (a baseline runs its program several times)")
    print("\n| case | wall ms | cpu ms | thunk ms | unmatched ms | thunks | XLA flops | "
          "XLA bytes | transcendentals |\n|---|---|---|---|---|---|---|---|---|")
    for case, p in profiles.items():
        print(f"| {case} | {p['wall_median_ms']} | {p['cpu_median_ms']} | "
              f"{p['thunk_ms_total']} | {p['unmatched_ms']} | {p['thunks_per_call']} | "
              f"{p['xla_flops']:.3g} | {p['xla_bytes_accessed']:.3g} | "
              f"{p['xla_transcendentals']:.3g} |")
    report = dict(benchmark="profile", model=args.model, n_params=int(n_params),
                  machine=machine(), rows=rows, profiles=profiles,
                  reps=args.reps, profile_reps=args.profile_reps)
    if args.out:
        write_json(os.path.join(args.out, f"profile_{args.model}.json"), report)
    return report


if __name__ == "__main__":
    main()
