"""Gaussian mixture classification: flat estimators against ERM and Bayes-optimal.

Pittorino et al. 2021, §5, after Baldassi et al., J. Stat. Mech. 2020.
For Δ = 1 and α = P/N on a grid, every estimator is fitted on
P = αN points in dimension N and scored by its EXACT test error
``flatjax.theory.generalization_error`` (no test set). Two cases: balanced
clusters without bias (ρ = ½) and unbalanced clusters with a bias (ρ = ¼).

Estimators (all on the same training set of each seed):
  * Bayes-optimal: Hebbian direction, plug-in bias (``bayes_optimal_classifier``);
  * ERM square / logistic with λ = 0, and max-margin (hinge, λ → 0⁺, only
    where the training set is separable, i.e. where logistic ERM reaches zero
    training error);
  * ERM square / logistic / hinge with λ chosen on a held-out 25 % of the
    training data from RIDGES, then refitted on all of it;
  * ERM square with the oracle λ (chosen on the exact test error; a reference
    curve, labelled as such);
  * rSGD and eSGD (flatjax's optimizers) on the logistic loss without ridge,
    and rSGD on the smoothed error-counting loss (norm-free, τ = 0.5): their
    coupling γ_0 is chosen on the same validation split from COUPLINGS (the
    same number of candidates as the ridge grid), then refitted on all data.

Flatness: the local energy δE(σ) of the training error (and of the logistic
loss) under multiplicative weight noise, in closed form
(``classifier_local_energy``), for every solution; Kendall τ between δE and
ε_g across the solutions at each α.

Run: ``.venv/bin/python -m experiments.gaussian_mixture [--quick]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from flatjax import theory

OUT = pathlib.Path(__file__).resolve().parent / "results" / "gaussian_mixture"

DELTA = 1.0
CASES = {"balanced": {"rho": 0.5, "bias": False}, "unbalanced": {"rho": 0.25, "bias": True}}
RIDGES = (1e-2, 1e-1, 1.0, 10.0)
ORACLE_RIDGES = tuple(np.logspace(-3, 3, 13))
COUPLINGS = (1e-4, 1e-3, 1e-2, 1e-1)  # γ_0; γ grows by COUPLING_FACTOR over the run
COUPLING_FACTOR = 1e3
VALIDATION_FRACTION = 0.25
SIGMAS = (0.1, 0.2, 0.4)
SIGMA_REPORTED = 0.2


def get_config(quick: bool) -> dict:
    if quick:
        return {"dim": 100, "alphas": (0.5, 2.0), "seeds": 2, "num_steps": 100}
    return {
        "dim": 500,
        "alphas": (0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0),
        "seeds": 3,
        "num_steps": 400,
    }


def flat_estimators(num_steps: int) -> dict:
    """The flatness-maximising estimators; each takes (key, x, y, coupling=, bias=, num_points=)."""
    common = {"num_steps": num_steps, "batch_size": 64, "coupling_factor": COUPLING_FACTOR}
    rsgd = functools.partial(theory.replicated_sgd_fit, num_replicas=5, **common)
    esgd = functools.partial(theory.entropy_sgd_fit, inner_steps=5, inner_learning_rate=0.1,
                             **common)
    return {
        "rSGD logistic": functools.partial(rsgd, loss="logistic", learning_rate=0.1),
        "eSGD logistic": functools.partial(esgd, loss="logistic", learning_rate=1.0),
        "rSGD smoothed error": functools.partial(rsgd, loss="error", temperature=0.5,
                                                 learning_rate=0.02),
    }


def make_problem(dim: int, alpha_index: int, alpha: float, seed: int, rho: float):
    key = jax.random.fold_in(jax.random.key(seed), alpha_index)
    k_data, k_split, k_fit = jax.random.split(key, 3)
    data = theory.gaussian_mixture(k_data, dim, alpha, delta=DELTA, rho=rho)
    fit, val = theory.train_validation_split(k_split, data.x.shape[0], VALIDATION_FRACTION)
    x, y = np.asarray(data.x), np.asarray(data.y)
    return {"x": x, "y": y, "v": data.v, "fit": fit, "val": val, "key": k_fit}


def err(x, y, w, b) -> float:
    return float(theory.training_error(w, b, x, y))


def erm_solutions(prob, rho: float, bias: bool) -> dict:
    """All non-iterative-flat estimators of one training set: name -> (w, b, info)."""
    x, y, fit, val = prob["x"], prob["y"], prob["fit"], prob["val"]
    out = {}
    w, b = theory.bayes_optimal_classifier(x, y, delta=DELTA, rho=rho)
    out["Bayes-optimal (Hebbian)"] = (w, b, {})
    for loss in ("square", "logistic"):
        w, b = theory.erm(x, y, loss=loss, ridge=0.0, bias=bias)
        out[f"ERM {loss}"] = (w, b, {})
    if err(x, y, *out["ERM logistic"][:2]) == 0.0:
        try:
            w, b = theory.max_margin(x, y, bias=bias)
            out["max-margin"] = (w, b, {})
        except ValueError:  # liblinear did not certify separability
            pass
    for loss in ("square", "logistic", "hinge"):
        scores = []
        for lam in RIDGES:
            w, b = theory.erm(x[fit], y[fit], loss=loss, ridge=lam, bias=bias)
            scores.append(err(x[val], y[val], w, b))
        lam = RIDGES[int(np.argmin(scores))]
        w, b = theory.erm(x, y, loss=loss, ridge=lam, bias=bias)
        out[f"ERM {loss} + ridge (val.)"] = (w, b, {"ridge": lam})
    best = None
    for lam in ORACLE_RIDGES:
        w, b = theory.erm(x, y, loss="square", ridge=float(lam), bias=bias)
        e = float(theory.generalization_error(w, b, prob["v"], delta=DELTA, rho=rho))
        if best is None or e < best[0]:
            best = (e, w, b, float(lam))
    out["ERM square + ridge (oracle)"] = (best[1], best[2], {"ridge": best[3]})
    return out


def flat_solutions(problems, estimators, bias: bool, log) -> dict:
    """problems[alpha_index][seed] -> {name: (w, b, info)} for the flat estimators.

    Every candidate γ_0 is run on the fit split and on all the data, for all
    seeds of one α in one vmapped call; data are padded to the largest P so
    that one compilation per (estimator, γ_0) serves every α.
    """
    p_max = max(p["x"].shape[0] for row in problems for p in row)
    results = [[{} for _ in row] for row in problems]
    for name, est in estimators.items():
        runs = {}
        for g0 in COUPLINGS:
            fit = functools.partial(est, coupling=g0, bias=bias)
            fn = jax.jit(jax.vmap(lambda k, x, y, n, fit=fit: fit(k, x, y, num_points=n)))
            for ai, row in enumerate(problems):
                xs, ys, ns, ks = [], [], [], []
                for p in row:
                    order = np.concatenate([p["fit"], p["val"]])
                    x = np.zeros((p_max, p["x"].shape[1]), np.float32)
                    y = np.zeros(p_max, np.float32)
                    x[: len(order)], y[: len(order)] = p["x"][order], p["y"][order]
                    for n, k in ((len(p["fit"]), jax.random.fold_in(p["key"], 0)),
                                 (len(order), jax.random.fold_in(p["key"], 1))):
                        xs.append(x), ys.append(y), ns.append(n), ks.append(k)
                ws, bs = fn(jnp.stack(ks), jnp.asarray(np.stack(xs)), jnp.asarray(np.stack(ys)),
                            jnp.asarray(ns))
                runs[(g0, ai)] = (np.asarray(ws), np.asarray(bs))
            log(f"  {name}: γ0={g0:g} done")
        for ai, row in enumerate(problems):
            for si, p in enumerate(row):
                x, y = p["x"], p["y"]
                scores = [err(x[p["val"]], y[p["val"]], runs[(g0, ai)][0][2 * si],
                              runs[(g0, ai)][1][2 * si]) for g0 in COUPLINGS]
                g0 = COUPLINGS[int(np.argmin(scores))]
                ws, bs = runs[(g0, ai)]
                results[ai][si][name] = (ws[2 * si + 1], bs[2 * si + 1], {"coupling": g0})
    return results


def measure(prob, w, b, rho: float) -> dict:
    w, b = jnp.asarray(w), jnp.asarray(b)
    x, y = prob["x"], prob["y"]
    finite = bool(jnp.all(jnp.isfinite(w))) and bool(jnp.isfinite(b))
    eg = float(theory.generalization_error(w, b, prob["v"], delta=DELTA, rho=rho))
    row = {"eps_g": eg if finite else float("nan"), "train_error": err(x, y, w, b),
           "norm": float(jnp.linalg.norm(w)), "bias": float(b)}
    if finite:
        row["local_energy_error"] = [float(e) for e in theory.classifier_local_energy(
            w, b, x, y, SIGMAS, energy="error")]
        row["local_energy_logistic"] = [float(e) for e in theory.classifier_local_energy(
            w, b, x, y, SIGMAS, energy="logistic")]
    return row


def run_case(case: str, cfg: dict, log) -> dict:
    rho, bias = CASES[case]["rho"], CASES[case]["bias"]
    problems = [[make_problem(cfg["dim"], ai, a, s, rho) for s in range(cfg["seeds"])]
                for ai, a in enumerate(cfg["alphas"])]
    log(f"[{case}] flat estimators")
    flat = flat_solutions(problems, flat_estimators(cfg["num_steps"]), bias, log)
    records = []
    for ai, alpha in enumerate(cfg["alphas"]):
        for si, p in enumerate(problems[ai]):
            sols = {**erm_solutions(p, rho, bias), **flat[ai][si]}
            for name, (w, b, info) in sols.items():
                records.append({"case": case, "alpha": alpha, "seed": si, "estimator": name,
                                **info, **measure(p, w, b, rho)})
        log(f"[{case}] α={alpha:g} done")
    return {"rho": rho, "bias": bias, "records": records,
            "bayes_optimal": {str(a): theory.bayes_optimal_error(a, DELTA, rho)
                              for a in cfg["alphas"]}}


def summarise(results: dict, cfg: dict) -> dict:
    """Mean ± standard error of ε_g per (case, α, estimator); Kendall τ per (case, α)."""
    k = SIGMAS.index(SIGMA_REPORTED)
    out = {}
    for case, res in results.items():
        recs = res["records"]
        names = list(dict.fromkeys(r["estimator"] for r in recs))
        table, taus = {}, {}
        for a in cfg["alphas"]:
            for n in names:
                e = np.array([r["eps_g"] for r in recs if r["alpha"] == a and r["estimator"] == n])
                e = e[np.isfinite(e)]
                if len(e):
                    sem = e.std(ddof=1) / np.sqrt(len(e)) if len(e) > 1 else float("nan")
                    table[(a, n)] = (float(e.mean()), float(sem), len(e))
            pts = [(r["local_energy_error"][k], r["eps_g"]) for r in recs
                   if r["alpha"] == a and "local_energy_error" in r]
            le, eg = np.array(pts).T
            tau, pval = stats.kendalltau(le, eg)
            pts_l = [(r["local_energy_logistic"][k], r["eps_g"]) for r in recs
                     if r["alpha"] == a and "local_energy_logistic" in r]
            tau_l, pval_l = stats.kendalltau(*np.array(pts_l).T)
            taus[a] = {
                "error": (float(tau), float(pval)),
                "logistic": (float(tau_l), float(pval_l)),
            }
        out[case] = {"names": names, "table": table, "taus": taus}
    return out


def write_markdown(summary, results, cfg, runs, path):
    lines = ["# Gaussian mixture classification: ε_g of each estimator against ε_BO", ""]
    lines += [f"Command: `.venv/bin/{command}` (under `nice -n 10`), wall time {wall:.0f} s "
              "(2 CPU cores shared with other jobs).  " for command, wall in runs]
    lines += [
        f"N = {cfg['dim']}, Δ = {DELTA}, seeds = {cfg['seeds']}, α ∈ {list(cfg['alphas'])}; "
        f"flat estimators: {cfg['num_steps']} steps × 5 minibatch gradients (batch 64).  ",
        "ε_g is the exact test error (formula); entries are mean ± standard error over seeds. "
        "ε_BO is the N → ∞ Bayes-optimal error. Ridge λ and coupling γ_0 are chosen on a "
        f"held-out {VALIDATION_FRACTION:.0%} of the training data (grids {list(RIDGES)} and "
        f"{list(COUPLINGS)}, γ grows ×{COUPLING_FACTOR:g}); '(oracle)' picks λ on the test "
        "error and is a reference only. max-margin only where the training set is separable.",
        "",
    ]
    k = SIGMAS.index(SIGMA_REPORTED)
    for case, s in summary.items():
        res = results[case]
        lines += [f"## {case} (ρ = {res['rho']}, bias = {res['bias']})", ""]
        lines.append("| α | ε_BO | " + " | ".join(s["names"]) + " |")
        lines.append("|---" * (len(s["names"]) + 2) + "|")
        for a in cfg["alphas"]:
            cells = []
            for n in s["names"]:
                if (a, n) in s["table"]:
                    m, e, c = s["table"][(a, n)]
                    cell = f"{m:.3f} ± {e:.3f}" if c > 1 else f"{m:.3f}"
                    cells.append(cell + ("" if c == cfg["seeds"] else f" ({c} seed(s))"))
                else:
                    cells.append("n/a")
            bo = res["bayes_optimal"][str(a)]
            lines.append(f"| {a:g} | {bo:.3f} | " + " | ".join(cells) + " |")
        lines += ["", f"Kendall τ between local energy δE(σ = {SIGMA_REPORTED}) and ε_g "
                  "across all solutions at each α (p-value):", "",
                  "| α | τ (training error) | τ (logistic loss) |", "|---|---|---|"]
        for a in cfg["alphas"]:
            (t, p), (tl, pl) = s["taus"][a]["error"], s["taus"][a]["logistic"]
            lines.append(f"| {a:g} | {t:+.2f} ({p:.1e}) | {tl:+.2f} ({pl:.1e}) |")
        mean_tau = np.mean([s["taus"][a]["error"][0] for a in cfg["alphas"]])
        lines += ["", f"Mean τ (training error) over α: {mean_tau:+.2f}", ""]
        recs = res["records"]
        chosen = {}
        for r in recs:
            for key in ("ridge", "coupling"):
                if key in r:
                    chosen.setdefault(r["estimator"], []).append(r[key])
        lines.append("Chosen hyperparameters (all α and seeds): " + "; ".join(
            f"{n}: {sorted(set(v))}" for n, v in chosen.items()))
        lines += ["", f"Local energy index: σ = {SIGMAS[k]} (multiplicative noise).", ""]
    path.write_text("\n".join(lines))


def plot(summary, results, cfg, out: pathlib.Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = "osD^v<>phX*P"
    cases = list(summary)
    fig, axes = plt.subplots(2, len(cases), figsize=(6.5 * len(cases), 8), squeeze=False)
    fine = np.geomspace(min(cfg["alphas"]), max(cfg["alphas"]), 200)
    for j, case in enumerate(cases):
        s, res = summary[case], results[case]
        bo = np.array([theory.bayes_optimal_error(a, DELTA, res["rho"]) for a in fine])
        axes[0, j].plot(fine, bo, "k-", lw=2, label="ε_BO (N → ∞)")
        axes[1, j].axhline(0.0, color="k", lw=2)
        for i, n in enumerate(s["names"]):
            pts = [(a, *s["table"][(a, n)][:2]) for a in cfg["alphas"] if (a, n) in s["table"]]
            a, m, e = np.array(pts).T
            base = np.array([theory.bayes_optimal_error(x, DELTA, res["rho"]) for x in a])
            flat = "SGD" in n
            style = {"marker": markers[i % len(markers)], "ms": 5 if flat else 4, "capsize": 2,
                     "lw": 2 if flat else 1, "color": plt.get_cmap("tab20")(i % 20),
                     "ls": "--" if "oracle" in n else "-", "label": n}
            axes[0, j].errorbar(a, m, yerr=e, **style)
            axes[1, j].errorbar(a, m - base, yerr=e, **style)
        axes[0, j].set(xscale="log", xlabel="α = P/N", ylabel="ε_g",
                       title=f"{case}: ρ = {res['rho']}, Δ = {DELTA}, N = {cfg['dim']}")
        axes[1, j].set(xscale="log", xlabel="α = P/N", ylabel="ε_g − ε_BO")
        axes[1, j].set_yscale("symlog", linthresh=0.005)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "error_vs_alpha.png", dpi=80)
    plt.close(fig)

    k = SIGMAS.index(SIGMA_REPORTED)
    fig, axes = plt.subplots(1, len(cases), figsize=(6.5 * len(cases), 4.5), squeeze=False)
    for j, case in enumerate(cases):
        s, res = summary[case], results[case]
        for i, n in enumerate(s["names"]):
            pts = [(r["local_energy_error"][k],
                    r["eps_g"] - res["bayes_optimal"][str(r["alpha"])])
                   for r in res["records"] if r["estimator"] == n and "local_energy_error" in r]
            le, ex = np.array(pts).T
            axes[0, j].scatter(le, ex, s=12, marker=markers[i % len(markers)], label=n,
                               color=plt.get_cmap("tab20")(i % 20))
        mean_tau = np.mean([s["taus"][a]["error"][0] for a in cfg["alphas"]])
        axes[0, j].set(xlabel=f"local energy δE_train-error(σ = {SIGMA_REPORTED})",
                       ylabel="ε_g − ε_BO(α)",
                       title=f"{case}: mean Kendall τ within α = {mean_tau:+.2f}")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "flatness_vs_error.png", dpi=80)
    plt.close(fig)


def report(out: pathlib.Path) -> bool:
    """Writes results.md, results.json and the figures from the raw_<case>.json present.

    Returns False (and writes nothing) until every case has its raw file.
    """
    raws = {case: out / f"raw_{case}.json" for case in CASES}
    if not all(p.exists() for p in raws.values()):
        return False
    loaded = {case: json.loads(p.read_text()) for case, p in raws.items()}
    cfg = next(iter(loaded.values()))["config"]
    cfg["alphas"] = tuple(cfg["alphas"])
    results = {case: raw["result"] for case, raw in loaded.items()}
    summary = summarise(results, cfg)
    runs = [(raw["command"], raw["wall_seconds"]) for raw in loaded.values()]
    write_markdown(summary, results, cfg, runs, out / "results.md")
    plot(summary, results, cfg, out)
    (out / "results.json").write_text(json.dumps(
        {"config": cfg, "runs": runs, "results": results}, indent=1))
    return True


def fixed_norm_sweep(args, out, command):
    """Fixed-norm square loss (R sweep) and fixed-overlap replicas vs the plug-in Bayes rule.

    Every estimator is paired with the plug-in Bayes rule (Hebbian direction,
    plug-in threshold) on the same data; the table gives mean ε_g ± standard
    error and the paired difference ± standard error over seeds.
    """
    start = time.time()
    rows = []
    for alpha in args.alphas:
        per = {}
        for seed in range(args.seeds):
            key = jax.random.PRNGKey(1000 * seed + int(10 * alpha))
            data = theory.gaussian_mixture(key, args.dim, alpha, delta=args.delta, rho=args.rho)
            x, y, v = np.asarray(data.x), np.asarray(data.y), data.v
            bias = args.rho != 0.5
            def eg(w, b):
                return float(theory.generalization_error(w, b, v, delta=args.delta, rho=args.rho))

            plugin = theory.bayes_optimal_classifier(x, y, delta=args.delta, rho=args.rho)
            res = {"bayes_plugin": eg(*plugin)}
            for r in args.radii:
                res[f"fixed_norm_R{r:g}"] = eg(*theory.fixed_norm_mse(x, y, r, bias=bias))
            for q in args.overlaps:
                res[f"replicated_R{args.rep_radius:g}_q{q:g}_y{args.replicas}"] = eg(
                    *theory.fixed_distance_replicated_mse(
                        x, y, args.rep_radius, q, num_replicas=args.replicas,
                        num_steps=args.steps, bias=bias, seed=seed))
            for k, e in res.items():
                per.setdefault(k, []).append(e)
        ref = np.array(per["bayes_plugin"])
        for k, es in per.items():
            es = np.array(es)
            d = es - ref
            se = lambda a: float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else float("nan")
            rows.append({"alpha": alpha, "estimator": k, "eg": float(es.mean()), "eg_se": se(es),
                         "diff_vs_bayes_plugin": float(d.mean()), "diff_se": se(d)})
        print(f"[{time.time() - start:5.0f}s] alpha={alpha}", flush=True)
    bo = {str(a): theory.bayes_optimal_error(a, args.delta, args.rho) for a in args.alphas}
    tag = f"fixed_norm_rho{args.rho:g}"
    (out / f"{tag}.json").write_text(json.dumps(
        {"command": command, "wall_seconds": time.time() - start, "dim": args.dim,
         "seeds": args.seeds, "delta": args.delta, "rho": args.rho, "bayes_optimal": bo,
         "rows": rows}, indent=1))
    lines = [f"# Fixed-norm square loss, ρ = {args.rho:g}, Δ = {args.delta:g}, N = {args.dim}, "
             f"{args.seeds} seeds", "", f"`{command}` ({time.time() - start:.0f} s)", "",
             "| α | ε_BO (N→∞) | estimator | ε_g ± se | ε_g − plug-in Bayes ± se |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['alpha']:g} | {bo[str(r['alpha'])]:.4f} | {r['estimator']} | "
                     f"{r['eg']:.4f} ± {r['eg_se']:.4f} | "
                     f"{r['diff_vs_bayes_plugin']:+.4f} ± {r['diff_se']:.4f} |")
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--fixed-norm", action="store_true",
                        help="run only the fixed-norm square-loss / fixed-overlap replica sweep")
    parser.add_argument("--dim", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--delta", type=float, default=DELTA)
    parser.add_argument("--rho", type=float, default=0.5)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--radii", type=float, nargs="+", default=[0.1, 0.5, 1.0, 2.0, 5.0])
    parser.add_argument("--rep-radius", type=float, default=1.0)
    parser.add_argument("--overlaps", type=float, nargs="+", default=[0.9, 0.5, 0.2])
    parser.add_argument("--replicas", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--case", choices=[*CASES, "all"], default="all",
                        help="run one case (two processes can share the work)")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    cfg = get_config(args.quick)
    out = args.out or (OUT / "quick" if args.quick else OUT)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m experiments.gaussian_mixture", *map(shlex.quote, sys.argv[1:])])
    if args.fixed_norm:
        fixed_norm_sweep(args, out, command)
        return
    cases = list(CASES) if args.case == "all" else [args.case]
    for case in cases:
        start = time.time()
        log = lambda msg, start=start: print(f"[{time.time() - start:6.0f}s] {msg}", flush=True)
        result = run_case(case, cfg, log)
        (out / f"raw_{case}.json").write_text(json.dumps(
            {"config": {**cfg, "delta": DELTA, "ridges": RIDGES, "couplings": COUPLINGS,
                        "coupling_factor": COUPLING_FACTOR, "sigmas": SIGMAS,
                        "validation_fraction": VALIDATION_FRACTION},
             "command": command, "wall_seconds": time.time() - start, "result": result}))
        log(f"wrote raw_{case}.json")
    if report(out):
        print(f"wrote {out / 'results.md'}", flush=True)


if __name__ == "__main__":
    main()
