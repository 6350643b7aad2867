"""Gaussian mixture classification: flat estimators against ERM and Bayes-optimal.

Pittorino et al. 2021, §5, after Baldassi, Malatesta, Negri, Zecchina,
J. Stat. Mech. 2020 (arXiv 2010.14761). Every estimator is fitted on
P = αN points in dimension N and scored by its EXACT test error
``flatjax.theory.generalization_error`` (no test set). Balanced clusters
(ρ = ½) are fitted without bias, unbalanced ones (ρ ≠ ½) with a bias.

Three runs (Δ, ρ, N, the α grid and the seeds are options):

* default, the paired study: on each training set, the Bayes plug-in
  (Hebbian direction, plug-in threshold), ERM square / logistic / hinge at
  λ = 0 and with λ chosen on a held-out 25 % (with ρ ≠ ½ also with the bias
  refitted apart, ``fit_bias`` on the held-out part), the fixed-norm square
  loss and its fixed-distance replicas, and the error-counting flat
  estimators: the shell centre of least local energy at overlap q
  (``fixed_distance_error_fit``, infinitely many replicas) and the replicated
  scheme with y optimised replicas (``fixed_distance_replicated_error``), with
  the controls y, run length and distance. For every solution, the local energy
  δE(σ) of the training error under w → w + σ‖w‖/√N z (closed form), and along
  the paths from ERM solutions to the Bayes direction. Writes study_rho<ρ>.*;
* ``--fixed-norm``: the fixed-norm square loss over R and fixed-overlap
  replicas against the plug-in rule (fixed_norm_rho<ρ>.*);
* ``--sgd``: rSGD / eSGD on the linear model with γ_0 validated, N = 500
  (results.md, raw_<case>.json; about 70 min).

Run: ``.venv/bin/python -m experiments.gaussian_mixture --rho 0.25 --seeds 16``.
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


# ----------------------------------------------------------------------------
# Paired study: every estimator on the same training sets, against ε_BO.

STUDY_RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
SIGMA_GRID = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
PATH_TS = (0.0, 0.25, 0.5, 0.75, 1.0)
PATH_SOURCES = ("ERM square λ=0", "ERM logistic λ=0", "ERM hinge λ→0", "ERM square ridge (val.)")
REFERENCE = "Bayes plug-in (Hebbian)"


def _unit_pair(w, b):
    w, b = np.asarray(w, np.float64), float(b)
    n = np.linalg.norm(w)
    return w / n, b / n


def study_solutions(prob, args, bias: bool) -> dict:
    """name -> (w, b, info) for every estimator of one training set."""
    x, y, fit, val, key = prob["x"], prob["y"], prob["fit"], prob["val"], prob["key"]
    out = {REFERENCE: (*theory.bayes_optimal_classifier(x, y, delta=args.delta, rho=args.rho), {})}
    if bias:
        w = theory.hebbian(x, y)
        out["Hebbian + held-out bias"] = (
            w, theory.held_out_bias(w, x, y, fit, val, theory.hebbian), {})
    for loss, name in (("square", "ERM square λ=0"), ("logistic", "ERM logistic λ=0"),
                       ("hinge", "ERM hinge λ→0")):
        out[name] = (*theory.erm(x, y, loss=loss, ridge=0.0, bias=bias), {})
    for loss in ("square", "logistic", "hinge"):
        w, b, lam = theory.select_ridge(key, x, y, loss=loss, ridges=STUDY_RIDGES, bias=bias,
                                        validation_fraction=VALIDATION_FRACTION)
        out[f"ERM {loss} ridge (val.)"] = (w, b, {"ridge": lam})
        if bias:
            b2 = theory.held_out_bias(w, x, y, fit, val, lambda xf, yf, loss=loss, lam=lam:
                                      theory.erm(xf, yf, loss=loss, ridge=lam, bias=True)[0])
            out[f"ERM {loss} ridge (val.) + held-out bias"] = (w, b2, {"ridge": lam})
    for r in args.radii:
        out[f"fixed-norm MSE R={r:g}"] = (*theory.fixed_norm_mse(x, y, r, bias=bias), {})
    for q in args.overlaps:
        out[f"replicated MSE R={args.rep_radius:g} q={q:g} y={args.replicas}"] = (
            *theory.fixed_distance_replicated_mse(x, y, args.rep_radius, q,
                                                  num_replicas=args.replicas, bias=bias,
                                                  num_steps=args.steps, seed=prob["seed"]), {})
    k_shell, k_rep = jax.random.split(jax.random.fold_in(key, 7))
    for q in args.shell_overlaps:
        shell = lambda xf, yf, q=q, n=args.fit_steps: theory.fixed_distance_error_fit(
            k_shell, xf, yf, q, bias=bias, num_steps=n)
        w, b = shell(x, y)
        out[f"shell q={q:g} (y=∞)"] = (w, b, {})
        if bias:
            out[f"shell q={q:g} (y=∞) + held-out bias"] = (
                w, theory.held_out_bias(w, x, y, fit, val, lambda xf, yf: shell(xf, yf)[0]), {})
    for n in args.run_lengths:
        q = args.shell_overlaps[len(args.shell_overlaps) // 2]
        out[f"shell q={q:g} (y=∞) T={n}"] = (*theory.fixed_distance_error_fit(
            k_shell, x, y, q, bias=bias, num_steps=n), {})
    for q in args.rep_overlaps:
        for y_rep in args.rep_replicas:
            out[f"replicated error q={q:g} y={y_rep}"] = (*theory.fixed_distance_replicated_error(
                k_rep, x, y, q, num_replicas=y_rep, temperature=args.temperature, bias=bias,
                num_steps=args.fit_steps), {})
    q, y_rep = args.rep_overlaps[len(args.rep_overlaps) // 2], args.rep_replicas[0]
    for n in args.run_lengths:
        out[f"replicated error q={q:g} y={y_rep} T={n}"] = (
            *theory.fixed_distance_replicated_error(k_rep, x, y, q, num_replicas=y_rep,
                                                    temperature=args.temperature, bias=bias,
                                                    num_steps=n), {})
    return out


def study_measure(prob, w, b, args) -> dict:
    x, y = prob["x"], prob["y"]
    w = jnp.asarray(w, jnp.float32)
    b = jnp.asarray(b, jnp.float32)
    if not (bool(jnp.all(jnp.isfinite(w))) and bool(jnp.isfinite(b))):
        return {"eps_g": float("nan")}
    return {
        "eps_g": float(theory.generalization_error(w, b, prob["v"], delta=args.delta,
                                                   rho=args.rho)),
        "train_error": err(x, y, w, b),
        "delta_e": [float(e) for e in theory.classifier_local_energy(
            w, b, x, y, SIGMA_GRID, energy="error", noise="relative")],
    }


def paired_study(args, out, command):
    """All estimators paired on the same data; local energies; ERM → Bayes interpolation paths."""
    start = time.time()
    bias = args.rho != 0.5
    records, paths = [], []
    for ai, alpha in enumerate(args.alphas):
        for seed in range(args.seeds):
            key = jax.random.fold_in(jax.random.key(seed), ai)
            k_data, k_split = jax.random.split(key)
            data = theory.gaussian_mixture(k_data, args.dim, alpha, delta=args.delta, rho=args.rho)
            x, y = np.asarray(data.x), np.asarray(data.y)
            fit, val = theory.train_validation_split(k_split, x.shape[0], VALIDATION_FRACTION)
            prob = {"x": x, "y": y, "v": data.v, "fit": fit, "val": val, "key": k_split,
                    "seed": seed}
            sols = study_solutions(prob, args, bias)
            for name, (w, b, info) in sols.items():
                records.append({"alpha": alpha, "seed": seed, "estimator": name, **info,
                                **study_measure(prob, w, b, args)})
            w1, b1 = _unit_pair(*sols[REFERENCE][:2])
            for src in PATH_SOURCES:
                w0, b0 = _unit_pair(*sols[src][:2])
                for t in PATH_TS:
                    paths.append({"alpha": alpha, "seed": seed, "source": src, "t": t,
                                  **study_measure(prob, (1 - t) * w0 + t * w1,
                                                  (1 - t) * b0 + t * b1, args)})
        print(f"[{time.time() - start:5.0f}s] alpha={alpha}", flush=True)
    bo = {str(a): theory.bayes_optimal_error(a, args.delta, args.rho) for a in args.alphas}
    config = {"dim": args.dim, "seeds": args.seeds, "delta": args.delta, "rho": args.rho,
              "bias": bias, "alphas": list(args.alphas), "ridges": STUDY_RIDGES,
              "sigmas": SIGMA_GRID, "path_ts": PATH_TS, "steps": args.steps,
              "fit_steps": args.fit_steps,
              "temperature": args.temperature, "validation_fraction": VALIDATION_FRACTION}
    result = {"command": command, "wall_seconds": time.time() - start, "config": config,
              "bayes_optimal": bo, "records": records, "paths": paths}
    tag = f"study_rho{args.rho:g}"
    (out / f"{tag}.json").write_text(json.dumps(_rounded(result), separators=(",", ":")))
    (out / f"{tag}.md").write_text(study_markdown(result))
    study_plots(result, out / f"{tag}.png")
    print(f"wrote {out / tag}.md ({time.time() - start:.0f} s)", flush=True)


def _rounded(obj, digits: int = 6):
    """obj with every float rounded to ``digits`` decimals (a smaller JSON file)."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_rounded(v, digits) for v in obj]
    return obj


