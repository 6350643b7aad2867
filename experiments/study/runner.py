"""Training and measuring the networks of the study, and saving them as JSON records.

The seeds of one configuration train together: the library's jitted
training step (``flatjax.training.make_train_step``) ``vmap``-ed over the
seeds and ``lax.scan``-ed over the whole run, so each configuration compiles
once; minibatches follow ``flatjax.training.array_source``'s resumable
shuffling rule. With several seeds sharing one optimizer, rSGD's balanced
γ₀ is the one measured at the first seed's initialisation.
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

import flatjax
from experiments.study.settings import (
    ALGORITHMS,
    INNER_STEPS,
    NUM_REPLICAS,
    VALIDATION_FRACTION,
    make_config,
    study_settings,
)
from flatjax import data as fdata
from flatjax import models
from flatjax.training import (
    algorithms,
    array_source,
    create_train_state,
    eval_variables,
    evaluate,
    evaluate_replicas,
    make_train_step,
    plan_steps,
)
from flatjax.training.steps import cross_entropy

__all__ = ["load_runs", "run_dataset", "run_matched_sgd", "run_study", "train_seeds"]


def _batch_layout(config) -> dict:
    return algorithms.get(config.algorithm).batch_shape(config)


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
        if algorithms.get(c.algorithm).needs_measurement(c):
            # The authors' balanced γ_0: the mean training loss over the training set.
            balance = [{"image": x, "label": y}]
        states.append(create_train_state(c, model, info, jax.random.PRNGKey(s), plan=plan,
                                         balance_batches=balance))
    leaves = lambda st: (st.step, st.params, st.batch_stats, st.opt_state, st.rng,  # noqa: E731
                         st.hparams)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[leaves(st) for st in states])
    state = states[0].replace(step=stacked[0], params=stacked[1], batch_stats=stacked[2],
                              opt_state=stacked[3], rng=stacked[4], hparams=stacked[5])
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


class _Measure:
    """Evaluation, local energy and local entropy of the networks of one testbed."""

    def __init__(self, model, splits, settings, testbed):
        self.model = model
        self.splits = splits
        self.settings = settings
        self.testbed = testbed
        # One eval-mode function object: flatjax.local_energy caches its program on it.
        self.apply_eval = lambda v, x: model.apply(v, x, train=False)

    def errors(self, state, variables):
        out = {}
        for split, (x, y) in self.splits.items():
            out[f"{split}_error"] = evaluate(self.model.apply, variables, x, y)["error"]
        if algorithms.get(state.algorithm).has_replicas:
            x, y = self.splits["test"]
            reps = evaluate_replicas(self.model.apply, {"params": state.params}, x, y)
            out["test_replica_error_mean"] = float(np.mean(reps["replica_error"]))
            out["test_ensemble_error"] = reps["ensemble_error"]
        return out

    def local_energy(self, variables, sigmas, seed):
        x, y = self.splits["train"]
        m = self.testbed["local_energy_examples"] or len(y)
        le = flatjax.local_energy(
            self.apply_eval, variables, (x[:m], y[:m]), sigmas,
            key=jax.random.PRNGKey(10_000 + seed), num_draws=self.settings["num_draws"],
        )
        return {"sigmas": [float(s) for s in le.sigmas], "delta_e": [float(v) for v in le.mean],
                "stderr": [float(v) for v in le.stderr], "train_error_base": float(le.base)}

    def local_entropy(self, variables, seed):
        opts = self.testbed["local_entropy"]
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


def _network_record(name, algorithm, budget, lr, seed, state, finite, loss, facts, measure,
                    sigmas, with_entropy):
    record = {"dataset": name, "algorithm": algorithm, "budget": budget,
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


def _setup(name, settings):
    testbed = settings["testbeds"][name]
    dataset = testbed["dataset"]
    info = fdata.get_info(dataset)
    model = models.get_model(testbed["model"], info.num_classes)
    splits = {
        "train": fdata.load_arrays(dataset, "train", validation_fraction=VALIDATION_FRACTION),
        "validation": fdata.load_arrays(dataset, "validation",
                                        validation_fraction=VALIDATION_FRACTION),
        "test": fdata.load_arrays(dataset, "test"),
    }
    return testbed, model, splits, _Measure(model, splits, settings, testbed)


def run_matched_sgd(name: str, settings: dict, records: list[dict], setup=None) -> list[dict]:
    """SGD with the gradient evaluations of eSGD's and rSGD's equal-epoch runs.

    SGD at its selected learning rate (from ``records``' main networks),
    trained for L × and y × the testbed's epochs (budget ``"gradients"``,
    cosine schedule over the longer run): the equal-gradient baseline of each
    equal-epoch run. Records carry ``budget = "matched"`` and ``matched_to``.
    """
    testbed, model, splits, measure = setup or _setup(name, settings)
    seeds = testbed["seeds"]
    lr = next(r["learning_rate"] for r in records
              if r["dataset"] == name and r["algorithm"] == "sgd" and r.get("main"))
    out = []
    for algorithm, factor in (("esgd", INNER_STEPS), ("rsgd", NUM_REPLICAS)):
        epochs = factor * float(testbed["epochs"])
        config = make_config(testbed, "sgd", "gradients", lr, epochs=epochs)
        _log(f"{name} sgd lr={lr}, {epochs:g} epochs (the gradients of {algorithm} at equal "
             f"epochs): training {len(seeds)} seeds")
        states, finite, losses, facts = train_seeds(config, model, splits["train"], seeds)
        for s, st, f, lo in zip(seeds, states, finite, losses, strict=True):
            rec = _network_record(name, "sgd", "matched", lr, s, st, f, lo, facts, measure,
                                  settings["sigmas"], False)
            out.append({**rec, "main": True, "selected": True, "matched_to": algorithm})
    return out


def run_dataset(name: str, settings: dict) -> list[dict]:
    """Tuning grid, selection on validation, equal-epoch runs and measurements of one testbed.

    1. Every algorithm at every learning rate of the grid, at equal gradients,
       every seed; each network measured at ``grid_sigmas``.
    2. Per algorithm, the learning rate of lowest mean validation error
       (diverged runs rank last); the test set is used for no choice.
    3. The selected networks measured on the full ``sigmas`` curve (and local
       entropy where set), and eSGD/rSGD retrained at equal epochs.
    4. Where the testbed sets ``matched_sgd``: :func:`run_matched_sgd`.
    """
    testbed, model, splits, measure = _setup(name, settings)
    seeds = testbed["seeds"]
    grid_sigmas = settings["grid_sigmas"]
    records = []

    def train(algorithm, budget, lr):
        config = make_config(testbed, algorithm, budget, lr)
        _log(f"{name} {algorithm} budget={budget} lr={lr}: training {len(seeds)} seeds")
        return train_seeds(config, model, splits["train"], seeds)

    trained = {}
    for algorithm in ALGORITHMS:
        for lr in testbed["learning_rates"]:
            trained[algorithm, lr] = train(algorithm, "gradients", lr)
            states, finite, losses, facts = trained[algorithm, lr]
            for s, st, f, lo in zip(seeds, states, finite, losses, strict=True):
                records.append(_network_record(name, algorithm, "gradients", lr, s, st, f, lo,
                                               facts, measure, grid_sigmas, False))
    selected = {}
    for algorithm in ALGORITHMS:
        def val(lr, algorithm=algorithm):
            rows = [r for r in records if r["algorithm"] == algorithm and r["learning_rate"] == lr]
            if not all(r["finite"] for r in rows):
                return float("inf")
            return float(np.mean([r["validation_error"] for r in rows]))

        selected[algorithm] = min(testbed["learning_rates"], key=val)
        _log(f"{name} {algorithm}: selected lr={selected[algorithm]} on validation")
    for algorithm in ALGORITHMS:
        lr = selected[algorithm]
        states, finite, losses, facts = trained[algorithm, lr]
        for s, st, f, lo in zip(seeds, states, finite, losses, strict=True):
            rec = _network_record(name, algorithm, "gradients", lr, s, st, f, lo, facts,
                                  measure, settings["sigmas"], True)
            rec["main"] = True
            records.append(rec)
        if algorithm == "sgd":
            continue  # SGD's equal-epoch run is its equal-gradient run
        states, finite, losses, facts = train(algorithm, "epochs", lr)
        for s, st, f, lo in zip(seeds, states, finite, losses, strict=True):
            rec = _network_record(name, algorithm, "epochs", lr, s, st, f, lo, facts,
                                  measure, settings["sigmas"], False)
            rec["main"] = True
            records.append(rec)
        _log(f"{name} {algorithm}: main networks measured")
    for r in records:
        r["selected"] = r["learning_rate"] == selected[r["algorithm"]]
        r.setdefault("main", False)
    if testbed.get("matched_sgd"):
        records += run_matched_sgd(name, settings, records, (testbed, model, splits, measure))
    return records


def load_runs(out: str) -> tuple[list[dict], dict]:
    """``runs.json`` and ``meta.json`` of ``out`` (empty when absent).

    ``meta`` is ``{"testbeds": {name: {"settings", "command", "wall_time_s",
    "started_utc", "machine"}}}``: each testbed keeps the settings and command
    of the run that produced its records.
    """
    records, meta = [], {"testbeds": {}}
    if os.path.exists(os.path.join(out, "runs.json")):
        with open(os.path.join(out, "runs.json")) as f:
            records = json.load(f)
    if os.path.exists(os.path.join(out, "meta.json")):
        with open(os.path.join(out, "meta.json")) as f:
            meta = json.load(f)
    return records, meta


def _save(out, records, meta):
    with open(os.path.join(out, "runs.json"), "w") as f:
        json.dump(records, f, indent=1)
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


def run_study(out: str, *, quick: bool = False, datasets=None, command: str = "") -> None:
    """Trains and measures every network of the chosen testbeds into ``out``.

    Records and meta data of other testbeds already in ``out`` are kept, so
    one testbed can be rerun alone; those of the chosen testbeds are
    replaced, each saved as soon as it is done.
    """
    settings = study_settings(quick, datasets)
    os.makedirs(out, exist_ok=True)
    records, meta = load_runs(out)
    if "testbeds" not in meta:  # written by another version of the study
        records, meta = [], {"testbeds": {}}
    machine = (f"{platform.machine()} CPU, {os.cpu_count()} cores (shared with other jobs), "
               f"jax {jax.__version__} on {jax.default_backend()}")
    for name in settings["datasets"]:
        started = time.time()
        new = run_dataset(name, settings)
        records = [r for r in records if r["dataset"] != name] + new
        own = {k: v for k, v in settings.items() if k not in ("datasets", "testbeds")}
        meta["testbeds"][name] = {
            "settings": {**own, "datasets": [name], "testbeds": {name: settings["testbeds"][name]}},
            "command": command, "wall_time_s": time.time() - started,
            "started_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
            "machine": machine}
        _save(out, records, meta)
