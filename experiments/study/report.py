"""Summaries, paired statistics, figures and the Markdown report of the study.

Everything here is computed from ``runs.json`` and ``meta.json`` (see
:func:`experiments.study.runner.load_runs`), so ``--report-only`` rebuilds
the report without training.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np

from experiments.study.runner import load_runs
from experiments.study.settings import (
    ALGORITHMS,
    BUDGETS,
    DEFAULT_TESTBEDS,
    LABELS,
    TAU_SIGMA,
    VALIDATION_FRACTION,
)

__all__ = ["main_rows", "matched_rows", "paired_difference", "partial_kendall", "summarize",
           "write_report"]

COLORS = {"sgd": "tab:blue", "esgd": "tab:orange", "rsgd": "tab:green"}
TRAIN_ERROR_BANDS = (1.0, 5.0, 10.0, 20.0)  # % training error, for τ within bands
BEGIN_HAND, END_HAND = "<!-- BEGIN HAND-WRITTEN -->", "<!-- END HAND-WRITTEN -->"


def _le_at(record, sigma):
    le = record.get("local_energy")
    if not le:
        return float("nan")
    for s, v in zip(le["sigmas"], le["delta_e"], strict=True):
        if abs(s - sigma) < 1e-6:
            return v
    return float("nan")


def _mean_std(values):
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if v.size == 0:
        return None
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "n": int(v.size)}


def main_rows(records, dataset, budget, algorithm):
    """The main networks of one table cell (SGD's equal-epoch cell is its equal-gradient run)."""
    b = "gradients" if algorithm == "sgd" else budget
    return [r for r in records if r["dataset"] == dataset and r.get("main")
            and r["algorithm"] == algorithm and r["budget"] == b]


def paired_difference(baseline: dict, other: dict) -> dict | None:
    """Paired statistics of ``other − baseline`` over the seeds both have.

    With d_s = other[s] − baseline[s] over the n common seeds s: the mean
    d̄, its standard error sd(d) / √n (sample sd, ddof 1), the two-sided
    paired t-test p-value (t = d̄ / se with n − 1 degrees of freedom; 1 when
    every d_s = 0, 0 when they are all equal and non-zero) and the
    two-sided exact Wilcoxon signed-rank p-value (None when every d_s = 0;
    with n = 5 its smallest value is 2 / 2⁵ = 0.0625).

    Args:
      baseline: ``{seed: value}``.
      other: ``{seed: value}``.

    Returns:
      ``{"n", "mean", "se", "t_p", "wilcoxon_p", "wins"}`` (``wins``: seeds with
      d_s < 0), or ``None`` with fewer than two common seeds.

    Example:
      >>> r = paired_difference({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.5, 1: 1.0, 2: 2.5})
      >>> round(r["mean"], 3), round(r["se"], 3), r["wins"]
      (-0.667, 0.167, 3)
    """
    from scipy import stats

    seeds = sorted(set(baseline) & set(other))
    vals = [(baseline[s], other[s]) for s in seeds]
    vals = [(a, b) for a, b in vals if np.isfinite(a) and np.isfinite(b)]
    if len(vals) < 2:
        return None
    a, b = (np.asarray(v, float) for v in zip(*vals, strict=True))
    d = b - a
    n = len(d)
    se = float(d.std(ddof=1) / np.sqrt(n))
    t_p = float(stats.ttest_rel(b, a).pvalue) if se > 0 else (1.0 if d.mean() == 0 else 0.0)
    w_p = float(stats.wilcoxon(d).pvalue) if np.any(d != 0) else None
    return {"n": n, "mean": float(d.mean()), "se": se, "t_p": t_p, "wilcoxon_p": w_p,
            "wins": int(np.sum(d < 0))}


def matched_rows(records, dataset, algorithm):
    """SGD trained with the gradient evaluations of ``algorithm``'s equal-epoch run."""
    return [r for r in records if r["dataset"] == dataset and r.get("main")
            and r["algorithm"] == "sgd" and r["budget"] == "matched"
            and r.get("matched_to") == algorithm]


def _cell(rows, dataset, budget, algorithm, settings) -> dict:
    """One table cell: mean ± std over the seeds of ``rows``."""
    ok = [r for r in rows if r["finite"]]
    cell = {"dataset": dataset, "budget": budget, "algorithm": algorithm,
            "learning_rate": rows[0]["learning_rate"] if rows else None,
            "seeds": len(rows), "diverged": len(rows) - len(ok),
            "grad_evals": rows[0]["grad_evals"] if rows else None,
            "effective_epochs": rows[0]["effective_epochs"] if rows else None}
    for key in ("test_error", "validation_error", "train_error",
                "test_ensemble_error", "test_replica_error_mean"):
        cell[key] = _mean_std([r.get(key) for r in ok])
    for sigma in settings["table_sigmas"]:
        cell[f"local_energy_{sigma:g}"] = _mean_std([_le_at(r, sigma) for r in ok])
    ent = [r["local_entropy"]["normalized"] for r in ok if r.get("local_entropy")]
    cell["local_entropy"] = _mean_std(ent)
    return cell


def _paired_cells(records, dataset, settings) -> list[dict]:
    """eSGD and rSGD against SGD, per budget: test error and δE at the table's σ.

    Budget ``"matched"``: the equal-epoch run against SGD given the same
    gradient evaluations (where the testbed trains it).
    """
    keys = {"test_error": lambda r: r["test_error"]}
    for sigma in settings["table_sigmas"]:
        keys[f"local_energy_{sigma:g}"] = lambda r, s=sigma: _le_at(r, s)
    sgd = [r for r in main_rows(records, dataset, "gradients", "sgd") if r["finite"]]
    cells = []
    for budget in BUDGETS:
        for algorithm in ALGORITHMS[1:]:
            rows = [r for r in main_rows(records, dataset, budget, algorithm) if r["finite"]]
            cell = {"dataset": dataset, "budget": budget, "algorithm": algorithm}
            for key, get in keys.items():
                cell[key] = paired_difference({r["seed"]: get(r) for r in sgd},
                                              {r["seed"]: get(r) for r in rows})
            cells.append(cell)
    for algorithm in ALGORITHMS[1:]:
        base = [r for r in matched_rows(records, dataset, algorithm) if r["finite"]]
        if not base:
            continue
        rows = [r for r in main_rows(records, dataset, "epochs", algorithm) if r["finite"]]
        cell = {"dataset": dataset, "budget": "matched", "algorithm": algorithm}
        for key, get in keys.items():
            cell[key] = paired_difference({r["seed"]: get(r) for r in base},
                                          {r["seed"]: get(r) for r in rows})
        cells.append(cell)
    return cells


def _kendall(x, y):
    from scipy import stats

    if len(x) <= 2:
        return float("nan"), float("nan")
    tau, p = stats.kendalltau(x, y)
    return float(tau), float(p)


def partial_kendall(x, y, z) -> float:
    """Kendall's partial τ of x and y given z: (τ_xy − τ_xz τ_yz) / √((1 − τ_xz²)(1 − τ_yz²)).

    Kendall (1942), "Partial rank correlation", Biometrika 32. No p-value:
    its null distribution has no simple closed form.

    Example:
      >>> round(partial_kendall([1, 2, 3, 4], [1, 3, 2, 4], [4, 1, 2, 3]), 3)
      0.707
    """
    txy, txz, tyz = _kendall(x, y)[0], _kendall(x, z)[0], _kendall(y, z)[0]
    den = np.sqrt((1 - txz**2) * (1 - tyz**2))
    return float((txy - txz * tyz) / den) if den > 0 else float("nan")


def summarize(records, settings) -> dict:
    """Table cells (mean ± std over seeds), paired differences to SGD, curves and Kendall's τ."""
    from scipy import stats

    summary = {"table": [], "paired": [], "kendall": {}, "selected": {}}
    curves = {"sigmas": settings["sigmas"], "num_draws": settings["num_draws"],
              "noise": "multiplicative", "metric": "training error (%)", "datasets": {}}
    for dataset in settings["datasets"]:
        ds_records = [r for r in records if r["dataset"] == dataset]
        summary["selected"][dataset] = {
            a: next((r["learning_rate"] for r in ds_records if r["algorithm"] == a and r["main"]),
                    None)
            for a in ALGORITHMS
        }
        curves["datasets"][dataset] = {"sigmas": settings["sigmas"]}
        for budget in BUDGETS:
            curves["datasets"][dataset][budget] = {}
            for algorithm in ALGORITHMS:
                rows = main_rows(records, dataset, budget, algorithm)
                ok = [r for r in rows if r["finite"]]
                cell = _cell(rows, dataset, budget, algorithm, settings)
                summary["table"].append(cell)
                per_seed = [r["local_energy"]["delta_e"] for r in ok]
                if per_seed:
                    arr = np.asarray(per_seed)
                    curves["datasets"][dataset][budget][algorithm] = {
                        "seeds": [r["seed"] for r in ok], "per_seed": per_seed,
                        "mean": arr.mean(0).tolist(),
                        "std": (arr.std(0, ddof=1) if len(arr) > 1 else 0 * arr[0]).tolist(),
                        "learning_rate": cell["learning_rate"],
                    }
        for algorithm in ALGORITHMS[1:]:
            rows = matched_rows(records, dataset, algorithm)
            if rows:
                summary["table"].append({**_cell(rows, dataset, "matched", "sgd", settings),
                                         "matched_to": algorithm})
        summary["paired"] += _paired_cells(records, dataset, settings)
        # τ over every distinct finite network (the main equal-gradient networks repeat the
        # tuning grid's, so only grid networks, equal-epoch and matched-SGD runs count).
        nets = [r for r in ds_records
                if r["finite"] and (not r["main"] or r["budget"] != "gradients")]
        te = [r["test_error"] for r in nets]
        by_sigma = {}
        for sigma in [s for s in settings.get("grid_sigmas", [TAU_SIGMA]) if s > 0]:
            le = [_le_at(r, sigma) for r in nets]
            tau, p = stats.kendalltau(te, le) if len(nets) > 2 else (float("nan"),) * 2
            by_sigma[f"{sigma:g}"] = {"tau": float(tau), "p_value": float(p)}
        # The same over the networks that fit their training set (train error ≤ 1 %): δE is
        # measured from each network's own training error, so under-trained networks differ.
        fitted = [r for r in nets if r["train_error"] <= 1.0]
        tau_f, p_f = (stats.kendalltau([r["test_error"] for r in fitted],
                                       [_le_at(r, TAU_SIGMA) for r in fitted])
                      if len(fitted) > 2 else (float("nan"),) * 2)
        # Bands of training error, and τ with training error held fixed: where networks
        # under-fit, test error follows training error, and so may δE.
        bands = []
        for limit in TRAIN_ERROR_BANDS:
            band = [r for r in nets if r["train_error"] <= limit]
            tau_b, p_b = _kendall([r["test_error"] for r in band],
                                  [_le_at(r, TAU_SIGMA) for r in band])
            bands.append({"max_train_error": limit, "num_networks": len(band), "tau": tau_b,
                          "p_value": p_b})
        train = [r["train_error"] for r in nets]
        partial = {s: partial_kendall(te, [_le_at(r, float(s)) for r in nets], train)
                   for s in by_sigma}
        summary["kendall"][dataset] = {**by_sigma[f"{TAU_SIGMA:g}"], "num_networks": len(nets),
                                       "sigma": TAU_SIGMA, "by_sigma": by_sigma,
                                       "fitted": {"tau": float(tau_f), "p_value": float(p_f),
                                                  "num_networks": len(fitted)},
                                       "train_error_bands": bands,
                                       "tau_test_train": _kendall(te, train)[0],
                                       "partial_given_train_error": partial,
                                       "diverged": sum(1 for r in ds_records
                                                       if not r["finite"] and not r["main"])}
    return summary, curves


def _fmt(stat, digits=2):
    if not stat:
        return "—"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def make_figures(records, summary, curves, settings, out) -> list[str]:
    """Local-energy curves, test error vs local energy, and test error bars; returns file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for dataset in settings["datasets"]:
        sig = np.asarray(curves["datasets"][dataset].get("sigmas", curves["sigmas"]))
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
        for ax, budget in zip(axes, BUDGETS, strict=True):
            for algorithm in ALGORITHMS:
                c = curves["datasets"][dataset][budget].get(algorithm)
                if not c:
                    continue
                ax.errorbar(sig, c["mean"], yerr=c["std"], marker="o", ms=3, capsize=2,
                            color=COLORS[algorithm],
                            label=f"{LABELS[algorithm]} (n={len(c['seeds'])})")
            ax.set_title(f"{dataset}: equal {budget}")
            if sig.max() > 0.1:
                ax.axvline(0.1, color="gray", lw=0.8, ls=":")  # end of the paper's grid
            ax.set_xlabel("σ (multiplicative noise)")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("local energy δE (train error, %)")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        name = f"local_energy_curves_{dataset}.png"
        fig.savefig(os.path.join(out, name), dpi=90)
        plt.close(fig)
        names.append(name)

        fig, ax = plt.subplots(figsize=(5.2, 4))
        markers = {"gradients": "o", "epochs": "s", "matched": "^"}
        nets = [r for r in records if r["dataset"] == dataset and r["finite"]
                and (not r["main"] or r["budget"] != "gradients")]
        for algorithm in ALGORITHMS:
            for budget in markers:
                pts = [r for r in nets if r["algorithm"] == algorithm and r["budget"] == budget]
                if pts:
                    ax.scatter([_le_at(r, TAU_SIGMA) for r in pts],
                               [r["test_error"] for r in pts], c=COLORS[algorithm],
                               marker=markers[budget], alpha=0.75, s=22,
                               label=f"{LABELS[algorithm]}, "
                               + ("as many gradients as eSGD/rSGD at equal epochs"
                                  if budget == "matched" else f"equal {budget}"))
        k = summary["kendall"][dataset]
        ax.set_title(f"{dataset}: Kendall τ = {k['tau']:.2f} (p = {k['p_value']:.2g}, "
                     f"{k['num_networks']} nets)", fontsize=9)
        ax.set_xlabel(f"local energy δE(σ = {TAU_SIGMA}) (train error, %)")
        ax.set_ylabel("test error (%)")
        errors = [r["test_error"] for r in nets]
        if errors and min(errors) > 0 and max(errors) > 5 * min(errors):
            ax.set_yscale("log")  # collapsed networks (chance-level error) would squash the rest
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        name = f"test_error_vs_local_energy_{dataset}.png"
        fig.savefig(os.path.join(out, name), dpi=90)
        plt.close(fig)
        names.append(name)

    fig, axes = plt.subplots(1, len(settings["datasets"]),
                             figsize=(4.2 * len(settings["datasets"]), 3.4), squeeze=False)
    for ax, dataset in zip(axes[0], settings["datasets"], strict=True):
        for j, algorithm in enumerate(ALGORITHMS):
            for i, budget in enumerate(BUDGETS):
                cell = next(c for c in summary["table"] if c["dataset"] == dataset
                            and c["budget"] == budget and c["algorithm"] == algorithm)
                if cell["test_error"]:
                    ax.bar(i * 4 + j, cell["test_error"]["mean"], yerr=cell["test_error"]["std"],
                           color=COLORS[algorithm], capsize=3,
                           label=LABELS[algorithm] if i == 0 else None)
        ax.set_xticks([1, 5], ["equal gradients", "equal epochs"])
        ax.set_ylabel("test error (%)")
        ax.set_title(dataset)
        ax.legend(fontsize=7)
    fig.tight_layout()
    name = "test_error.png"
    fig.savefig(os.path.join(out, name), dpi=90)
    plt.close(fig)
    names.append(name)
    return names


def _budget_label(cell) -> str:
    if cell["budget"] != "matched":
        return f"equal {cell['budget']}"
    if cell["algorithm"] == "sgd":  # a table row: SGD at another algorithm's gradients
        return f"gradients of {LABELS[cell['matched_to']]} at equal epochs"
    return "equal epochs, against SGD with the same gradients"  # a paired row


def _table_md(summary, settings, dataset) -> list[str]:
    sig = settings["table_sigmas"]
    head = ["budget", "algorithm", "lr", "grad evals", "test error %", "val error %",
            "train error %"] + [f"δE(σ={s:g})" for s in sig] + ["local entropy G"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in summary["table"]:
        if cell["dataset"] != dataset:
            continue
        row = [_budget_label(cell), LABELS[cell["algorithm"]],
               f"{cell['learning_rate']:g}" if cell["learning_rate"] else "—",
               str(cell["grad_evals"]), _fmt(cell["test_error"]), _fmt(cell["validation_error"]),
               _fmt(cell["train_error"])]
        row += [_fmt(cell[f"local_energy_{s:g}"]) for s in sig]
        row.append(_fmt(cell["local_entropy"], 1))
        if cell["diverged"]:
            row[1] += f" ({cell['diverged']} of {cell['seeds']} diverged)"
        lines.append("| " + " | ".join(row) + " |")
    return lines


FULL_SIZE = """\
## Full-size runs (GPU/TPU): not run here

The paper's deep-learning grid (arXiv 2006.07897, Table 1) is configured in
`flatjax/configs/cifar.py` (CIFAR-10/100, standard augmentation, batch
128, Nesterov 0.9, cosine lr 0.1, weight decay 5e-4, 200 epochs; eSGD L = 5,
outer lr 1 with γ 0.1 → 1; rSGD y = 3, centre evaluated; `budget=gradients`,
i.e. equal gradient evaluations). The CIFAR datasets must be prepared once
with tfds on a connected machine. One cell, e.g. CIFAR-10 × ResNet-18 × eSGD:

    flatjax train --config flatjax/configs/cifar.py:cifar10,resnet18,esgd \\
        --workdir runs/cifar10/resnet18/esgd
    flatjax flatness --workdir runs/cifar10/resnet18/esgd   # local energy, training set
    flatjax results runs/cifar10/resnet18/* --out results/cifar10_resnet18

Equal epochs instead of equal gradients: add `--set budget=epochs` (and use
another `--workdir`). The grid (`DATASET` ∈ {cifar10, cifar100}, `MODEL` ∈
{resnet18, resnet110, pyramidnet272, efficientnet_b0}, `ALG` ∈ {sgd, esgd, rsgd}):

    for D in cifar10 cifar100; do for M in resnet18 resnet110 pyramidnet272 efficientnet_b0; do
      for A in sgd esgd rsgd; do
        flatjax train --config flatjax/configs/cifar.py:$D,$M,$A --workdir runs/$D/$M/$A
      done; done; done

PyramidNet-272 (α = 200, bottleneck, ShakeDrop) needs several GPUs; the others one.

| dataset | network | SGD test error % | eSGD test error % | rSGD test error % |
|---|---|---|---|---|
"""


def _full_size_section() -> str:
    rows = []
    for d in ("CIFAR-10", "CIFAR-100"):
        for m in ("ResNet-18", "ResNet-110", "PyramidNet-272 + ShakeDrop", "EfficientNet-B0"):
            rows.append(f"| {d} | {m} | not run here | not run here | not run here |")
    return FULL_SIZE + "\n".join(rows) + "\n"


def _hand_written(path) -> str:
    default = (f"{BEGIN_HAND}\n_(hand-written summary of what the data say goes here)_\n"
               f"{END_HAND}")
    if not path or not os.path.exists(path):
        return default
    text = open(path).read()
    if BEGIN_HAND in text and END_HAND in text:
        return text[text.index(BEGIN_HAND): text.index(END_HAND) + len(END_HAND)]
    return default


def _p(v) -> str:
    return "—" if v is None or not np.isfinite(v) else f"{v:.2g}"


def _paired_md(summary, settings, dataset) -> list[str]:
    """Markdown table of the paired differences (algorithm − SGD) of one testbed."""
    keys = ["test_error", *[f"local_energy_{s:g}" for s in settings["table_sigmas"]]]
    names = ["test error (pp)", *[f"δE(σ={s:g}) (pp)" for s in settings["table_sigmas"]]]
    head = ["budget", "algorithm", *[f"Δ {n}: mean ± se, p_t, p_W" for n in names[:1]],
            *[f"Δ {n}" for n in names[1:]]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in summary["paired"]:
        if cell["dataset"] != dataset:
            continue
        row = [_budget_label(cell), LABELS[cell["algorithm"]]]
        for j, key in enumerate(keys):
            d = cell[key]
            if d is None:
                row.append("—")
            elif j == 0:
                row.append(f"{d['mean']:+.2f} ± {d['se']:.2f}, p_t = {_p(d['t_p'])}, "
                           f"p_W = {_p(d['wilcoxon_p'])} ({d['wins']}/{d['n']} seeds lower)")
            else:
                row.append(f"{d['mean']:+.2f} ± {d['se']:.2f} (p_t = {_p(d['t_p'])})")
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _entropy_note(settings, testbed) -> str:
    opts = settings["testbeds"][testbed]["local_entropy"]
    if not opts:
        return "local entropy not measured"
    return (
        "local entropy of the main equal-gradient networks (`flatjax.local_entropy`, "
        "thermodynamic integration with MALA): G(w; γ) = F(w; γ) + (d/2) log(γ/2π) = "
        "log E_{z∼N(0, I/γ)}[e^(−L(w + z))] in nats, γ = "
        f"{settings['local_entropy_coupling']:g}, L = n × mean cross-entropy on the first "
        f"{settings['local_entropy_examples']} training examples, sampler settings {opts}: "
        "a coarse estimate (higher = flatter)"
    )


def _testbed_md(name, entry, summary, rel) -> list[str]:
    settings = entry["settings"]
    t = settings["testbeds"][name]
    sel = summary["selected"][name]
    k = summary["kendall"][name]
    m = t["local_energy_examples"]
    md = [f"### {name}: {t['dataset']} × {t['model']}", "",
          f"{t['note']}. Batch {t['batch_size']}, {t['epochs']:g} SGD-epochs, "
          f"{len(t['seeds'])} seeds {t['seeds']}, learning-rate grid {t['learning_rates']} "
          f"(selected: " + ", ".join(f"{LABELS[a]} {lr}" for a, lr in sel.items())
          + f"). Local energy on {'the first ' + str(m) if m else 'all'} training examples, "
          f"M = {settings['num_draws']} draws per σ; {_entropy_note(settings, name)}. "
          f"Command `{entry['command']}`, {entry['wall_time_s'] / 60:.1f} min wall "
          f"(started {entry['started_utc']} UTC; {entry['machine']}"
          + (f"; {entry['note']}" if entry.get("note") else "") + ").", ""]
    md += _table_md(summary, settings, name)
    for cell in summary["table"]:
        if cell["dataset"] == name and cell["algorithm"] == "rsgd" and cell["test_error"]:
            md += ["", f"Replicated-SGD, equal {cell['budget']}: test error of the centre "
                   f"{_fmt(cell['test_error'])} %, mean of the 3 replicas "
                   f"{_fmt(cell['test_replica_error_mean'])} %, output ensemble of the "
                   f"replicas {_fmt(cell['test_ensemble_error'])} %."]
    md += ["", "Paired by seed against SGD (Δ = algorithm − SGD, in percentage points; mean ± "
           "standard error over seeds; p_t: paired t-test, p_W: Wilcoxon signed-rank, both "
           "two-sided; negative Δ test error = better than SGD, negative Δ δE = flatter):", ""]
    md += _paired_md(summary, settings, name)
    matched = any(c["dataset"] == name and c["budget"] == "matched" for c in summary["table"])
    others = "; ".join(f"σ = {s}: τ = {v['tau']:.3f}, p = {v['p_value']:.3g}"
                       for s, v in k["by_sigma"].items() if s != f"{TAU_SIGMA:g}")
    md += ["", f"Kendall's τ between test error and δE(σ = {TAU_SIGMA}) (the σ fixed "
           f"before the run) over {k['num_networks']} networks (tuning grid"
           + (", equal-epoch and matched-SGD runs" if matched else " and equal-epoch runs")
           + f"): **τ = {k['tau']:.3f}, p = {k['p_value']:.3g}**"
           + (f" (other σ: {others})." if others else ".")
           + f" Over the {k['fitted']['num_networks']} of them with training error ≤ 1 %: "
           f"τ = {k['fitted']['tau']:.3f}, p = {k['fitted']['p_value']:.3g}. "
           f"Diverged in the tuning grid (left out): {k['diverged']}.", "",
           "Training error and local energy: τ(test error, training error) = "
           f"{k['tau_test_train']:.3f}; τ(test error, δE(σ = {TAU_SIGMA})) over the networks "
           "with training error ≤ "
           + ", ≤ ".join(f"{b['max_train_error']:g} %: {b['tau']:.3f} (p = {b['p_value']:.2g}, "
                         f"{b['num_networks']} networks)" for b in k["train_error_bands"])
           + "; partial τ(test error, δE(σ) | training error): "
           + ", ".join(f"σ = {s}: {v:.3f}" for s, v in k["partial_given_train_error"].items())
           + " (Kendall 1942).", ""]
    md += [f"![local energy curves, {name}]({rel}/local_energy_curves_{name}.png)",
           f"![test error vs local energy, {name}]"
           f"({rel}/test_error_vs_local_energy_{name}.png)", ""]
    return md


def _order(names):
    return [n for n in DEFAULT_TESTBEDS if n in names] + sorted(set(names) - set(DEFAULT_TESTBEDS))


def write_report(out: str, results_md: str | None = None) -> str:
    """Builds ``summary.json``, ``local_energy_curves.json``, the CSV, figures and Markdown.

    Reads ``runs.json`` and ``meta.json`` in ``out`` (every testbed there,
    each summarised with the settings of the run that produced it); writes
    the report to ``out/RESULTS.md`` and, when given, to ``results_md``
    (keeping its hand-written block). Returns the Markdown text.
    """
    records, meta = load_runs(out)
    names = _order(meta["testbeds"])
    summary = {"table": [], "paired": [], "kendall": {}, "selected": {}}
    curves = None
    for name in names:
        s, c = summarize(records, meta["testbeds"][name]["settings"])
        for key in ("table", "paired"):
            summary[key] += s[key]
        for key in ("kendall", "selected"):
            summary[key].update(s[key])
        if curves is None:
            curves = c
        else:
            curves["datasets"].update(c["datasets"])
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "local_energy_curves.json"), "w") as f:
        json.dump(curves, f, indent=1)
    first = meta["testbeds"][names[0]]["settings"]
    table_sigmas = first["table_sigmas"]
    with open(os.path.join(out, "results_table.csv"), "w", newline="") as f:
        w = csv.writer(f)
        keys = ["test_error", "validation_error", "train_error"] + [
            f"local_energy_{s:g}" for s in table_sigmas] + ["local_entropy"]
        w.writerow(["dataset", "budget", "algorithm", "learning_rate", "seeds", "diverged",
                    "grad_evals"] + [f"{k}_{m}" for k in keys for m in ("mean", "std")])
        for c in summary["table"]:
            vals = [c[k][m] if c.get(k) else "" for k in keys for m in ("mean", "std")]
            w.writerow([c["dataset"], c["budget"], c["algorithm"], c["learning_rate"],
                        c["seeds"], c["diverged"], c["grad_evals"]] + vals)
    figures = make_figures(records, summary, curves, {**first, "datasets": names}, out)
    rel = os.path.relpath(out, os.path.dirname(os.path.abspath(results_md))) if results_md else "."
    rel = rel.replace(os.sep, "/")
    n_nets = sum(1 for r in records if not r["main"] or r["budget"] != "gradients")
    md = [
        "# SGD vs Entropy-SGD vs Replicated-SGD at CPU scale",
        "",
        "Generated by `experiments/study/` from `runs.json` (except the hand-written block).",
        "What is tested (Pittorino et al., ICLR 2021, arXiv 2006.07897): at equal gradient",
        "evaluations and at equal epochs, do Entropy-SGD (L = 5) and Replicated-SGD (y = 3, the",
        "centre evaluated) reach lower test error than SGD, with flatter minima (lower local",
        "energy), and does test error follow local energy across networks?",
        "",
        _hand_written(results_md),
        "",
        "## Setup",
        "",
        "- Command: `python -m experiments.study` (every testbed, also `make results`); "
        "`--datasets NAME …` reruns some testbeds and keeps the others' records; "
        "`--report-only` rebuilds tables and figures from `runs.json`. Each testbed below "
        "gives the command and wall time of the run that produced it.",
        f"- Testbeds: {', '.join(names)}. {VALIDATION_FRACTION:.0%} of each training split is "
        "held out for validation; networks train on the rest and their local energy is "
        "measured on that training data. Tables show mean ± standard deviation over seeds.",
        "- Shared: Nesterov momentum 0.9, weight decay 5e-4, cosine learning-rate schedule, "
        "no augmentation; the rules of the authors' code. eSGD: L = 5, Nesterov 0.9 inner "
        "momentum, inner weight decay = weight decay, γ₀ calibrated at outer step 1 from the "
        "last inner loss, ×1e4 over the run (clamped at half the inner and outer steps' "
        "stability bounds), outer step γ-scaled with outer lr 1, noise 1e-4, average 0.75; "
        "rSGD: y = 3, coupling inside the Nesterov gradient, γ₀ = 2g₀ balanced on the training "
        "set at init, ×1e4 over the run (per epoch), replica weight decay y · 5e-4.",
        "- Tuning (the same budget for every algorithm, validation split only): the testbed's "
        "learning-rate grid (eSGD: the inner Langevin lr η′), at equal gradients, every seed; "
        "lowest mean validation error wins, and the same value is used at equal epochs. The "
        "test set is used for no choice.",
        "- Budgets: *equal gradients*: every algorithm gets the testbed's SGD-epochs of "
        "gradient evaluations (eSGD: 1/L as many outer epochs, rSGD: 1/y as many epochs per "
        "replica); *equal epochs*: that many epochs of each algorithm (eSGD L×, rSGD y× SGD's "
        "gradients, the paper's comparison). SGD's two rows are the same networks.",
        "- Local energy δE(w, σ) = E_z[E_train(w ⊙ (1 + σz))] − E_train(w): training split, "
        "error in %, all parameters perturbed, `flatjax.local_energy`.",
        "",
        "## Results",
        "",
    ]
    for name in names:
        md += _testbed_md(name, meta["testbeds"][name], summary, rel)
    md += [f"![test error]({rel}/test_error.png)", "",
           f"Raw numbers: `{rel}/runs.json` ({len(records)} records, {n_nets} distinct "
           f"networks), `{rel}/summary.json`, `{rel}/results_table.csv`, "
           f"`{rel}/local_energy_curves.json` (per-seed curves). Figures: "
           + ", ".join(f"`{n}`" for n in figures) + ".", ""]
    md.append(_full_size_section())
    text = "\n".join(md)
    with open(os.path.join(out, "RESULTS.md"), "w") as f:
        f.write(text.replace(f"]({rel}/", "](./") if rel != "." else text)
    if results_md:
        with open(results_md, "w") as f:
            f.write(text)
    return text
