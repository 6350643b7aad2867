"""Tests of flatjax.training: config, state, train steps, evaluation, the loop, NaN policy."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flatjax
from flatjax import training
from flatjax.training import (
    NonFiniteError,
    TrainState,
    array_source,
    base_config,
    create_train_state,
    eval_params,
    eval_variables,
    evaluate,
    evaluate_replicas,
    make_train_step,
    plan_steps,
    train_and_evaluate,
    validate_config,
)
from tests.helpers import TinyBNMLP, TinyMLP, blobs

DIM, BATCH = 8, 32


def tiny_config(algorithm="sgd", **overrides):
    config = base_config()
    config.algorithm = algorithm
    config.batch_size = BATCH
    config.num_epochs = 2
    config.learning_rate = 0.05
    config.progress = False
    config.esgd.inner_steps = 3
    config.esgd.coupling = 0.1
    config.esgd.coupling_factor = 10.0
    config.rsgd.coupling = 0.1
    config.rsgd.coupling_factor = 10.0
    for key, value in overrides.items():
        node, *path = key.split("__")
        target = config
        for part in [node, *path][:-1]:
            target = target[part]
        target[[node, *path][-1]] = value
    return config


@pytest.fixture(scope="module")
def blob_data():
    x, y = blobs(n=384, dim=DIM, seed=0)
    return (x[:256], y[:256]), (x[256:], y[256:])


def _source(blob_data, batch_size=BATCH, seed=0):
    train, test = blob_data
    return array_source(train, test, num_classes=2, batch_size=batch_size, seed=seed)


INFO = {"input_shape": (DIM,), "num_train": 256, "num_classes": 2}


# ----------------------------------------------------------------------------- config


CONTRACT = (
    "dataset data_dir validation_fraction model model_kwargs algorithm batch_size num_epochs "
    "budget learning_rate lr_schedule momentum nesterov weight_decay seed augment "
    "eval_every_epochs checkpoint_every_epochs keep_checkpoints nan_policy progress"
).split()
ESGD = "inner_steps inner_learning_rate noise average inner_weight_decay coupling " \
    "coupling_factor coupling_max mode batch_norm".split()
RSGD = "num_replicas coupling coupling_factor coupling_schedule coupling_per strategy " \
    "center_batch_stats".split()


def test_base_config_has_every_contract_field_and_is_valid():
    config = base_config()
    for name in CONTRACT:
        assert name in config, name
    for name in ESGD:
        assert name in config.esgd, name
    for name in RSGD:
        assert name in config.rsgd, name
    assert {"sigmas", "num_draws", "batch_size"} <= set(config.flatness)
    assert (config.dataset, config.model) == ("mnist5k", "lenet5")
    validate_config(config)
    config.esgd.coupling = None  # None = calibrated/balanced γ_0
    config.rsgd.coupling = 2.0
    validate_config(config)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("algorithm", "adam", "config.algorithm must be one of"),
        ("batch_size", 0, "config.batch_size must be an integer > 0"),
        ("dataset", "", "config.dataset must be a dataset name"),
        ("num_epochs", -1.0, "config.num_epochs must be a number > 0"),
        ("budget", "steps", "config.budget must be one of 'epochs', 'gradients'"),
        ("lr_schedule", "step", "config.lr_schedule"),
        ("learning_rate", 0.0, "config.learning_rate"),
        ("momentum", 1.0, "config.momentum must be a number in [0, 1)"),
        ("nan_policy", "ignore", "config.nan_policy"),
        ("validation_fraction", 1.0, "config.validation_fraction"),
        ("keep_checkpoints", 0, "config.keep_checkpoints"),
        ("esgd__mode", "jit", "config.esgd.mode"),
        ("esgd__batch_norm", "none", "config.esgd.batch_norm"),
        ("esgd__inner_steps", 0, "config.esgd.inner_steps"),
        ("esgd__average", 1.0, "config.esgd.average"),
        ("esgd__coupling_factor", 0.5, "config.esgd.coupling_factor"),
        ("rsgd__num_replicas", 0, "config.rsgd.num_replicas"),
        ("rsgd__strategy", "pmap", "config.rsgd.strategy"),
        ("rsgd__coupling_schedule", "step", "config.rsgd.coupling_schedule"),
        ("rsgd__center_batch_stats", "median", "config.rsgd.center_batch_stats"),
        ("rsgd__coupling", -1.0, "config.rsgd.coupling must be a number > 0 or None"),
    ],
)
def test_validate_config_rejects_bad_values(field, value, message):
    config = tiny_config(**{field: value}) if "__" in field else tiny_config()
    if "__" not in field:
        config[field] = value
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        validate_config(config)


@pytest.mark.parametrize(
    "algorithm, mode, budget, steps, grads",
    [
        ("sgd", "scan", "epochs", 40, 1),
        ("sgd", "scan", "gradients", 40, 1),
        ("entropy_sgd", "scan", "epochs", 40, 4),
        ("entropy_sgd", "scan", "gradients", 10, 4),
        ("entropy_sgd", "stepwise", "epochs", 160, 1),
        ("entropy_sgd", "stepwise", "gradients", 40, 1),
        ("replicated_sgd", "scan", "epochs", 40, 2),
        ("replicated_sgd", "scan", "gradients", 20, 2),
    ],
)
def test_plan_steps_counts_outer_steps_and_gradient_evaluations(
    algorithm, mode, budget, steps, grads
):
    # N/B = 20 minibatches per epoch, 2 epochs, L = 4, y = 2.
    config = tiny_config(algorithm, budget=budget, esgd__mode=mode, esgd__inner_steps=4,
                         rsgd__num_replicas=2)
    plan = plan_steps(config, 20)
    assert (plan.total_steps, plan.grads_per_step) == (steps, grads)
    if budget == "gradients":  # every algorithm gets SGD's 2 epochs of gradients
        assert plan.total_steps * plan.grads_per_step == 40
    assert plan.eval_every == round(plan.steps_per_epoch)


def test_plan_steps_rejects_a_training_set_smaller_than_a_batch():
    with pytest.raises(ValueError, match="smaller than one batch of 32"):
        plan_steps(tiny_config(), 0)


# ----------------------------------------------------------------------------- state


def test_apply_gradients_forwards_extra_keyword_arguments():
    seen = {}

    def update(updates, state, params=None, *, scale=1.0, **extra):
        seen["scale"] = scale
        return jax.tree.map(lambda g: -scale * g, updates), state

    tx = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    params = jnp.ones(2)
    state = TrainState(step=jnp.int32(0), params=params, batch_stats={}, opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(0), apply_fn=None, tx=tx)
    state = state.apply_gradients(grads=jnp.ones(2), scale=0.25)
    assert seen["scale"] == 0.25
    np.testing.assert_allclose(state.params, [0.75, 0.75])
    assert int(state.step) == 1


def test_eval_params_picks_params_anchor_and_center():
    sgd = create_train_state(tiny_config(), TinyMLP(), INFO, jax.random.PRNGKey(0))
    assert eval_params(sgd) is sgd.params

    config = tiny_config("entropy_sgd", esgd__mode="stepwise")
    esgd = create_train_state(config, TinyMLP(), INFO, jax.random.PRNGKey(0))
    x0 = esgd.params
    walked = jax.jit(lambda s: s.apply_gradients(grads=jax.tree.map(jnp.ones_like, x0)))(esgd)
    # One Langevin step moved the walker (the loop's params), not the anchor x.
    assert not np.allclose(walked.params["Dense_0"]["kernel"], x0["Dense_0"]["kernel"])
    jax.tree.map(np.testing.assert_array_equal, eval_params(walked), x0)

    config = tiny_config("replicated_sgd", rsgd__num_replicas=3)
    rsgd = create_train_state(config, TinyMLP(), INFO, jax.random.PRNGKey(0))
    kernel = rsgd.params["Dense_0"]["kernel"]
    assert kernel.shape == (3, DIM, 16)
    np.testing.assert_allclose(eval_params(rsgd)["Dense_0"]["kernel"], kernel.mean(0), rtol=1e-6)


def test_eval_variables_averages_or_recomputes_center_batch_stats(blob_data):
    config = tiny_config("replicated_sgd", rsgd__num_replicas=2)
    state = create_train_state(config, TinyBNMLP(), INFO, jax.random.PRNGKey(0))
    stats = jax.tree.map(lambda s: s + jnp.arange(2.0).reshape(2, 1), state.batch_stats)
    state = state.replace(batch_stats=stats)
    avg = eval_variables(state)["batch_stats"]["BatchNorm_0"]["mean"]
    np.testing.assert_allclose(avg, 0.5 * np.ones(16))

    x = blob_data[0][0][:64]
    out = eval_variables(state, center_batch_stats="recompute", batches=[{"image": x}])
    center = eval_params(state)
    hidden = x @ np.asarray(center["Dense_0"]["kernel"]) + np.asarray(center["Dense_0"]["bias"])
    np.testing.assert_allclose(out["batch_stats"]["BatchNorm_0"]["mean"], hidden.mean(0),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="needs batches="):
        eval_variables(state, center_batch_stats="recompute")
    with pytest.raises(ValueError, match="'average' or 'recompute'"):
        eval_variables(state, center_batch_stats="mean")


def test_create_train_state_needs_batches_for_balanced_rsgd_coupling():
    config = tiny_config("replicated_sgd", rsgd__coupling=None)
    with pytest.raises(ValueError, match="needs balance_batches="):
        create_train_state(config, TinyMLP(), INFO, jax.random.PRNGKey(0))


def test_balanced_rsgd_coupling_is_twice_the_authors_g0_over_the_batches(blob_data):
    # γ_0 = 2 g_0, g_0 = mean_a L_train(wᵃ) / mean_a ‖wᵃ − c‖², the loss averaged over
    # every example of the given batches with the networks in evaluation mode.
    config = tiny_config("replicated_sgd", rsgd__coupling=None)
    x, y = blob_data[0]
    batches = [{"image": x[:40], "label": y[:40]}, {"image": x[40:60], "label": y[40:60]}]
    state = create_train_state(
        config, TinyMLP(), INFO, jax.random.PRNGKey(0), balance_batches=batches
    )
    params = state.params
    xs, ys = x[:60], y[:60]
    losses = [
        float(optax.softmax_cross_entropy_with_integer_labels(
            TinyMLP().apply({"params": jax.tree.map(lambda l, a=a: l[a], params)}, xs,
                            train=False), ys).mean())
        for a in range(config.rsgd.num_replicas)
    ]
    center = flatjax.replica_center(params)
    dist = np.mean([
        sum(float(np.sum((np.asarray(w[a]) - np.asarray(c)) ** 2))
            for w, c in zip(jax.tree.leaves(params), jax.tree.leaves(center), strict=True))
        for a in range(config.rsgd.num_replicas)
    ])
    assert float(state.opt_state.requested_coupling) == pytest.approx(
        2 * np.mean(losses) / dist, rel=1e-5
    )


# ----------------------------------------------------------------------------- train step


def test_sgd_step_equals_a_hand_written_optax_step(blob_data):
    config = tiny_config(weight_decay=1e-3)
    state = create_train_state(config, TinyMLP(), INFO, jax.random.PRNGKey(1))
    x, y = blob_data[0][0][:BATCH], blob_data[0][1][:BATCH]
    new, metrics = make_train_step(config)(state, {"image": x, "label": y})

    def loss_fn(params):
        logits = TinyMLP().apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jax.grad(loss_fn)(state.params)
    tx = optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.05, 0.9, nesterov=True))
    updates, _ = tx.update(grads, tx.init(state.params), state.params)
    expected = optax.apply_updates(state.params, updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 new.params, expected)
    np.testing.assert_allclose(metrics["loss"], loss_fn(state.params), rtol=1e-5)
    assert int(new.step) == 1 and bool(metrics["finite"])


STEP_CASES = {
    "sgd": ({}, None),
    "esgd_scan": ({"esgd__mode": "scan"}, 3),
    "esgd_stepwise": ({"esgd__mode": "stepwise"}, None),
    "esgd_scan_calibrated": ({"esgd__mode": "scan", "esgd__coupling": None}, 3),
    "esgd_scan_bn_walker": ({"esgd__mode": "scan", "esgd__batch_norm": "walker"}, 3),
    "esgd_scan_bn_anchor": ({"esgd__mode": "scan", "esgd__batch_norm": "anchor"}, 3),
    "esgd_stepwise_bn_anchor": ({"esgd__mode": "stepwise", "esgd__batch_norm": "anchor"}, None),
    "rsgd": ({"rsgd__num_replicas": 2}, None),
    "rsgd_bn_average": ({"rsgd__num_replicas": 2}, None),
}


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_train_step_lowers_the_loss(case, blob_data):
    overrides, stack = STEP_CASES[case]
    algorithm = {"sgd": "sgd", "rsgd": "replicated_sgd"}.get(case.split("_")[0], "entropy_sgd")
    model = TinyBNMLP() if "_bn_" in case else TinyMLP()
    config = tiny_config(algorithm, **overrides)
    data = _source(blob_data)
    shape = {"stack": stack} if stack else {}
    if algorithm == "replicated_sgd":
        shape = {"num_replicas": 2}
    state = create_train_state(config, model, INFO, jax.random.PRNGKey(0))
    (xt, yt) = data.eval_arrays
    before = evaluate(state.apply_fn, eval_variables(state), xt, yt)["loss"]
    step = make_train_step(config)
    batches = data.train_batches(0, **shape)
    for _ in range(72 if "stepwise" in case else 24):  # stepwise: 1 of L inner steps
        state, metrics = step(state, next(batches))
    after = evaluate(state.apply_fn, eval_variables(state), xt, yt)["loss"]
    assert after < 0.75 * before, (before, after)
    assert bool(metrics["finite"])
    if algorithm != "sgd":
        assert float(metrics["coupling"]) > 0
    if "_bn_" in case:  # running statistics moved away from their init (mean 0)
        mean = state.batch_stats["BatchNorm_0"]["mean"]
        assert mean.shape == ((2, 16) if algorithm == "replicated_sgd" else (16,))
        assert float(jnp.abs(mean).max()) > 1e-3


def test_esgd_scan_mode_equals_stepwise_mode_run_l_times(blob_data):
    data = _source(blob_data)
    scan_cfg = tiny_config("entropy_sgd", esgd__mode="scan", esgd__noise=0.0)
    step_cfg = tiny_config("entropy_sgd", esgd__mode="stepwise", esgd__noise=0.0)
    s_scan = create_train_state(scan_cfg, TinyMLP(), INFO, jax.random.PRNGKey(0))
    s_step = create_train_state(step_cfg, TinyMLP(), INFO, jax.random.PRNGKey(0))
    s_scan, _ = make_train_step(scan_cfg)(s_scan, next(data.train_batches(0, stack=3)))
    step = make_train_step(step_cfg)
    for _, batch in zip(range(3), data.train_batches(0), strict=False):
        s_step, _ = step(s_step, batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 eval_params(s_scan), eval_params(s_step))


def test_esgd_scan_mode_carries_walker_batch_norm_like_stepwise_mode(blob_data):
    # 'walker' BatchNorm: the statistics follow the L walker forward passes.
    # Scan mode threads them through grad_fn's aux; stepwise mode gets them
    # from its own loop. The anchor and the statistics must agree.
    data = _source(blob_data)
    kw = dict(esgd__noise=0.0, esgd__batch_norm="walker")
    scan_cfg = tiny_config("entropy_sgd", esgd__mode="scan", **kw)
    step_cfg = tiny_config("entropy_sgd", esgd__mode="stepwise", **kw)
    s_scan = create_train_state(scan_cfg, TinyBNMLP(), INFO, jax.random.PRNGKey(0))
    s_step = create_train_state(step_cfg, TinyBNMLP(), INFO, jax.random.PRNGKey(0))
    s_scan, m_scan = make_train_step(scan_cfg)(s_scan, next(data.train_batches(0, stack=3)))
    step = make_train_step(step_cfg)
    losses = []
    for _, batch in zip(range(3), data.train_batches(0), strict=False):
        s_step, m = step(s_step, batch)
        losses.append(float(m["loss"]))
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    jax.tree.map(close, eval_params(s_scan), eval_params(s_step))
    jax.tree.map(close, s_scan.batch_stats, s_step.batch_stats)
    # the scan step's loss is the mean over the L minibatches it used
    np.testing.assert_allclose(float(m_scan["loss"]), np.mean(losses), rtol=1e-5)


# ----------------------------------------------------------------------------- NaN policy


def _nan_batch(x, y):
    x = np.array(x)
    x[0, 0] = np.nan
    return {"image": x, "label": y}


@pytest.mark.parametrize("algorithm", ["sgd", "replicated_sgd"])
def test_nan_policy_skip_keeps_params_and_advances_step(algorithm, blob_data):
    config = tiny_config(algorithm, nan_policy="skip", rsgd__num_replicas=2)
    state = create_train_state(config, TinyMLP(), INFO, jax.random.PRNGKey(0))
    x, y = blob_data[0][0][:BATCH], blob_data[0][1][:BATCH]
    batch = _nan_batch(x, y)
    if algorithm == "replicated_sgd":
        batch = {k: np.stack([v, v]) for k, v in batch.items()}
    new, metrics = make_train_step(config)(state, batch)
    assert not bool(metrics["finite"])
    assert int(new.step) == 1
    jax.tree.map(np.testing.assert_array_equal, new.params, state.params)
    jax.tree.map(np.testing.assert_array_equal, new.opt_state, state.opt_state)


def test_nan_policy_stop_raises_naming_step_and_metric(blob_data, tmp_path):
    (x, y), test = blob_data
    x = np.array(x)
    config = tiny_config(num_epochs=1, log_every_steps=2)
    data = array_source((x, y), test, num_classes=2, batch_size=BATCH)
    # Poison exactly the example that batch 5 (step 5) draws first.
    order = np.random.default_rng([0, 0, 0]).permutation(len(y))
    x[order[4 * BATCH], 0] = np.inf
    data = array_source((x, y), test, num_classes=2, batch_size=BATCH)
    with pytest.raises(NonFiniteError, match="diverged at step 5: loss = nan"):
        train_and_evaluate(config, tmp_path, model=TinyMLP(), data=data)
    # Nothing after the divergence was checkpointed.
    assert not os.path.exists(tmp_path / "checkpoints" / "8")


def test_check_finite_names_replica_distance():
    with pytest.raises(NonFiniteError, match="replica_distance = inf"):
        training.check_finite({"loss": 1.0, "grad_norm": 1.0, "replica_distance": np.inf}, 3)


# ----------------------------------------------------------------------------- evaluation


def test_evaluate_matches_numpy_and_ensemble_of_equal_replicas(blob_data):
    x, y = blob_data[1]
    model = TinyMLP()
    variables = model.init(jax.random.PRNGKey(3), x[:1])
    logits = np.asarray(model.apply(variables, x))
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    out = evaluate(model.apply, variables, x, y, batch_size=50)  # 128 = 50 + 50 + 28 (padded)
    np.testing.assert_allclose(out["loss"], -logp[np.arange(len(y)), y].mean(), rtol=1e-5)
    assert out["error"] == pytest.approx(100 * np.mean(logits.argmax(1) != y))

    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), variables)
    rep = evaluate_replicas(model.apply, stacked, x, y, batch_size=50)
    assert rep["replica_error"] == [out["error"]] * 2
    np.testing.assert_allclose(rep["ensemble_loss"], out["loss"], rtol=1e-5)
    with pytest.raises(ValueError, match="empty dataset"):
        evaluate(model.apply, variables, x[:0], y[:0])


# ----------------------------------------------------------------------------- loop


def test_train_and_evaluate_writes_metrics_final_json_curves_and_tensorboard(blob_data, tmp_path):
    config = tiny_config("replicated_sgd", rsgd__num_replicas=2, rsgd__coupling=None)
    out = train_and_evaluate(config, tmp_path, model=TinyMLP(), data=_source(blob_data))
    rows = training.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1.0, 2.0]
    expected = {"epoch", "step", "grad_evals", "effective_epochs", "train_loss", "train_error",
                "test_loss", "test_error", "coupling", "wall_time", "replica_distance",
                "test_replica_error", "test_ensemble_error"}
    assert expected <= set(rows[-1])
    # 8 steps per epoch, y = 2 gradients each.
    assert (rows[-1]["step"], rows[-1]["grad_evals"], rows[-1]["effective_epochs"]) == (16, 32, 4.0)
    assert len(rows[-1]["test_replica_error"]) == 2
    assert rows[-1]["test_error"] < 10.0
    with open(tmp_path / "final.json") as f:
        final = json.load(f)
    assert final["test_error"] == out["test_error"] and final["center_trained"] is True
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert any(n.startswith("events.out") for n in os.listdir(tmp_path / "tensorboard"))
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["algorithm"] == "replicated_sgd"


def test_train_and_evaluate_rejects_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="cannot be created or written"):
        train_and_evaluate(tiny_config(), blocker / "run", model=TinyMLP(), data=None)


def test_train_and_evaluate_rejects_a_workdir_of_another_config(blob_data, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(json.loads(tiny_config().to_json())))
    config = tiny_config("replicated_sgd")
    with pytest.raises(training.ConfigMismatchError, match="algorithm: saved 'sgd'"):
        train_and_evaluate(config, tmp_path, model=TinyMLP(), data=_source(blob_data))


def test_flatjax_exports_training_helpers_used_by_the_loop():
    for name in ("entropy_sgd_coupling", "replicate_coupling", "replica_map", "init_replicas"):
        assert hasattr(flatjax, name)


@pytest.mark.parametrize("schedule", ["exponential", "linear", "cosine"])
@pytest.mark.parametrize("per", ["epoch", "step"])
def test_rsgd_coupling_grows_towards_the_factor_over_the_run(schedule, per):
    # 16 steps, 8 per epoch, γ_0 = 0.1, factor 100; update t applies γ(t), t = 0..15.
    config = tiny_config("replicated_sgd", rsgd__coupling_schedule=schedule, rsgd__coupling_per=per,
                         rsgd__coupling=0.1, rsgd__coupling_factor=100.0)
    plan = plan_steps(config, 8)
    tx = training.make_optimizer(config, plan)
    params = jnp.zeros((3, 2))
    state = tx.init(params)
    gammas = []
    for _ in range(plan.total_steps):
        _, state = tx.update(jnp.zeros_like(params), state, params)
        gammas.append(float(flatjax.replicate_coupling(state)))
    assert gammas[0] == pytest.approx(0.1)
    assert all(b >= a for a, b in zip(gammas, gammas[1:], strict=False)) and gammas[-1] < 10.0
    assert len(set(gammas)) == (2 if per == "epoch" else 16)
    if schedule == "exponential":
        last = 0.1 * 100 ** (0.5 if per == "epoch" else 15 / 16)
        assert gammas[-1] == pytest.approx(last, rel=1e-4)


def test_train_state_create_runs_each_transform_and_evaluates_the_right_params():
    from flatjax.training import TrainState

    w = jnp.array([1.0, -2.0])
    grad_fn = lambda p, i: 2 * p  # noqa: E731
    esgd = TrainState.create(apply_fn=None, params=w, algorithm="entropy_sgd",
                             tx=flatjax.entropy_sgd_stepwise(0.5, inner_steps=2, noise=0.0))
    for _ in range(2):
        esgd = esgd.apply_gradients(grads=grad_fn(esgd.params, 0))
    assert int(esgd.opt_state.count) == 1
    np.testing.assert_allclose(eval_params(esgd), flatjax.entropy_sgd_eval_params(
        esgd.opt_state, esgd.params))
    replicas = jnp.stack([w, -w])
    rsgd = TrainState.create(apply_fn=None, params=replicas, algorithm="replicated_sgd",
                             tx=flatjax.replicated_sgd(0.1, 2, coupling=1.0))
    rsgd = rsgd.apply_gradients(grads=2 * rsgd.params)
    np.testing.assert_allclose(eval_params(rsgd), rsgd.params.mean(0), rtol=1e-6)
    assert rsgd.batch_stats == {} and rsgd.rng.shape == (2,)
    with pytest.raises(ValueError, match="algorithm must be"):
        TrainState.create(apply_fn=None, params=w, tx=optax.sgd(0.1), algorithm="adam")


def _read_event_scalars(directory) -> dict:
    """{tag: [(step, value)]} from TensorBoard event files (TFRecord framing)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict = {}
    for name in sorted(os.listdir(directory)):
        if not name.startswith("events.out"):
            continue
        data = (directory / name).read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_puts_every_algorithm_on_the_gradient_evaluation_axis(blob_data, tmp_path):
    runs = {
        "sgd": tiny_config("sgd"),
        "entropy_sgd": tiny_config("entropy_sgd"),
        "replicated_sgd": tiny_config("replicated_sgd", rsgd__num_replicas=2),
    }
    last = {}
    for name, config in runs.items():
        workdir = tmp_path / name
        train_and_evaluate(config, workdir, model=TinyMLP(), data=_source(blob_data))
        rows = training.read_metrics(workdir / "metrics.jsonl")
        events = _read_event_scalars(workdir / "tensorboard")
        # Grouped tags; x-axis = gradient evaluations; by_step/ keeps the steps.
        assert [s for s, _ in events["test/error"]] == [r["grad_evals"] for r in rows]
        assert [s for s, _ in events["by_step/test/error"]] == [r["step"] for r in rows]
        np.testing.assert_allclose([v for _, v in events["test/error"]],
                                   [r["test_error"] for r in rows], rtol=1e-6)
        assert "train/loss" in events and "optimizer/coupling" in events
        # Per-step scalars every log_every_steps steps, on the same axis.
        steps = [s for s, _ in events["by_step/train_step/loss"]]
        evals = {r["step"] for r in rows}  # the loop also fetches at evaluations
        assert steps and all(s % config.log_every_steps == 0 or s in evals for s in steps)
        assert len(steps) == len(set(steps))
        per_step = rows[-1]["grad_evals"] // rows[-1]["step"]
        assert [s for s, _ in events["train_step/loss"]] == [s * per_step for s in steps]
        lr = dict(events["by_step/train_step/learning_rate"])
        assert lr[steps[0]] == pytest.approx(config.learning_rate, rel=1e-5)  # constant
        assert ("train_step/replica_distance" in events) == (name == "replicated_sgd")
        assert os.listdir(workdir / "tensorboard" / "hparams")  # the HParams tab's run
        last[name] = (rows[-1]["step"], events["test/error"][-1][0])
    # One step costs 1 (SGD), L = 3 (Entropy-SGD) or y = 2 (Replicated-SGD) gradients.
    assert {name: g // s for name, (s, g) in last.items()} == {
        "sgd": 1, "entropy_sgd": 3, "replicated_sgd": 2}


def test_untrained_center_is_flagged_not_reported():
    from flatjax.training.algorithms.replicated_sgd import untrained_center

    # The centre of unconverged replicas: far above them.
    why = untrained_center({"val_error": 73.0, "val_replica_error": [12.0, 15.0, 9.0]})
    assert "val error 73.0 %" in why and "12.0 %" in why and "\n" not in why
    # Within the margin, or no replicas: not flagged.
    assert untrained_center({"test_error": 8.0, "test_replica_error": [4.0, 5.0]}) is None
    assert untrained_center({"test_error": 90.0}) is None
