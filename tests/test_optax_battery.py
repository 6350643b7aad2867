"""optax's own battery for contrib optimizers, run against every flatjax transform.

Adapted from ``optax/contrib/_common_test.py`` (the installed optax 0.2.8)
only where the API requires it:

- Entropy-SGD's scan mode gets ``grad_fn`` (the objective's gradient, every
  inner step sees the same "minibatch") besides the usual gradient;
- Replicated-SGD's params carry a leading replica axis (y = 2 copies of the
  target, the second one shifted so that the coupling acts); the centre is
  what must converge;
- the evaluated network is the Entropy-SGD anchor (as the battery uses
  ``schedule_free_eval_params`` for schedule-free);
- integer hyperparameters (``inner_steps``, ``num_replicas``, ``seed``,
  ``calibration_step``) are ``static_args`` of ``inject_hyperparams``, as the
  battery does for ``warmup_steps``;
- the learning-rate schedule test runs whatever the annotation says.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import flatjax

# --- targets (the battery's four) ---------------------------------------------------------


def _parabola(dtype):
    final = jnp.array([1.0, -1.0, 1.0], dtype=dtype)
    return jnp.array([-1.0, 10.0, 1.0], dtype=dtype), final, lambda p: jnp.sum((p - final) ** 2)


def _rosenbrock(dtype):
    def obj(p):
        return (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2

    return jnp.array([0.0, 0.0], dtype=dtype), jnp.array([1.0, 1.0], dtype=dtype), obj


def _matrix_parabola(dtype):
    final = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype=dtype)
    return jnp.zeros((2, 2), dtype=dtype), final, lambda p: jnp.sum((p - final) ** 2)


def _mixed_tensor(dtype):
    f1 = jnp.array([1.0, -1.0, 2.0], dtype=dtype)
    f2 = jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype=dtype)

    def obj(p):
        return jnp.sum((p[0] - f1) ** 2) + jnp.sum((p[1] - f2) ** 2)

    return (jnp.zeros(3, dtype), jnp.zeros((2, 2), dtype)), (f1, f2), obj


TARGETS = {"parabola": _parabola, "rosenbrock": _rosenbrock,
           "matrix_parabola": _matrix_parabola, "mixed_tensor": _mixed_tensor}

# --- the transforms under test --------------------------------------------------------------

Y = 2
ESGD = dict(learning_rate=1.0, inner_steps=3, coupling=1.0, inner_learning_rate=1e-3,
            noise=0.0)
SPECS = {
    "entropy_sgd": dict(factory=flatjax.entropy_sgd, kwargs=ESGD, kind="scan",
                        static=("inner_steps", "seed", "calibration_step")),
    "entropy_sgd_stepwise": dict(factory=flatjax.entropy_sgd_stepwise, kwargs=ESGD,
                                 kind="stepwise",
                                 static=("inner_steps", "seed", "calibration_step")),
    "scale_by_entropy_sgd": dict(
        factory=flatjax.scale_by_entropy_sgd,
        kwargs=dict(inner_steps=3, coupling=1.0, inner_learning_rate=1e-3, noise=0.0),
        kind="scan_primitive", static=("inner_steps", "seed", "calibration_step")),
    "replicate": dict(
        factory=functools.partial(flatjax.replicate, optax.sgd(1e-3, 0.9, nesterov=True)),
        kwargs=dict(num_replicas=Y, coupling=1.0), kind="replicas", static=("num_replicas",)),
    "replicated_sgd": dict(factory=flatjax.replicated_sgd,
                           kwargs=dict(learning_rate=1e-3, num_replicas=Y, coupling=1.0),
                           kind="replicas", static=("num_replicas",)),
}
NAMES = list(SPECS)


def _build(name, **overrides):
    spec = SPECS[name]
    opt = spec["factory"](**{**spec["kwargs"], **overrides})
    if spec["kind"] == "scan_primitive":
        opt = optax.chain(opt, optax.sgd(1.0, momentum=0.9, nesterov=True))
    return opt


def _replicated(tree):
    """y = 2 replicas of a target: the target and a shifted copy."""
    return jax.tree.map(lambda x: jnp.stack([x, x + 0.5]), tree)


def _prepare(name, target_params, obj):
    """(initial params, gradient function of params, evaluated params fn) for ``name``."""
    if SPECS[name]["kind"] == "replicas":
        return (_replicated(target_params), jax.vmap(jax.grad(obj)),
                lambda params, state: flatjax.replica_center(params))
    return (target_params, jax.grad(obj),
            lambda params, state: flatjax.entropy_sgd_eval_params(state, params))


def _update(name, opt, grad_of, grads, state, params, **extra):
    if SPECS[name]["kind"] in ("scan", "scan_primitive"):
        extra["grad_fn"] = lambda w, i: grad_of(w)
    return opt.update(grads, state, params, **extra)


# --- the battery ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_optimizers_accept_extra_args(name):
    opt = _build(name)
    params0, _, obj = _rosenbrock(jnp.float32)
    params0, grad_of, _ = _prepare(name, params0, obj)
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        updates, state = _update(
            name, opt, grad_of, grad_of(params), state, params,
            unexpected_extra_args_your_optimizer_doesnt_expect=1,
        )
        return optax.apply_updates(params, updates), state

    params, state = params0, opt.init(params0)
    for _ in range(2):
        params, state = step(params, state)
    step(params0, opt.init(params0))
    assert len(traces) == 1, "the optimizer recompiles on a later call to update"


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("name", NAMES)
def test_optimizers(name, target):
    params0, final, obj = TARGETS[target](jnp.float32)
    opt = _build(name)
    params, grad_of, evaluated = _prepare(name, params0, obj)

    @jax.jit
    def run(params, state):
        def body(carry, _):
            params, state = carry
            updates, state = _update(name, opt, grad_of, grad_of(params), state, params)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(body, (params, state), length=30_000)[0]

    state = opt.init(params)
    state = optax.tree.map_params(opt, lambda v: v, state)  # tree_map_params works
    params, state = run(params, state)
    chex.assert_trees_all_close(evaluated(params, state), final, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("name", NAMES)
def test_optimizers_can_be_wrapped_in_inject_hyperparams(name):
    spec = SPECS[name]
    factory, hparams = spec["factory"], spec["kwargs"]
    opt = factory(**hparams)
    opt_inject = optax.inject_hyperparams(factory, static_args=spec["static"])(**hparams)
    params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
    grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]
    extra = {"grad_fn": lambda w, i: grads} if spec["kind"].startswith("scan") else {}
    updates, state = jax.jit(functools.partial(opt.update, **extra))(
        grads, jax.jit(opt.init)(params), params)
    updates_inject, state_inject = jax.jit(functools.partial(opt_inject.update, **extra))(
        grads, jax.jit(opt_inject.init)(params), params)
    chex.assert_trees_all_close(updates_inject, updates, rtol=1e-5)
    chex.assert_trees_all_close(state_inject.inner_state, state, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_injected_hyperparameters_change_without_recompiling(name):
    spec = SPECS[name]
    opt = optax.inject_hyperparams(spec["factory"], static_args=spec["static"])(**spec["kwargs"])
    params = jnp.stack([jnp.ones(3), -jnp.ones(3)])
    grads = jnp.ones_like(params)
    extra = {"grad_fn": lambda w, i: grads} if spec["kind"].startswith("scan") else {}
    traces = []

    @jax.jit
    def step(state):
        traces.append(1)
        return opt.update(grads, state, params, **extra)

    state = opt.init(params)
    couplings = []
    # Stepwise mode records γ_{t+1} when its outer step lands, every L calls.
    calls = spec["kwargs"]["inner_steps"] if spec["kind"] == "stepwise" else 1
    for gamma in (1.0, 0.25, 0.0):
        state.hyperparams["coupling"] = jnp.asarray(gamma, jnp.float32)
        for _ in range(calls):
            updates, state = step(state)
        inner = state.inner_state
        found = [s for s in jax.tree.leaves(
            inner, is_leaf=lambda s: isinstance(s, (flatjax.EntropySGDState,
                                                    flatjax.ReplicateState)))
            if isinstance(s, (flatjax.EntropySGDState, flatjax.ReplicateState))]
        couplings.append(float(found[0].requested_coupling))
    assert len(traces) == 1
    if spec["kind"] == "replicas":
        assert couplings == pytest.approx([1.0, 0.25, 0.0])
    else:  # the coupling γ_{t+1} the next outer step uses
        assert couplings[1] == pytest.approx(0.25) and couplings[2] == pytest.approx(0.0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_preserve_dtype(name, dtype):
    opt = _build(name)
    params, grad_of, _ = _prepare(name, jnp.array([1.0, 2.0], dtype), lambda x: jnp.sum(x**2))
    state = jax.jit(opt.init)(params)
    updates, _ = jax.jit(functools.partial(_update, name, opt, grad_of))(
        grad_of(params), state, params)
    assert updates.dtype == params.dtype


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_gradient_accumulation(name, dtype):
    opt = optax.MultiSteps(_build(name), every_k_schedule=4)
    params, grad_of, _ = _prepare(name, jnp.array([1.0, 2.0], dtype), lambda x: jnp.sum(x**2))
    grads = grad_of(params)
    state = jax.jit(opt.init)(params)
    extra = {"grad_fn": lambda w, i: grad_of(w)} if SPECS[name]["kind"].startswith("scan") else {}
    updates, _ = jax.jit(functools.partial(opt.update, **extra))(grads, state, params)
    chex.assert_trees_all_equal(updates, jnp.zeros_like(grads))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
@pytest.mark.parametrize("name", NAMES)
def test_state_shape_dtype_shard_stability(name, dtype):
    with jax.enable_x64(dtype == jnp.float64):
        opt = _build(name)
        params0, _, obj = _parabola(dtype)
        params, grad_of, _ = _prepare(name, params0, obj)

        @jax.jit
        def step(params, state):
            grads = grad_of(params)
            cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
            updates, state = jax.lax.cond(
                cond, lambda: _update(name, opt, grad_of, grads, state, params),
                lambda: (params, state))
            return optax.apply_updates(params, updates), state

        state = opt.init(params)
        for _ in range(2):
            params, new_state = step(params, state)
            assert jax.tree.leaves(params)[0].dtype == dtype
            cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
            state = jax.lax.cond(cond, lambda: state, lambda: new_state)  # noqa: B023


@pytest.mark.parametrize("hparam", ["learning_rate", "coupling"])
@pytest.mark.parametrize("name", NAMES)
def test_schedules_equal_constants(name, hparam):
    if hparam not in SPECS[name]["kwargs"]:
        pytest.skip(f"{name} has no {hparam}")
    value = SPECS[name]["kwargs"][hparam]
    with_schedule = _build(name, **{hparam: optax.constant_schedule(value)})
    with_value = _build(name, **{hparam: value})
    params0, _, obj = _parabola(jnp.float32)
    params, grad_of, _ = _prepare(name, params0, obj)
    runs = []
    for opt in (with_schedule, with_value):
        p, s = params, opt.init(params)
        for _ in range(10):
            u, s = _update(name, opt, grad_of, grad_of(p), s, p)
            p = optax.apply_updates(p, u)
        runs.append(p)
    chex.assert_trees_all_close(*runs)
