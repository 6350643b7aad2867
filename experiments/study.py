"""The paper's claims at CPU scale: SGD vs Entropy-SGD vs Replicated-SGD, with error bars.

What it reproduces, at small scale (Pittorino et al., ICLR 2021, arXiv
2006.07897, §4-6): (1) at the same number of gradient
evaluations and at the same number of epochs, Entropy-SGD (eSGD, L = 5) and
Replicated-SGD (rSGD, y = 3, centre evaluated) reach test errors lower or
equal to SGD's; (2) the networks they find are flatter: lower local energy
δE(w, σ) = E_z[E_train(w ⊙ (1 + σz))] − E_train(w) (training error in %,
multiplicative noise); (3) over many trained networks, test error and local
energy are correlated (Kendall's τ).

Design (sized for a loaded 2-core CPU; ``--quick`` is a seconds-long smoke run):

* Datasets / networks: ``digits`` (8×8 scikit-learn digits, 1437/360) and
  ``mnist1d`` (4000/1000) with the 300-100 ReLU MLP of ``flatjax.models``;
  ``--datasets mnist5k`` adds LeNet-5 on the 5k MNIST subset (heavier).
  ``VALIDATION_FRACTION`` of the training split is held out; networks train
  on the rest and the local energy is measured on that training data.
* Shared settings: batch 128 (digits 64), Nesterov momentum 0.9, weight
  decay 5e-4, cosine learning-rate schedule, no augmentation; eSGD and rSGD
  use the defaults of ``flatjax.configs.common.set_algorithm`` (eSGD outer
  lr η = 1, γ from 0.1 to 1 ×10, L = 5, inner lr η′ as tuned; rSGD y = 3, γ₀
  balanced, ×1e4 over the run, exponential per epoch).
* Tuning, the same budget for each algorithm, on the validation split only:
  the learning rate (for eSGD the inner, Langevin, learning rate η′, the step
  that plays SGD's role) from ``learning_rates`` (:func:`study_settings`), at
  the equal-gradient budget, each with the study's seeds; the value with the
  lowest mean validation error is selected. The test set is never used for a
  choice.
* Main comparison: the selected learning rate per algorithm, at
  ``budget='gradients'`` (all algorithms get E SGD-epochs of gradient
  evaluations: eSGD E / L outer epochs, rSGD E / y epochs per replica) and at
  ``budget='epochs'`` (E epochs of each algorithm: L× and y× the gradients
  of SGD). SGD's two budgets are the same run.
* Measurements per network: train/validation/test error; the local energy
  (``num_draws`` draws per σ) on the curve grid ``sigmas`` (the paper's
  0 … 0.1, extended to 0.3) for the main networks and on ``grid_sigmas`` for
  every network of the tuning grid; for digits the local entropy
  G(w; γ) = F(w; γ) + (d/2) log(γ/2π) (``flatjax.local_entropy``, loss =
  n × mean cross-entropy on a training subset) of the main equal-gradient
  networks.
* Kendall's τ (scipy) between test error and δE(σ) over all the networks of
  a dataset (tuning grid + equal-epoch runs); σ = 0.05 is the headline.

Speed: the seeds of one configuration train together (the library's jitted
training step, ``flatjax.training.make_train_step``, ``vmap``-ed over the
seeds and ``lax.scan``-ed over the whole run, so each configuration compiles
once); minibatches follow ``flatjax.training.array_source``'s resumable
shuffling rule. With several seeds sharing one optimizer, rSGD's balanced γ₀
is the one measured at the first seed's initialisation.

Outputs in ``--out`` (default ``experiments/results/study``): ``runs.json``
(every network), ``local_energy_curves.json``, ``summary.json``,
``results_table.csv``, PNG figures, and the Markdown report (``RESULTS.md``;
the full run also rewrites ``experiments/RESULTS.md``, keeping the
hand-written block between the ``HAND-WRITTEN`` markers). Commands::

    .venv/bin/python -m experiments.study             # full study (make results)
    .venv/bin/python -m experiments.study --quick --out /tmp/study   # smoke run
    .venv/bin/python -m experiments.study --report-only  # tables/figures from the JSON
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import flatjax
from flatjax import data as fdata
from flatjax import models
from flatjax.configs import common
from flatjax.training import (
    array_source,
    create_train_state,
    eval_variables,
    evaluate,
    evaluate_replicas,
    make_train_step,
    plan_steps,
)
from flatjax.training.steps import cross_entropy

__all__ = ["main", "run_study", "study_settings", "write_report"]

DEFAULT_OUT = os.path.join("experiments", "results", "study")
RESULTS_MD = os.path.join("experiments", "RESULTS.md")
ALGORITHMS = ("sgd", "esgd", "rsgd")  # short names of flatjax.configs.common
LABELS = {"sgd": "SGD", "esgd": "Entropy-SGD", "rsgd": "Replicated-SGD (centre)"}
COLORS = {"sgd": "tab:blue", "esgd": "tab:orange", "rsgd": "tab:green"}
BUDGETS = ("gradients", "epochs")
TABLE_SIGMAS = (0.01, 0.05, 0.1)
TAU_SIGMA = 0.05
VALIDATION_FRACTION = 0.2
BEGIN_HAND, END_HAND = "<!-- BEGIN HAND-WRITTEN -->", "<!-- END HAND-WRITTEN -->"

# Per dataset: network, batch size and SGD-epochs of the full study.
DATASETS = {
    "digits": {"model": "mlp", "batch_size": 64, "epochs": 30},
    "mnist1d": {"model": "mlp", "batch_size": 128, "epochs": 60},
    "mnist5k": {"model": "lenet5", "batch_size": 128, "epochs": 8},
}


def study_settings(quick: bool) -> dict:
    """The knobs of the study: the full CPU-scale study, or the seconds-long smoke run."""
    if quick:
        return {
            "datasets": ["digits"],
            "epochs": {"digits": 1},
            "seeds": [0, 1],
            "learning_rates": [0.1],
            "sigmas": [0.0, 0.05, 0.1],
            "table_sigmas": [0.05, 0.1],
            "grid_sigmas": [0.0, 0.05, 0.1],  # = sigmas: one local-energy program
            "num_draws": 2,
            "local_energy_examples": {},
            "local_entropy": {},  # its compilation alone would double the smoke run
            "local_entropy_examples": 100,
            "local_entropy_coupling": 1e3,
        }
    return {
        "datasets": ["digits", "mnist1d"],
        "epochs": {k: v["epochs"] for k, v in DATASETS.items()},
        "seeds": [0, 1, 2],
        "learning_rates": [0.05, 0.1, 0.2, 0.4, 0.8],
        # The paper's grid, 0 … 0.1, and beyond it: small networks on easy data hardly
        # notice 10 % multiplicative noise, so their curves only part at larger σ.
        "sigmas": [round(float(s), 3) for s in np.linspace(0.0, 0.1, 11)] + [0.15, 0.2, 0.3],
        "table_sigmas": [*TABLE_SIGMAS, 0.2],
        # σ measured on every network (tuning grid too), for Kendall's τ.
        "grid_sigmas": [0.01, 0.05, 0.1, 0.2],
        "num_draws": 20,
        # Local energy on the first this-many training examples (all when absent).
        "local_energy_examples": {"mnist1d": 1000, "mnist5k": 1000},
        "local_entropy": {"digits": {"num_rungs": 4, "num_chains": 2, "num_steps": 100,
                                     "num_anchor_samples": 100}},
        "local_entropy_examples": 300,
        "local_entropy_coupling": 1e4,
    }


# ---------------------------------------------------------------------------
# Configs and training.


def make_config(dataset: str, algorithm: str, budget: str, learning_rate: float, epochs: float):
    """The run's config: ``flatjax.configs.common`` defaults plus the study's settings."""
    spec = DATASETS[dataset]
    config = common.experiment_base()
    config.dataset = dataset
    config.model = spec["model"]
    config.validation_fraction = VALIDATION_FRACTION
    config.batch_size = spec["batch_size"]
    config.lr_schedule = "cosine"
    config.progress = False
    common.set_algorithm(config, algorithm, inner_steps=5, num_replicas=3)
    config.budget = budget
    config.num_epochs = float(epochs)
    if algorithm == "esgd":
        # The inner Langevin lr plays SGD's role (the step on the data); the outer
        # lr 1 makes the γ-scaled outer step x ← x − γ_t · nesterov(x − μ), with γ
        # clamped so that it stays stable (flatjax.entropy_sgd).
        config.esgd.inner_learning_rate = float(learning_rate)
        config.learning_rate = 1.0
    else:
        config.learning_rate = float(learning_rate)
    return config


def _batch_layout(config) -> dict:
    if config.algorithm == "replicated_sgd":
        return {"num_replicas": int(config.rsgd.num_replicas)}
    if config.algorithm == "entropy_sgd":
        return {"stack": int(config.esgd.inner_steps)}
    return {}


def _index_stream(labels, config, seed, num_steps):
    """Example indices of every step, [T, (y), (L), B], by ``array_source``'s shuffling rule."""
    n = len(labels)
    index = np.arange(n, dtype=np.float32)[:, None]  # exact in float32 for n < 2**24
    source = array_source((index, labels), (index[:1], labels[:1]), num_classes=1,
                          batch_size=config.batch_size, seed=seed)
    it = source.train_batches(0, **_batch_layout(config))
    steps = [next(it)["image"][..., 0] for _ in range(num_steps)]
    return np.stack(steps).astype(np.int32), source.data_steps_per_epoch


