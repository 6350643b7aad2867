"""Replicated-SGD against closed forms, reductions and multi-device agreement."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import flatjax
from tests.helpers import quadratic, tiny_mlp_problem

Y = 3
DIM = 5


def stacked_quadratic_params(y=Y, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(y, DIM)), jnp.float32)


def quadratic_grads(q, w):
    """∇½ wᵀHw for each replica row of w (numpy, float64)."""
    return np.asarray(w, np.float64) @ np.asarray(q.hessian, np.float64).T


def run(opt, params, grad_fn, steps):
    state = opt.init(params)
    for _ in range(steps):
        updates, state = opt.update(grad_fn(params), state, params)
        params = optax.apply_updates(params, updates)
    return params, state


# --------------------------------------------------------------------- reductions


@pytest.mark.parametrize(
    "base",
    [optax.sgd(0.05, momentum=0.9, nesterov=True), optax.adam(0.05)],
    ids=["nesterov", "adam"],
)
@pytest.mark.parametrize("coupling_step", ["proximal", "explicit"])
@pytest.mark.parametrize("y, gamma", [(1, 5.0), (3, 0.0)], ids=["one_replica", "zero_coupling"])
def test_reduces_to_base_optimizer(base, coupling_step, y, gamma):
    q = quadratic(DIM)
    params = stacked_quadratic_params(y)
    opt = flatjax.replicate(base, y, gamma, learning_rate=0.05, coupling_step=coupling_step)
    got, _ = run(opt, params, lambda w: w @ q.hessian.T, steps=6)
    # Reference: the base optimizer on each replica alone, with its own state.
    for a in range(y):
        w = params[a]
        s = base.init(w)
        for _ in range(6):
            u, s = base.update(q.grad(w), s, w)
            w = optax.apply_updates(w, u)
        np.testing.assert_allclose(got[a], w, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- closed forms


def test_explicit_step_closed_form_with_mean_center():
    q, eta, gamma = quadratic(DIM), 0.05, 2.0
    params = stacked_quadratic_params()
    opt = flatjax.replicate(optax.sgd(eta), Y, gamma, coupling_step="explicit")
    got, _ = run(opt, params, lambda w: w @ q.hessian.T, steps=3)
    w = np.asarray(params, np.float64)
    for _ in range(3):
        c = w.mean(axis=0)
        w = w - eta * (quadratic_grads(q, w) + gamma * (w - c))  # w − η(Hw + γ(w − c))
    np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)


def test_explicit_step_closed_form_with_fixed_center():
    q, eta, gamma = quadratic(DIM), 0.05, 2.0
    params = stacked_quadratic_params()
    opt = flatjax.replicate(
        optax.sgd(eta), Y, gamma, coupling_step="explicit", center_optimizer=optax.set_to_zero()
    )
    got, state = run(opt, params, lambda w: w @ q.hessian.T, steps=4)
    w = np.asarray(params, np.float64)
    c = w.mean(axis=0)
    for _ in range(4):
        w = w - eta * (quadratic_grads(q, w) + gamma * (w - c))
    np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flatjax.replicate_eval_params(state, got), c, rtol=1e-6)


def test_proximal_step_closed_form():
    q, eta, gamma = quadratic(DIM), 0.05, 4.0
    params = stacked_quadratic_params()
    opt = flatjax.replicate(optax.sgd(eta), Y, gamma, coupling_step="proximal")
    got, _ = run(opt, params, lambda w: w @ q.hessian.T, steps=3)
    w = np.asarray(params, np.float64)
    for _ in range(3):
        v = w - eta * quadratic_grads(q, w)
        w = v.mean(axis=0) + (v - v.mean(axis=0)) / (1 + eta * gamma)
    np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)


def test_explicit_center_moves_by_coupling_gradient():
    gamma, beta = 0.7, 0.1
    params = stacked_quadratic_params()
    opt = flatjax.replicate(
        optax.sgd(0.1), Y, gamma, coupling_step="explicit", center_optimizer=optax.sgd(beta)
    )
    state = opt.init(params)
    c0 = np.asarray(params).mean(axis=0)
    moved = np.asarray(params)[0] + 1.0  # pull the replica mean away from the centre
    params = params.at[0].add(1.0)
    _, state = opt.update(jnp.zeros_like(params), state, params)
    w = np.asarray(params, np.float64)
    assert np.allclose(w[0], moved)
    expected = c0 - beta * gamma * np.sum(c0 - w, axis=0)  # c − β γ Σ_a (c − wᵃ)
    np.testing.assert_allclose(state.center, expected, rtol=1e-5)


def test_center_is_the_mean():
    params = {"a": jnp.arange(12.0).reshape(3, 4), "b": jnp.arange(3.0)}
    center = flatjax.replica_center(params)
    np.testing.assert_allclose(center["a"], [4.0, 5.0, 6.0, 7.0])
    np.testing.assert_allclose(center["b"], 1.0)
    opt = flatjax.replicate(optax.sgd(0.1), 3, 1.0, learning_rate=0.1)
    state = opt.init(params)
    # The mean-centre state holds no centre: replica_center falls back to the mean.
    np.testing.assert_allclose(flatjax.replicate_eval_params(state, params)["b"], 1.0)
    # mean_a ‖wᵃ − c‖²: replicas 0 and 2 differ from c by ±4 in 4 entries and ±1 in b.
    np.testing.assert_allclose(float(state.center_distance), 2 * (4 * 16 + 1) / 3, rtol=1e-6)


def test_balanced_coupling_closed_form():
    params = {"w": jnp.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]])}
    losses = jnp.array([1.0, 2.0, 6.0])
    w = np.asarray(params["w"])
    dist = np.mean(np.sum((w - w.mean(0)) ** 2, axis=1))
    # The authors' g₀ = mean loss / mean ‖wᵃ − c‖² is a g (g‖w − c‖², no ½): γ₀ = 2g₀.
    assert float(flatjax.balanced_coupling(losses, params)) == pytest.approx(2 * 3.0 / dist)


def test_average_batch_stats_is_mean():
    stats = {"bn": {"mean": jnp.array([[1.0, 2.0], [3.0, 6.0]]), "var": jnp.array([[1.0], [3.0]])}}
    out = flatjax.average_batch_stats(stats)
    np.testing.assert_allclose(out["bn"]["mean"], [2.0, 4.0])
    np.testing.assert_allclose(out["bn"]["var"], [2.0])


class DenseBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(3, name="dense")(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)


def test_recompute_batch_stats_is_exact_batch_mean():
    model = DenseBN()
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(rng.normal(loc=5.0, size=(n, 4)), jnp.float32) for n in (8, 5, 11)]
    variables = model.init(jax.random.key(0), batches[0])
    apply = functools.partial(model.apply, train=True, mutable=["batch_stats"])
    out = flatjax.recompute_batch_stats(apply, variables, batches)
    kernel = np.asarray(variables["params"]["dense"]["kernel"], np.float64)
    bias = np.asarray(variables["params"]["dense"]["bias"], np.float64)
    feats = [np.asarray(x, np.float64) @ kernel + bias for x in batches]
    np.testing.assert_allclose(
        out["batch_stats"]["bn"]["mean"], np.mean([f.mean(0) for f in feats], 0), rtol=1e-4
    )
    np.testing.assert_allclose(
        out["batch_stats"]["bn"]["var"], np.mean([f.var(0) for f in feats], 0), rtol=1e-4
    )
    assert out["params"] is variables["params"]


# --------------------------------------------------------------------- replicas do not mix


def test_global_norm_clipping_does_not_mix_replicas():
    base = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    params = stacked_quadratic_params()
    opt = flatjax.replicate(base, Y, 0.5, coupling_step="explicit")
    state = opt.init(params)
    small = jnp.full((Y, DIM), 0.01)
    huge = small.at[0].set(1e6)
    u_small, _ = opt.update(small, state, params)
    u_huge, _ = opt.update(huge, state, params)
    np.testing.assert_allclose(u_huge[1:], u_small[1:], rtol=1e-6)
    # Replica 0 alone is clipped to norm 0.1 (lr × clip).
    assert float(jnp.linalg.norm(u_huge[0])) == pytest.approx(0.1, rel=1e-4)


# --------------------------------------------------------------------- numerics


def _coupling_recurrence_growth(a, momentum, nesterov, steps=400):
    """|d_T / d_0| of the explicit coupling recurrence d ← d − η·trace(γ d), ηγ = a."""
    d, b = 1.0, 0.0
    for _ in range(steps):
        g = d  # γ d with η γ = a folded into the step below
        b = momentum * b + g
        d = d - a * ((g + momentum * b) if nesterov else b)
    return abs(d)


@pytest.mark.parametrize(
    "momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True), (0.5, True)]
)
def test_stable_coupling_step_is_the_recurrence_bound(momentum, nesterov):
    from flatjax._stability import stable_coupling_step

    bound = stable_coupling_step(momentum, nesterov)
    assert _coupling_recurrence_growth(0.98 * bound, momentum, nesterov) < 1.0
    assert _coupling_recurrence_growth(1.02 * bound, momentum, nesterov) > 1e3


@pytest.mark.parametrize("momentum", [1.0, -0.1, float("nan")])
def test_stable_coupling_step_rejects_a_momentum_outside_0_1(momentum):
    """β >= 1 never decays (the recurrence has no stable step): an error, not a bound."""
    from flatjax._stability import stable_coupling_step

    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\)"):
        stable_coupling_step(momentum, True)


@pytest.mark.parametrize(
    "make",
    [
        lambda: optax.sgd(1.0),
        lambda: optax.sgd(0.5, momentum=0.9),
        lambda: optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.1, 0.9, nesterov=True)),
        lambda: optax.sgd(optax.linear_schedule(0.01, 0.3, 20), 0.9, nesterov=True),
    ],
    ids=["sgd", "heavy-ball", "nesterov-wd", "nesterov-schedule"],
)
@pytest.mark.parametrize("mode", ["explicit", "proximal", "explicit-center"])
def test_no_mode_diverges_and_the_clamp_is_logged(make, mode):
    # γ = 1e4 is far past every bound (ηγ ≥ 100): unclamped, the explicit
    # step multiplies w − c by |1 − ηγ| ≥ 99 per step.
    kwargs = {"coupling_step": "proximal"} if mode == "proximal" else {}
    if mode == "explicit-center":
        kwargs["center_optimizer"] = optax.sgd(0.05, momentum=0.9, nesterov=True)
    params = stacked_quadratic_params()
    d0 = float(np.mean(np.sum((params - params.mean(0)) ** 2, axis=1)))
    opt = flatjax.replicate(make(), Y, 1e4, **kwargs)
    p, s = run(opt, params, jnp.zeros_like, 30)
    _, s = opt.update(jnp.zeros_like(p), s, p)
    assert np.isfinite(float(s.center_distance))
    assert float(s.center_distance) <= d0
    if mode != "proximal":
        assert float(s.requested_coupling) == pytest.approx(1e4)
        assert float(flatjax.replicate_coupling(s)) < 1e3  # the clamp shows in the state


def test_clamp_is_half_the_stability_bound_for_the_probed_rate():
    from flatjax._stability import stable_coupling_step

    for base, eta, beta, nesterov in [
        (optax.sgd(0.2), 0.2, 0.0, False),
        (optax.sgd(0.1, 0.9, nesterov=True), 0.1, 0.9, True),
        (optax.sgd(0.1, 0.9), 0.1, 0.9, False),
    ]:
        opt = flatjax.replicate(base, Y, 1e6)
        state = opt.init(stacked_quadratic_params())
        expected = 0.5 * stable_coupling_step(beta, nesterov) / eta
        assert float(state.coupling) == pytest.approx(expected, rel=1e-5)
    # An explicit centre: γ_stable = 1 / (η / b + η_c y / b_c), exact for plain SGD.
    opt = flatjax.replicate(optax.sgd(0.2), Y, 1e6, center_optimizer=optax.sgd(0.1))
    state = opt.init(stacked_quadratic_params())
    assert float(state.coupling) == pytest.approx(0.5 / (0.2 / 2 + 0.1 * Y / 2), rel=1e-5)
    # max_coupling is an absolute bound on top.
    opt = flatjax.replicate(optax.sgd(0.2), Y, 1e6, max_coupling=0.3)
    assert float(opt.init(stacked_quadratic_params()).coupling) == pytest.approx(0.3)


def test_learning_rate_is_read_from_the_base_optimizer():
    with pytest.raises(ValueError, match="does not match the base optimizer's own learning rate"):
        flatjax.replicate(optax.sgd(0.1, 0.9, nesterov=True), Y, 1.0, learning_rate=0.2)
    flatjax.replicate(optax.sgd(0.1, 0.9, nesterov=True), Y, 1.0, learning_rate=0.1)
    with pytest.raises(ValueError, match="not SGD-type"):
        flatjax.replicate(optax.adam(1e-3), Y, 1.0, coupling_step="proximal")
    # Adam is not clamped by a bound it does not have; max_coupling still applies.
    opt = flatjax.replicate(optax.adam(1e-3), Y, 1e6, max_coupling=5.0)
    assert float(opt.init(stacked_quadratic_params()).coupling) == pytest.approx(5.0)


def test_coupling_schedule_is_logged():
    schedule = flatjax.exponential_coupling(0.1, total_steps=10, factor=100.0)
    opt = flatjax.replicate(optax.sgd(0.01), Y, schedule, learning_rate=0.01)
    params = stacked_quadratic_params()
    state = opt.init(params)
    for t in range(3):
        _, state = opt.update(jnp.zeros_like(params), state, params)
        assert float(flatjax.replicate_coupling(state)) == pytest.approx(float(schedule(t)))


# --------------------------------------------------------------------- state and jit


def test_state_structure_dtypes_and_no_recompilation():
    _, p0, x, y, loss_fn = tiny_mlp_problem()
    params = jax.tree.map(lambda l: jnp.stack([l, 0.5 * l, -l]), p0)
    opt = flatjax.replicate(
        optax.sgd(0.1, momentum=0.9), Y, 1.0, learning_rate=0.1, center_optimizer=optax.sgd(0.01)
    )
    state = opt.init(params)
    assert isinstance(state, flatjax.ReplicateState)
    assert state.count.dtype == jnp.int32 and state.coupling.dtype == jnp.float32
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(1)
        grads = flatjax.replica_map(jax.grad(loss_fn), in_axes=(0, None, None))(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    p1, s1 = step(params, state)
    p2, s2 = step(p1, s1)
    assert len(traces) == 1
    assert int(s2.count) == 2
    shapes = lambda t: jax.tree.map(lambda l: (jnp.shape(l), jnp.result_type(l)), t)
    assert jax.tree.structure(s2) == jax.tree.structure(state)
    assert shapes(s2) == shapes(state)
    assert shapes(p2) == shapes(params)


@pytest.mark.parametrize("in_axes", [0, (0, None, None)])
def test_replica_map_strategies_agree(in_axes):
    _, p0, x, y, loss_fn = tiny_mlp_problem()
    params = jax.tree.map(lambda l: jnp.stack([l, 0.5 * l, -l]), p0)
    args = (params, x, y)
    if in_axes == 0:
        args = (params, jnp.stack([x, x[::-1], 2 * x]), jnp.stack([y, y[::-1], y]))
    results = {
        s: flatjax.replica_map(jax.value_and_grad(loss_fn), strategy=s, in_axes=in_axes)(*args)
        for s in ("vmap", "unroll", "auto")
    }
    # Reference: a plain loop over replicas outside any mapping.
    for a in range(Y):
        pa = jax.tree.map(lambda l, a=a: l[a], params)
        xa, ya = (args[1][a], args[2][a]) if in_axes == 0 else (x, y)
        loss, grad = jax.value_and_grad(loss_fn)(pa, xa, ya)
        for got_loss, got_grad in results.values():
            np.testing.assert_allclose(got_loss[a], loss, rtol=1e-5)
            jax.tree.map(
                lambda g, r, a=a: np.testing.assert_allclose(g[a], r, rtol=1e-5, atol=1e-6),
                got_grad,
                grad,
            )


def test_init_replicas_are_independent():
    model = DenseBN()
    v = flatjax.init_replicas(model.init, jax.random.key(0), 4, jnp.ones((2, 4)))
    kernel = v["params"]["dense"]["kernel"]
    assert kernel.shape == (4, 4, 3) and v["batch_stats"]["bn"]["mean"].shape == (4, 3)
    assert len({float(k[0, 0]) for k in kernel}) == 4
    keys = jax.random.split(jax.random.key(0), 4)
    alone = model.init(keys[2], jnp.ones((2, 4)))["params"]["dense"]["kernel"]
    np.testing.assert_array_equal(kernel[2], alone)


# --------------------------------------------------------------------- devices


def _mlp_training_setup(num_replicas=4, steps=4):
    _, p0, x, y, loss_fn = tiny_mlp_problem(n=64)
    keys = jax.random.split(jax.random.key(1), num_replicas)
    params = jax.tree.map(
        lambda l: l + 0.1 * jax.random.normal(keys[0], (num_replicas, *l.shape)), p0
    )
    perms = [np.random.default_rng(a).permutation(64)[:32] for a in range(num_replicas)]
    xs = jnp.stack([x[p] for p in perms])
    ys = jnp.stack([y[p] for p in perms])
    return params, xs, ys, loss_fn


def _make_opt(axis_name, center):
    return flatjax.replicate(
        optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.2, momentum=0.9)),
        4,
        flatjax.exponential_coupling(0.5, total_steps=4, factor=10.0),
        axis_name=axis_name,
        learning_rate=0.2,
        center_optimizer=optax.sgd(0.05) if center else None,
    )


def _train(step, params, state, xs, ys, steps=4):
    for t in range(steps):
        params, state = step(params, state, xs, ys)
        if t % 2 == 1:
            jax.block_until_ready((params, state))
    return jax.block_until_ready((params, state))


@functools.cache
def _single_device_reference(center):
    params, xs, ys, loss_fn = _mlp_training_setup()
    opt = _make_opt(None, center)

    @jax.jit
    def step(params, state, xs, ys):
        grads = flatjax.replica_map(jax.grad(loss_fn), strategy="vmap")(params, xs, ys)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return _train(step, params, opt.init(params), xs, ys)


def _mesh(n):
    return jax.make_mesh((n,), ("replica",), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


@pytest.mark.parametrize("n, center", [(2, False), (4, False), (2, True)])
def test_shard_map_matches_one_device(n, center):
    ref_params, ref_state = _single_device_reference(center)
    params, xs, ys, loss_fn = _mlp_training_setup()
    opt = _make_opt("replica", center)
    state_spec = flatjax.ReplicateState(P(), P(), P(), P(), P("replica"), P(), P())
    mesh = _mesh(n)
    if n == 2:  # init on each device's local replicas
        init = jax.shard_map(opt.init, mesh=mesh, in_specs=P("replica"), out_specs=state_spec)
    else:  # init outside the named axis, on all replicas
        init = opt.init

    def local_step(params, state, xs, ys):
        assert jax.tree.leaves(params)[0].shape[0] == 4 // n  # local replicas only
        grads = flatjax.replica_map(jax.grad(loss_fn))(params, xs, ys)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(
        jax.shard_map(
            local_step,
            mesh=mesh,
            in_specs=(P("replica"), state_spec, P("replica"), P("replica")),
            out_specs=(P("replica"), state_spec),
        )
    )
    got_params, got_state = _train(step, params, jax.jit(init)(params), xs, ys)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), got_params, ref_params
    )
    assert float(got_state.center_distance) == pytest.approx(float(ref_state.center_distance), 1e-4)
    center = flatjax.replicate_eval_params(got_state, got_params)
    ref_center = flatjax.replicate_eval_params(ref_state, ref_params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), center, ref_center
    )


@pytest.mark.parametrize("n", [2, 4])
def test_sharded_jit_matches_one_device(n):
    ref_params, _ = _single_device_reference(False)
    params, xs, ys, loss_fn = _mlp_training_setup()
    opt = _make_opt(None, False)
    sharding = NamedSharding(_mesh(n), P("replica"))
    params, xs, ys = jax.device_put((params, xs, ys), sharding)

    @jax.jit
    def step(params, state, xs, ys):
        grads = flatjax.replica_map(jax.grad(loss_fn), strategy="vmap")(params, xs, ys)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    got_params, _ = _train(step, params, jax.jit(opt.init)(params), xs, ys)
    assert jax.tree.leaves(got_params)[0].sharding.num_devices == n
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), got_params, ref_params
    )


# --------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_replicas=0), ValueError, "num_replicas must be >= 1, got 0"),
        (dict(num_replicas=2.0), TypeError, "num_replicas must be an int"),
        (dict(num_replicas=True), TypeError, "num_replicas must be an int"),
        (dict(coupling=-0.1), ValueError, "coupling must be >= 0; got -0.1"),
        (dict(coupling=lambda t: -1.0 + 0 * t), ValueError, "value at step 0"),
        (dict(coupling="big"), TypeError, "coupling must be a non-negative float"),
        (dict(learning_rate=-1.0), ValueError, "learning_rate must be >= 0"),
        (dict(coupling_step="implicit"), ValueError, "coupling_step must be one of"),
        (dict(max_coupling=0.0), ValueError, "max_coupling must be positive"),
        (dict(clamp_fraction=0.0), ValueError, "clamp_fraction must be a number in"),
        (dict(clamp_fraction=1.5), ValueError, "clamp_fraction must be a number in"),
        (dict(base_optimizer=optax.sgd), TypeError, "base_optimizer must be an optax"),
        (dict(center_optimizer="sgd"), TypeError, "center_optimizer must be None or"),
    ],
)
def test_replicate_rejects_bad_hyperparameters(kwargs, error, match):
    args = dict(base_optimizer=optax.sgd(0.1), num_replicas=2, coupling=1.0, learning_rate=0.1)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        flatjax.replicate(**args)


def test_mismatched_replica_axis_names_the_leaf():
    opt = flatjax.replicate(optax.sgd(0.1), 3, 1.0, learning_rate=0.1)
    bad = {"dense": {"kernel": jnp.zeros((3, 2, 2)), "bias": jnp.zeros((2, 2))}}
    with pytest.raises(ValueError, match=r"params\['dense'\]\['bias'\] has leading axis 2"):
        opt.init(bad)
    good = {"dense": {"kernel": jnp.zeros((3, 2, 2)), "bias": jnp.zeros((3, 2))}}
    state = opt.init(good)
    with pytest.raises(ValueError, match=r"updates\['dense'\]\['kernel'\] has leading axis 1"):
        short = {"dense": {"kernel": jnp.zeros((1, 2, 2)), "bias": jnp.zeros((3, 2))}}
        opt.update(short, state, good)
    with pytest.raises(ValueError, match="needs params"):
        opt.update(good, state)
    with pytest.raises(ValueError, match=r"params has a scalar"):
        opt.init(jnp.zeros(()))


def test_replicas_must_divide_over_devices():
    opt = flatjax.replicate(optax.sgd(0.1), 3, 1.0, axis_name="replica", learning_rate=0.1)
    f = jax.shard_map(opt.init, mesh=_mesh(2), in_specs=P("replica"), out_specs=P())
    with pytest.raises(ValueError, match="num_replicas=3 is not divisible by the size 2"):
        f(jnp.zeros((4, 2)))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(strategy="pmap"), ValueError, "strategy must be one of"),
        (dict(in_axes=1), ValueError, "in_axes must be 0, None"),
        (dict(in_axes=(0, 1)), ValueError, "in_axes entries must be 0 or None"),
        (dict(fn=3), TypeError, "fn must be callable"),
    ],
)
def test_replica_map_rejects_bad_arguments(kwargs, error, match):
    args = dict(fn=lambda a, b: a + b)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        flatjax.replica_map(**args)


@pytest.mark.parametrize(
    "in_axes, args, match",
    [
        (0, (jnp.zeros(3), jnp.zeros(2)), r"same leading replica axis; found .* sizes \[2, 3\]"),
        ((0,), (jnp.zeros(3), jnp.zeros(3)), "in_axes has 1 entries but the function got 2"),
        (None, (jnp.zeros(3), jnp.zeros(3)), "at least one mapped"),
        (0, (jnp.zeros(3), jnp.zeros(())), "and scalars"),
    ],
)
def test_replica_map_rejects_bad_calls(in_axes, args, match):
    with pytest.raises(ValueError, match=match):
        flatjax.replica_map(lambda a, b: a + b, strategy="unroll", in_axes=in_axes)(*args)


def test_helpers_reject_bad_inputs():
    with pytest.raises(ValueError, match="num_replicas must be >= 1"):
        flatjax.init_replicas(nn.Dense(2).init, jax.random.key(0), 0, jnp.ones((1, 2)))
    with pytest.raises(TypeError, match="num_replicas must be an int"):
        flatjax.init_replicas(nn.Dense(2).init, jax.random.key(0), 2.5, jnp.ones((1, 2)))
    with pytest.raises(TypeError, match="init_fn must be callable"):
        flatjax.init_replicas(None, jax.random.key(0), 2)
    with pytest.raises(ValueError, match="losses must have shape"):
        flatjax.balanced_coupling(jnp.zeros((2, 1)), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="leading axis 3"):
        flatjax.balanced_coupling(jnp.zeros(2), jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match="needs y >= 2"):
        flatjax.balanced_coupling(jnp.zeros(1), jnp.zeros((1, 3)))
    with pytest.raises(TypeError, match="exactly one ReplicateState"):
        flatjax.replicate_coupling(optax.EmptyState())
    with pytest.raises(TypeError, match="exactly one ReplicateState"):
        flatjax.replicate_eval_params(optax.sgd(0.1).init(jnp.zeros(3)), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"batch_stats\['v'\] has leading axis 3"):
        flatjax.average_batch_stats({"m": jnp.zeros((2, 3)), "v": jnp.zeros((3, 3))})


def test_recompute_batch_stats_rejects_bad_inputs():
    model = DenseBN()
    x = jnp.ones((4, 4))
    variables = model.init(jax.random.key(0), x)
    apply = functools.partial(model.apply, train=True, mutable=["batch_stats"])
    with pytest.raises(ValueError, match="batches is empty"):
        flatjax.recompute_batch_stats(apply, variables, [])
    with pytest.raises(ValueError, match="'batch_stats' collection"):
        flatjax.recompute_batch_stats(apply, {"params": variables["params"]}, [x])
    frozen = functools.partial(model.apply, train=False, mutable=["batch_stats"])
    with pytest.raises(ValueError, match="does not update batch_stats"):
        flatjax.recompute_batch_stats(frozen, variables, [x])
    with pytest.raises(TypeError, match="apply_fn must be callable"):
        flatjax.recompute_batch_stats(None, variables, [x])


def test_replicated_sgd_is_replicate_of_sgd_with_one_learning_rate():
    params = stacked_quadratic_params()
    q = quadratic(DIM)
    schedule = flatjax.exponential_coupling(0.2, total_steps=10, factor=10.0)
    alias = flatjax.replicated_sgd(0.05, Y, schedule, weight_decay=1e-3)
    manual = flatjax.replicate(
        optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(0.05, 0.9, nesterov=True)),
        Y, schedule,
    )
    got, _ = run(alias, params, lambda w: w @ q.hessian.T, steps=6)
    want, _ = run(manual, params, lambda w: w @ q.hessian.T, steps=6)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # y = 1 and γ = 0: plain SGD with Nesterov momentum.
    single = flatjax.replicated_sgd(0.05, 1, 0.0)
    got, _ = run(single, params[:1], lambda w: w @ q.hessian.T, steps=4)
    sgd = optax.sgd(0.05, 0.9, nesterov=True)
    p, s = params[0], sgd.init(params[0])
    for _ in range(4):
        u, s = sgd.update(p @ q.hessian.T, s, p)
        p = optax.apply_updates(p, u)
    np.testing.assert_allclose(got[0], p, rtol=1e-6)
    with pytest.raises(ValueError, match="momentum must be a number in"):
        flatjax.replicated_sgd(0.1, Y, 1.0, momentum=1.0)
    with pytest.raises(ValueError, match="learning_rate must be positive"):
        flatjax.replicated_sgd(0.0, Y, 1.0)


def test_helpers_find_the_state_inside_chains_and_injected_hyperparameters():
    params = stacked_quadratic_params()
    opt = optax.inject_hyperparams(flatjax.replicated_sgd, static_args=("num_replicas",))(
        learning_rate=0.1, num_replicas=Y, coupling=0.4, explicit_center=True
    )
    chained = optax.chain(optax.clip_by_global_norm(1.0), opt)
    state = chained.init(params)
    assert float(flatjax.replicate_coupling(state)) == pytest.approx(0.4)
    np.testing.assert_allclose(
        flatjax.replicate_eval_params(state, params), params.mean(0), rtol=1e-6
    )


def _count_convolutions(jaxpr) -> int:
    """Convolution equations in ``jaxpr`` and every jaxpr nested in it."""
    from flatjax._rsgd._replicas import _sub_jaxprs

    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name == "conv_general_dilated"
        for value in eqn.params.values():
            total += sum(_count_convolutions(sub) for sub in _sub_jaxprs(value))
    return total


@pytest.mark.parametrize("under_jit", [False, True])
def test_auto_strategy_unrolls_convolutions_on_cpu_and_vmaps_the_rest(under_jit):
    # On CPU "auto" unrolls a convolutional replica (y forward convolutions
    # in the program, one per replica) and vmaps a dense one (its matmuls
    # batched into one dot per layer); both give the loop's values.
    import flax.linen as nn

    if jax.default_backend() != "cpu":
        pytest.skip("the CPU rule")
    conv = nn.Conv(2, (3, 3))
    dense = nn.Dense(3)
    x = jnp.linspace(-1, 1, 2 * 6 * 6).reshape(2, 6, 6, 1)
    for module, mapped_convs in ((conv, Y), (dense, 0)):
        v0 = module.init(jax.random.key(0), x)
        params = jax.tree.map(lambda l: jnp.stack([l, 0.5 * l, -l]), v0)
        fn = lambda v, x, m=module: jnp.sum(jnp.sin(m.apply(v, x)))
        auto = flatjax.replica_map(fn, strategy="auto", in_axes=(0, None))
        run = jax.jit(auto) if under_jit else auto
        jaxpr = jax.make_jaxpr(run)(params, x).jaxpr
        assert _count_convolutions(jaxpr) == mapped_convs
        if module is dense:  # vmapped: one batched dot, not y dots
            dots = [e for e in jax.make_jaxpr(auto)(params, x).jaxpr.eqns
                    if e.primitive.name == "dot_general"]
            assert len(dots) == 1
        want = [fn(jax.tree.map(lambda l, a=a: l[a], params), x) for a in range(Y)]
        np.testing.assert_allclose(run(params, x), want, rtol=1e-6)