def _mean_se(a):
    a = np.asarray(a, np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else float("nan")


def _paired(records, alpha, name, ref=REFERENCE, key="eps_g"):
    """Per-seed values of ``name`` and their differences from ``ref`` on the same seed."""
    by = {(r["seed"], r["estimator"]): r for r in records if r["alpha"] == alpha}
    seeds = sorted({s for s, n in by if n == name})
    vals = np.array([by[(s, name)][key] for s in seeds])
    diffs = np.array([by[(s, name)][key] - by[(s, ref)][key] for s in seeds])
    return vals, diffs


def study_summary(result) -> dict:
    """Tables: ε_g and paired differences; flatness ranks and correlations; paths."""
    recs, cfg = result["records"], result["config"]
    names = list(dict.fromkeys(r["estimator"] for r in recs))
    table = []
    for a in cfg["alphas"]:
        bo = result["bayes_optimal"][str(a)]
        for n in names:
            vals, diffs = _paired(recs, a, n)
            le = [r["delta_e"][SIGMA_GRID.index(0.5)] for r in recs
                  if r["alpha"] == a and r["estimator"] == n and "delta_e" in r]
            noisy = [r["train_error"] + r["delta_e"][SIGMA_GRID.index(0.5)] for r in recs
                     if r["alpha"] == a and r["estimator"] == n and "delta_e" in r]
            table.append({"alpha": a, "estimator": n, "eg": _mean_se(vals),
                          "vs_plugin": _mean_se(diffs), "vs_bo": _mean_se(vals - bo),
                          "delta_e_0.5": _mean_se(le), "noisy_0.5": _mean_se(noisy),
                          "train": _mean_se([r.get("train_error", np.nan) for r in recs
                                             if r["alpha"] == a and r["estimator"] == n])})
    flat = []
    for a in cfg["alphas"]:
        for k, s in enumerate(SIGMA_GRID):
            ranks, noisy_ranks, fit_ranks, taus, best = [], [], [], [], []
            for seed in range(cfg["seeds"]):
                rs = [r for r in recs if r["alpha"] == a and r["seed"] == seed and "delta_e" in r]
                le = np.array([r["delta_e"][k] for r in rs])
                noisy = le + np.array([r["train_error"] for r in rs])
                eg = np.array([r["eps_g"] for r in rs])
                i_ref = [r["estimator"] for r in rs].index(REFERENCE)
                ranks.append(1 + int(np.sum(le < le[i_ref] - 1e-12)))
                fits = np.array([r["train_error"] for r in rs]) <= rs[i_ref]["train_error"]
                fit_ranks.append((1 + int(np.sum(le[fits] < le[i_ref] - 1e-12)), int(fits.sum())))
                noisy_ranks.append(1 + int(np.sum(noisy < noisy[i_ref] - 1e-12)))
                taus.append(stats.kendalltau(le, eg)[0])
                best.append(rs[int(np.argmin(le))]["estimator"])
            top = max(set(best), key=best.count)
            flat.append({"alpha": a, "sigma": s, "rank": _mean_se(ranks), "n": len(rs),
                         "noisy_rank": _mean_se(noisy_ranks),
                         "fit_rank": _mean_se([r for r, _ in fit_ranks]),
                         "fit_n": float(np.mean([n for _, n in fit_ranks])),
                         "tau": _mean_se(taus), "flattest": top,
                         "flattest_share": best.count(top) / len(best)})
    path_rows = []
    for a in cfg["alphas"]:
        for src in PATH_SOURCES:
            ps = [p for p in result["paths"] if p["alpha"] == a and p["source"] == src]
            row = {"alpha": a, "source": src}
            for k, s in enumerate(SIGMA_GRID):
                curves = np.array([[p["delta_e"][k] for p in ps if p["seed"] == seed]
                                   for seed in range(cfg["seeds"])])
                row[f"delta_e_{s:g}"] = [_mean_se(c) for c in curves.T]
                row[f"monotone_{s:g}"] = float(np.mean(np.all(np.diff(curves, axis=1) <= 1e-9,
                                                              axis=1)))
            eg = np.array([[p["eps_g"] for p in ps if p["seed"] == seed]
                           for seed in range(cfg["seeds"])])
            row["eps_g"] = [_mean_se(c) for c in eg.T]
            path_rows.append(row)
    return {"table": table, "flat": flat, "paths": path_rows}


def study_markdown(result) -> str:
    cfg, s = result["config"], study_summary(result)
    f = lambda m: f"{m[0]:.4f} ± {m[1]:.4f}"
    fs = lambda m: f"{m[0]:+.4f} ± {m[1]:.4f}"
    lines = [f"# Paired study, ρ = {cfg['rho']:g} (bias fitted: {cfg['bias']}), Δ = "
             f"{cfg['delta']:g}, N = {cfg['dim']}, {cfg['seeds']} seeds", "",
             f"`{result['command']}` ({result['wall_seconds']:.0f} s)", "",
             "ε_g: exact test error; differences are paired (same training set) and given as "
             "mean ± one standard error over seeds. 'vs plug-in' is ε_g − ε_g(Bayes plug-in "
             "(Hebbian)) on the same data; 'vs ε_BO' is ε_g − ε_BO(α) (N → ∞). δE(0.5): local "
             "energy of the training error under w → w + σ‖w‖/√N z (b fixed) at σ = 0.5. "
             f"Ridge λ chosen on a held-out {VALIDATION_FRACTION:.0%} from "
             f"{list(STUDY_RIDGES)}; 'held-out bias': the two-Gaussian threshold (fit_bias) of "
             "the direction fitted on the other 75 %, measured on the held-out 25 %.", "",
             "E(0.5) = train error + δE(0.5), the mean training error of the perturbed "
             "classifiers.", "",
             "| α | ε_BO | estimator | ε_g | vs plug-in | vs ε_BO | δE(0.5) | E(0.5) | train err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in s["table"]:
        lines.append(f"| {r['alpha']:g} | {result['bayes_optimal'][str(r['alpha'])]:.4f} | "
                     f"{r['estimator']} | {f(r['eg'])} | {fs(r['vs_plugin'])} | "
                     f"{fs(r['vs_bo'])} | {f(r['delta_e_0.5'])} | {r['noisy_0.5'][0]:.4f} | "
                     f"{r['train'][0]:.3f} |")
    lines += ["", "## Flatness: is the Bayes plug-in the flattest solution?", "",
              "Rank of the Bayes plug-in's δE(σ) among all the solutions of one training set "
              "(1 = flattest), also among the solutions whose training error is at most the "
              "plug-in's, Kendall τ between δE(σ) and ε_g across the solutions of one "
              "training set (both mean ± se over seeds), and the most frequent flattest "
              "solution (share of seeds).", "",
              "| α | σ | rank of plug-in by δE (of n) | rank by δE among the solutions that fit "
              "as well (of n) | rank by E(σ) | Kendall τ(δE, ε_g) | flattest by δE (share) |",
              "|---|---|---|---|---|---|---|"]
    for r in s["flat"]:
        lines.append(f"| {r['alpha']:g} | {r['sigma']:g} | {r['rank'][0]:.1f} ± "
                     f"{r['rank'][1]:.1f} (of {r['n']}) | {r['fit_rank'][0]:.1f} ± "
                     f"{r['fit_rank'][1]:.1f} (of {r['fit_n']:.1f}) | {r['noisy_rank'][0]:.1f} ± "
                     f"{r['noisy_rank'][1]:.1f} | {r['tau'][0]:+.2f} ± "
                     f"{r['tau'][1]:.2f} | {r['flattest']} ({r['flattest_share']:.0%}) |")
    lines += ["", "## Interpolation paths ŵ(t) ∝ (1 − t) ŵ_ERM + t ŵ_plug-in", "",
              "Directions and biases normalised by ‖w‖ before mixing. δE(σ) and ε_g at "
              f"t = {list(PATH_TS)} (mean ± se); 'monotone': share of seeds whose δE never "
              "rises along the path.", "",
              "| α | from | σ | δE along t | monotone | ε_g along t |", "|---|---|---|---|---|---|"]
    for r in s["paths"]:
        for sg in (0.2, 0.5, 1.0, 2.0):
            de = ", ".join(f"{m:.4f}" for m, _ in r[f"delta_e_{sg:g}"])
            eg = ", ".join(f"{m:.4f}" for m, _ in r["eps_g"]) if sg == 0.2 else ""
            lines.append(f"| {r['alpha']:g} | {r['source']} | {sg:g} | {de} | "
                         f"{r[f'monotone_{sg:g}']:.0%} | {eg} |")
    return "\n".join(lines) + "\n"


def study_plots(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, recs = result["config"], result["records"]
    s = study_summary(result)
    names = list(dict.fromkeys(r["estimator"] for r in recs))
    main_names = [n for n in names if n.startswith(("ERM", "Hebbian", "shell q=0.1 (y=∞)",
                                                   "shell q=0.5 (y=∞)", "shell q=0.9 (y=∞)"))
                  and "T=" not in n]
    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
    cmap = plt.get_cmap("tab20")
    for i, n in enumerate(main_names):
        rows = [r for r in s["table"] if r["estimator"] == n]
        a = [r["alpha"] for r in rows]
        ax[0, 0].errorbar(a, [r["vs_plugin"][0] for r in rows],
                          yerr=[r["vs_plugin"][1] for r in rows], marker="os^Dv<>"[i % 7],
                          capsize=2, color=cmap(i % 20), label=n)
    ax[0, 0].axhline(0, color="k")
    ax[0, 0].set(xscale="log", xlabel="α", ylabel="ε_g − ε_g(Bayes plug-in), paired",
                 title=f"ρ = {cfg['rho']:g}, N = {cfg['dim']}, {cfg['seeds']} seeds")
    ax[0, 0].set_yscale("symlog", linthresh=0.003)
    ax[0, 0].legend(fontsize=6)
    a_mid = cfg["alphas"][len(cfg["alphas"]) // 2]
    for kind, style in (("shell", "-"), ("replicated error", "--")):
        groups = {}
        for r in s["table"]:
            n = r["estimator"]
            if r["alpha"] != a_mid or not n.startswith(kind) or "T=" in n:
                continue
            if ("held-out" in n) != (cfg["bias"] and kind == "shell"):
                continue  # with a bias: the shell centre with its held-out bias
            q = float(n.split("q=")[1].split()[0])
            label = ("y=∞ (shell)" + (", held-out bias" if cfg["bias"] else "")
                     if kind == "shell" else n.split()[-1])
            groups.setdefault(label, []).append((q, *r["vs_plugin"]))
        for label, pts in groups.items():
            q, m, e = np.array(sorted(pts)).T
            ax[0, 1].errorbar(q, m, yerr=e, ls=style, marker="o", capsize=2, label=label)
    ax[0, 1].axhline(0, color="k")
    ax[0, 1].set(xlabel="overlap q with the centre (distance √(2(1−q)))",
                 ylabel="ε_g − ε_g(plug-in), paired",
                 title=f"error-counting flatness, α = {a_mid:g}")
    ax[0, 1].legend(fontsize=7)
    for i, n in enumerate([REFERENCE, *PATH_SOURCES, "shell q=0.1 (y=∞)", "shell q=0.9 (y=∞)",
                           f"replicated error q={cfg_q(names)}"]):
        rs = [r for r in recs if r["alpha"] == a_mid and r["estimator"].startswith(n)
              and "delta_e" in r and "T=" not in r["estimator"]
              and "held-out" not in r["estimator"]]
        if not rs:
            continue
        d = np.array([r["delta_e"] for r in rs if r["estimator"] == rs[0]["estimator"]])
        ax[1, 0].errorbar(SIGMA_GRID, d.mean(0), yerr=d.std(0, ddof=1) / np.sqrt(len(d)),
                          marker="o", capsize=2, label=rs[0]["estimator"], color=cmap(i % 20))
    ax[1, 0].set(xlabel="σ (w → w + σ‖w‖/√N z)", ylabel="local energy δE of the training error",
                 title=f"α = {a_mid:g}")
    ax[1, 0].legend(fontsize=6)
    for r in [r for r in s["paths"] if r["alpha"] == a_mid]:
        m = [v[0] for v in r["delta_e_0.5"]]
        e = [v[1] for v in r["delta_e_0.5"]]
        ax[1, 1].errorbar(PATH_TS, m, yerr=e, marker="o", capsize=2, label=r["source"])
    ax[1, 1].set(xlabel="t (0: ERM, 1: Bayes plug-in)", ylabel="δE(σ = 0.5)",
                 title=f"interpolation paths, α = {a_mid:g}")
    ax[1, 1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def cfg_q(names):
    """The first replicated-error estimator's 'q=… y=…' label (for the σ plot)."""
    reps = [n for n in names if n.startswith("replicated error") and "T=" not in n]
    return reps[0].split("q=")[1] if reps else "none"


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
    parser.add_argument("--shell-overlaps", type=float, nargs="+",
                        default=[0.9, 0.7, 0.5, 0.3, 0.1])
    parser.add_argument("--rep-overlaps", type=float, nargs="+", default=[0.9, 0.5, 0.2])
    parser.add_argument("--rep-replicas", type=int, nargs="+", default=[1, 3, 10])
    parser.add_argument("--run-lengths", type=int, nargs="+", default=[50, 2000])
    parser.add_argument("--fit-steps", type=int, default=500,
                        help="Adam steps of the error-counting flat estimators")
    parser.add_argument("--temperature", type=float, default=0.1,
                        help="τ of the smoothed error of the replicated error-counting scheme")
    parser.add_argument("--sgd", action="store_true",
                        help="the rSGD/eSGD study (N = 500, γ_0 validated; about 70 min)")
    parser.add_argument("--case", choices=[*CASES, "all"], default="all",
                        help="with --sgd: run one case (two processes can share the work)")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    parser.add_argument("--report", type=pathlib.Path, default=None,
                        help="rewrite the .md and .png of a study_rho<ρ>.json, running nothing")
    args = parser.parse_args(argv)
    cfg = get_config(args.quick)
    out = args.out or (OUT / "quick" if args.quick else OUT)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m experiments.gaussian_mixture", *map(shlex.quote, sys.argv[1:])])
    if args.report:
        result = json.loads(args.report.read_text())
        args.report.with_suffix(".md").write_text(study_markdown(result))
        study_plots(result, args.report.with_suffix(".png"))
        return
    if args.fixed_norm:
        fixed_norm_sweep(args, out, command)
        return
    if not args.sgd:
        paired_study(args, out, command)
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