def _runner(train_step):
    """jit(scan over steps of vmap over seeds of the library's training step)."""

    def run(state, indices, x, y):
        def body(st, idx):
            batch = {"image": x[idx], "label": y[idx]}
            st, metrics = jax.vmap(train_step)(st, batch)
            return st, {k: metrics[k] for k in ("loss", "finite")}

        return jax.lax.scan(body, state, jnp.swapaxes(indices, 0, 1))

    return jax.jit(run)


def train_seeds(config, model, train, seeds):
    """Trains one config for every seed at once; returns the per-seed states and facts."""
    x, y = train
    streams = [_index_stream(y, config, s, 1) for s in seeds]
    plan = plan_steps(config, streams[0][1])
    indices = np.stack([_index_stream(y, config, s, plan.total_steps)[0] for s in seeds])
    info = {"input_shape": tuple(x.shape[1:]), "num_train": len(y)}
    states = []
    for s in seeds:
        c = config.copy_and_resolve_references()
        c.seed = int(s)
        balance = None
        if c.algorithm == "replicated_sgd" and c.rsgd.coupling is None:
            # The authors' balanced γ_0: the mean training loss over the training set.
            balance = [{"image": x, "label": y}]
        states.append(create_train_state(c, model, info, jax.random.PRNGKey(s), plan=plan,
                                         balance_batches=balance))
    leaves = lambda st: (st.step, st.params, st.batch_stats, st.opt_state, st.rng)  # noqa: E731
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[leaves(st) for st in states])
    state = states[0].replace(step=stacked[0], params=stacked[1], batch_stats=stacked[2],
                              opt_state=stacked[3], rng=stacked[4])
    step_fn = make_train_step(config)
    start = time.time()
    state, metrics = _runner(step_fn)(state, jnp.asarray(indices), jnp.asarray(x), jnp.asarray(y))
    finite = np.asarray(metrics["finite"]).all(axis=0)
    final_loss = np.asarray(metrics["loss"])[-max(1, plan.total_steps // 10):].mean(axis=0)
    wall = time.time() - start
    per_seed = [jax.tree.map(lambda a, i=i: a[i], state) for i in range(len(seeds))]
    facts = {"total_steps": plan.total_steps, "grad_evals": plan.total_steps * plan.grads_per_step,
             "effective_epochs": plan.total_steps * plan.grads_per_step / plan.data_steps_per_epoch,
             "train_wall_s": wall}
    return per_seed, [bool(f) for f in finite], [float(v) for v in final_loss], facts


# ---------------------------------------------------------------------------
# Measurements.


class _Measure:
    """Evaluation, local energy and local entropy of the networks of one dataset."""

    def __init__(self, model, splits, settings, dataset):
        self.model = model
        self.splits = splits
        self.settings = settings
        self.dataset = dataset
        # One eval-mode function object: flatjax.local_energy caches its program on it.
        self.apply_eval = lambda v, x: model.apply(v, x, train=False)

    def errors(self, state, variables):
        out = {}
        for split, (x, y) in self.splits.items():
            out[f"{split}_error"] = evaluate(self.model.apply, variables, x, y)["error"]
        if state.algorithm == "replicated_sgd":
            x, y = self.splits["test"]
            reps = evaluate_replicas(self.model.apply, {"params": state.params}, x, y)
            out["test_replica_error_mean"] = float(np.mean(reps["replica_error"]))
            out["test_ensemble_error"] = reps["ensemble_error"]
        return out

    def local_energy(self, variables, sigmas, seed):
        x, y = self.splits["train"]
        m = self.settings["local_energy_examples"].get(self.dataset, len(y))
        le = flatjax.local_energy(
            self.apply_eval, variables, (x[:m], y[:m]), sigmas,
            key=jax.random.PRNGKey(10_000 + seed), num_draws=self.settings["num_draws"],
        )
        return {"sigmas": [float(s) for s in le.sigmas], "delta_e": [float(v) for v in le.mean],
                "stderr": [float(v) for v in le.stderr], "train_error_base": float(le.base)}

    def local_entropy(self, variables, seed):
        opts = self.settings["local_entropy"].get(self.dataset)
        if opts is None:
            return None
        m = self.settings["local_entropy_examples"]
        x, y = (jnp.asarray(a[:m]) for a in self.splits["train"])
        n = len(y)
        apply_eval = self.apply_eval

        def loss_fn(params):  # the Gibbs measure exp(−n · mean cross-entropy)
            return n * cross_entropy(apply_eval({"params": params}, x), y)

        res = flatjax.local_entropy(loss_fn, variables["params"],
                                    self.settings["local_entropy_coupling"],
                                    key=jax.random.PRNGKey(20_000 + seed), **opts)
        return {"value": float(res.value), "normalized": float(res.normalized),
                "stderr": float(res.stderr)}


def _network_record(dataset, algorithm, budget, lr, seed, state, finite, loss, facts, measure,
                    sigmas, with_entropy):
    record = {"dataset": dataset, "algorithm": algorithm, "budget": budget,
              "learning_rate": lr, "seed": int(seed), "finite": finite,
              "final_train_loss": loss, **facts}
    if not finite:
        return record
    variables = eval_variables(state)
    record.update(measure.errors(state, variables))
    record["local_energy"] = measure.local_energy(variables, sigmas, seed)
    if with_entropy:
        record["local_entropy"] = measure.local_entropy(variables, seed)
    return record


def _log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_dataset(dataset: str, settings: dict) -> list[dict]:
    """Tuning grid, selection on validation, equal-epoch runs and measurements of one dataset."""
    info = fdata.get_info(dataset)
    model = models.get_model(DATASETS[dataset]["model"], info.num_classes)
    splits = {
        "train": fdata.load_arrays(dataset, "train", validation_fraction=VALIDATION_FRACTION),
        "validation": fdata.load_arrays(dataset, "validation",
                                        validation_fraction=VALIDATION_FRACTION),
        "test": fdata.load_arrays(dataset, "test"),
    }
    measure = _Measure(model, splits, settings, dataset)
    epochs, seeds = settings["epochs"][dataset], settings["seeds"]
    tau_sigma = settings.get("grid_sigmas", [TAU_SIGMA])
    records = []

    def train(algorithm, budget, lr):
        config = make_config(dataset, algorithm, budget, lr, epochs)
        _log(f"{dataset} {algorithm} budget={budget} lr={lr}: training {len(seeds)} seeds")
        return train_seeds(config, model, splits["train"], seeds)

    # 1. Tuning grid at equal gradients; every network measured at σ = 0.05.
    trained = {}
    for algorithm in ALGORITHMS:
        for lr in settings["learning_rates"]:
            trained[algorithm, lr] = train(algorithm, "gradients", lr)
            states, finite, losses, facts = trained[algorithm, lr]
            for s, st, f, lo in zip(seeds, states, finite, losses, strict=True):
                records.append(_network_record(dataset, algorithm, "gradients", lr, s, st, f, lo,
                                               facts, measure, tau_sigma, False))
    # 2. Selection on validation error (mean over seeds; diverged runs rank last).
    selected = {}
    for algorithm in ALGORITHMS:
        def val(lr, algorithm=algorithm):
            rows = [r for r in records if r["algorithm"] == algorithm and r["learning_rate"] == lr]
            if not all(r["finite"] for r in rows):
                return float("inf")
            return float(np.mean([r["validation_error"] for r in rows]))

        selected[algorithm] = min(settings["learning_rates"], key=val)
        _log(f"{dataset} {algorithm}: selected lr={selected[algorithm]} on validation")
    # 3. Main networks: full local-energy curves (+ local entropy); equal-epoch runs.
    for algorithm in ALGORITHMS:
        lr = selected[algorithm]
        states, finite, losses, facts = trained[algorithm, lr]
        for s, st, f, lo in zip(seeds, states, finite, losses, strict=True):
            rec = _network_record(dataset, algorithm, "gradients", lr, s, st, f, lo, facts,
                                  measure, settings["sigmas"], True)
            rec["main"] = True
            records.append(rec)
        if algorithm == "sgd":
            continue  # SGD's equal-epoch run is its equal-gradient run
        states, finite, losses, facts = train(algorithm, "epochs", lr)
        for s, st, f, lo in zip(seeds, states, finite, losses, strict=True):
            rec = _network_record(dataset, algorithm, "epochs", lr, s, st, f, lo, facts,
                                  measure, settings["sigmas"], False)
            rec["main"] = True
            records.append(rec)
        _log(f"{dataset} {algorithm}: main networks measured")
    for r in records:
        r["selected"] = r["learning_rate"] == selected[r["algorithm"]]
        r.setdefault("main", False)
    return records


# ---------------------------------------------------------------------------
# Summaries, figures and the report.


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


def summarize(records, settings) -> dict:
    """Table cells (mean ± std over seeds), local-energy curves and Kendall's τ per dataset."""
    from scipy import stats

    summary = {"table": [], "kendall": {}, "selected": {}}
    curves = {"sigmas": settings["sigmas"], "num_draws": settings["num_draws"],
              "noise": "multiplicative", "metric": "training error (%)", "datasets": {}}
    for dataset in settings["datasets"]:
        ds_records = [r for r in records if r["dataset"] == dataset]
        summary["selected"][dataset] = {
            a: next((r["learning_rate"] for r in ds_records if r["algorithm"] == a and r["main"]),
                    None)
            for a in ALGORITHMS
        }
        curves["datasets"][dataset] = {}
        for budget in BUDGETS:
            curves["datasets"][dataset][budget] = {}
            for algorithm in ALGORITHMS:
                rows = main_rows(records, dataset, budget, algorithm)
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
        # τ over every distinct finite network (the main equal-gradient networks repeat the
        # tuning grid's, so only grid networks and equal-epoch runs count).
        nets = [r for r in ds_records if r["finite"] and (not r["main"] or r["budget"] == "epochs")]
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
        summary["kendall"][dataset] = {**by_sigma[f"{TAU_SIGMA:g}"], "num_networks": len(nets),
                                       "sigma": TAU_SIGMA, "by_sigma": by_sigma,
                                       "fitted": {"tau": float(tau_f), "p_value": float(p_f),
                                                  "num_networks": len(fitted)},
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
    sig = np.asarray(curves["sigmas"])
    for dataset in settings["datasets"]:
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
        markers = {"gradients": "o", "epochs": "s"}
        nets = [r for r in records if r["dataset"] == dataset and r["finite"]
                and (not r["main"] or r["budget"] == "epochs")]
        for algorithm in ALGORITHMS:
            for budget in BUDGETS:
                pts = [r for r in nets if r["algorithm"] == algorithm and r["budget"] == budget]
                if pts:
                    ax.scatter([_le_at(r, TAU_SIGMA) for r in pts],
                               [r["test_error"] for r in pts], c=COLORS[algorithm],
                               marker=markers[budget], alpha=0.75, s=22,
                               label=f"{LABELS[algorithm]}, equal {budget}")
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


def _table_md(summary, settings, dataset) -> list[str]:
    sig = settings["table_sigmas"]
    head = ["budget", "algorithm", "lr", "grad evals", "test error %", "val error %",
            "train error %"] + [f"δE(σ={s:g})" for s in sig] + ["local entropy G"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in summary["table"]:
        if cell["dataset"] != dataset:
            continue
        row = [f"equal {cell['budget']}", LABELS[cell["algorithm"]],
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


def _entropy_note(settings) -> str:
    entropy = {d: o for d, o in settings["local_entropy"].items() if d in settings["datasets"]}
    if not entropy:
        return "Local entropy: not computed in this run."
    return (
        f"Local entropy ({', '.join(entropy)}; main equal-gradient networks only; "
        "`flatjax.local_entropy`, thermodynamic integration with MALA): G(w; γ) = F(w; γ) + "
        "(d/2) log(γ/2π) = log E_{z∼N(0, I/γ)}[e^(−L(w + z))] in nats, γ = "
        f"{settings['local_entropy_coupling']:g}, L = n × mean cross-entropy on the first "
        f"{settings['local_entropy_examples']} training examples, sampler settings "
        f"{entropy}: a coarse estimate (higher = flatter)."
    )


def write_report(out: str, results_md: str | None = None) -> str:
    """Builds ``summary.json``, ``local_energy_curves.json``, the CSV, figures and Markdown.

    Reads ``runs.json`` and ``meta.json`` in ``out``; writes the report to
    ``out/RESULTS.md`` and, when given, to ``results_md`` (keeping its
    hand-written block). Returns the Markdown text.
    """
    with open(os.path.join(out, "runs.json")) as f:
        records = json.load(f)
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    settings = meta["settings"]
    summary, curves = summarize(records, settings)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "local_energy_curves.json"), "w") as f:
        json.dump(curves, f, indent=1)
    with open(os.path.join(out, "results_table.csv"), "w", newline="") as f:
        w = csv.writer(f)
        keys = ["test_error", "validation_error", "train_error"] + [
            f"local_energy_{s:g}" for s in settings["table_sigmas"]] + ["local_entropy"]
        w.writerow(["dataset", "budget", "algorithm", "learning_rate", "seeds", "diverged",
                    "grad_evals"] + [f"{k}_{m}" for k in keys for m in ("mean", "std")])
        for c in summary["table"]:
            vals = [c[k][m] if c[k] else "" for k in keys for m in ("mean", "std")]
            w.writerow([c["dataset"], c["budget"], c["algorithm"], c["learning_rate"],
                        c["seeds"], c["diverged"], c["grad_evals"]] + vals)
    figures = make_figures(records, summary, curves, settings, out)
    rel = os.path.relpath(out, os.path.dirname(os.path.abspath(results_md))) if results_md else "."
    rel = rel.replace(os.sep, "/")
    n_nets = sum(1 for r in records if not r["main"] or r["budget"] == "epochs")
    md = [
        "# SGD vs Entropy-SGD vs Replicated-SGD at CPU scale",
        "",
        "Generated by `experiments/study.py` from `runs.json` (except the hand-written block).",
        "What is tested (Pittorino et al., ICLR 2021, arXiv 2006.07897): at equal gradient",
        "evaluations and at equal epochs, do Entropy-SGD (L = 5) and Replicated-SGD (y = 3, the",
        "centre evaluated) reach lower test error than SGD, with flatter minima (lower local",
        "energy), and does test error follow local energy across networks?",
        "",
        _hand_written(results_md),
        "",
        "## Setup",
        "",
        f"- Command: `{meta['command']}` (also `make results`); "
        f"`--report-only` rebuilds tables and figures from `runs.json`.",
        f"- Machine: {meta['machine']}. Wall time of the run: {meta['wall_time_s'] / 60:.1f} min "
        f"(started {meta['started_utc']} UTC).",
        f"- Datasets: {', '.join(settings['datasets'])}; networks: "
        + ", ".join(f"{d}: {DATASETS[d]['model']} (batch {DATASETS[d]['batch_size']}, "
                    f"{settings['epochs'][d]} SGD-epochs)" for d in settings["datasets"])
        + f". {VALIDATION_FRACTION:.0%} of each training split is held out for validation.",
        f"- Seeds per cell: {len(settings['seeds'])} ({settings['seeds']}); the table shows "
        "mean ± standard deviation over seeds.",
        "- Shared: Nesterov momentum 0.9, weight decay 5e-4, cosine learning-rate schedule, "
        "no augmentation; the rules of the authors' code. eSGD: L = 5, Nesterov 0.9 inner "
        "momentum, inner weight decay = weight decay, γ₀ calibrated at outer step 1 from the "
        "last inner loss, ×1e4 over the run (clamped at half the inner and outer steps' "
        "stability bounds), outer step γ-scaled with outer lr 1, noise 1e-4, average 0.75; "
        "rSGD: y = 3, coupling inside the Nesterov gradient, γ₀ = 2g₀ balanced on the training "
        "set at init, ×1e4 over the run (per epoch), replica weight decay y · 5e-4.",
        f"- Tuning (the same budget for every algorithm, validation split only): learning rate "
        f"∈ {settings['learning_rates']} (eSGD: the inner Langevin lr η′), at equal gradients, "
        f"{len(settings['seeds'])} seeds each; lowest mean validation error wins. The test set "
        "is used for no choice. Selected: "
        + "; ".join(f"{d}: " + ", ".join(f"{LABELS[a]} {lr}" for a, lr in sel.items())
                    for d, sel in summary["selected"].items()) + ".",
        "- Budgets: *equal gradients*: every algorithm gets the SGD-epochs above of gradient "
        "evaluations (eSGD: 1/L as many outer epochs, rSGD: 1/y as many epochs per replica); "
        "*equal epochs*: that many epochs of each algorithm (eSGD L×, rSGD y× SGD's "
        "gradients). SGD's two rows are the same networks.",
        f"- Local energy δE(w, σ) = E_z[E_train(w ⊙ (1 + σz))] − E_train(w): training split, "
        f"error in %, all parameters perturbed, M = {settings['num_draws']} draws per σ, "
        "`flatjax.local_energy`"
        + (" (" + ", ".join(f"{d}: first {m} training examples" for d, m in
                            settings["local_energy_examples"].items() if d in settings["datasets"])
           + ")" if any(d in settings["datasets"] for d in settings["local_energy_examples"])
           else "")
        + ". " + _entropy_note(settings),
        "",
        "## Results",
        "",
    ]
    for dataset in settings["datasets"]:
        k = summary["kendall"][dataset]
        md += [f"### {dataset} ({DATASETS[dataset]['model']})", ""]
        md += _table_md(summary, settings, dataset)
        for cell in summary["table"]:
            if cell["dataset"] == dataset and cell["algorithm"] == "rsgd" and cell["test_error"]:
                md += ["", f"Replicated-SGD, equal {cell['budget']}: test error of the centre "
                       f"{_fmt(cell['test_error'])} %, mean of the 3 replicas "
                       f"{_fmt(cell['test_replica_error_mean'])} %, output ensemble of the "
                       f"replicas {_fmt(cell['test_ensemble_error'])} %."]
        others = "; ".join(f"σ = {s}: τ = {v['tau']:.3f}, p = {v['p_value']:.3g}"
                           for s, v in k["by_sigma"].items() if s != f"{TAU_SIGMA:g}")
        md += ["", f"Kendall's τ between test error and δE(σ = {TAU_SIGMA}) (the σ fixed "
               f"before the run) over {k['num_networks']} networks (tuning grid + equal-epoch "
               f"runs): **τ = {k['tau']:.3f}, p = {k['p_value']:.3g}**"
               + (f" (other σ: {others})." if others else ".")
               + f" Over the {k['fitted']['num_networks']} of them with training error ≤ 1 %: "
               f"τ = {k['fitted']['tau']:.3f}, p = {k['fitted']['p_value']:.3g}. "
               f"Diverged in the tuning grid (left out): {k['diverged']}.", ""]
        md += [f"![local energy curves, {dataset}]({rel}/local_energy_curves_{dataset}.png)",
               f"![test error vs local energy, {dataset}]"
               f"({rel}/test_error_vs_local_energy_{dataset}.png)", ""]
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


def run_study(out: str, *, quick: bool = False, datasets=None, command: str = "") -> None:
    """Trains and measures every network, then writes the JSON, figures and report."""
    settings = study_settings(quick)
    if datasets:
        unknown = sorted(set(datasets) - set(DATASETS))
        if unknown:
            raise ValueError(f"unknown datasets {unknown}; expected some of {sorted(DATASETS)}.")
        settings["datasets"] = list(datasets)
        for d in datasets:
            settings["epochs"].setdefault(d, DATASETS[d]["epochs"])
    os.makedirs(out, exist_ok=True)
    started = time.time()
    records = []
    for dataset in settings["datasets"]:
        records += run_dataset(dataset, settings)
        with open(os.path.join(out, "runs.json"), "w") as f:  # saved after each dataset
            json.dump(records, f, indent=1)
    meta = {"settings": settings, "command": command, "wall_time_s": time.time() - started,
            "started_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores "
                       "(shared with other jobs: load average above the core count), "
                       f"jax {jax.__version__} on {jax.default_backend()}"}
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.study", description=__doc__
                                     .split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--datasets", nargs="+", default=None,
                        help=f"datasets to run (default digits mnist1d), of {sorted(DATASETS)}")
    parser.add_argument("--results-md", default=None,
                        help=f"also write the report here (default: {RESULTS_MD} for the full "
                             "study at the default --out)")
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild tables, figures and report from OUT/runs.json")
    args = parser.parse_args(argv)
    out = args.out or DEFAULT_OUT
    results_md = args.results_md
    if results_md is None and not args.quick and args.out is None:
        results_md = RESULTS_MD
    if not args.report_only:
        command = "python -m experiments.study" + (" --quick" if args.quick else "") + (
            f" --out {args.out}" if args.out else "") + (
            f" --datasets {' '.join(args.datasets)}" if args.datasets else "")
        run_study(out, quick=args.quick, datasets=args.datasets, command=command)
    write_report(out, results_md)
    _log(f"wrote {out}" + (f" and {results_md}" if results_md else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
