"""Entropy-SGD against closed forms, reductions and its two drivers' agreement."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import flatjax
from tests.helpers import quadratic, tiny_mlp_problem


def _run_stepwise(opt, grad_of, params, calls, value_of=None):
    """Drives the stepwise transform for ``calls`` updates; grad_of(walker, call)."""
    state = opt.init(params)
    for c in range(calls):
        extra = {} if value_of is None else {"value": value_of(params, c)}
        updates, state = opt.update(grad_of(params, c), state, params, **extra)
        params = optax.apply_updates(params, updates)
    return params, state


# --- closed forms on a quadratic ---------------------------------------------


@pytest.mark.parametrize("mode", ["scan", "stepwise"])
def test_one_outer_step_closed_form_L1(mode):
    # L = 1, ε = 0, momentum 0. With g = H(x − w*):
    #   x′ = x − η′ (g + γ·0 + λ′ x)                (the pull vanishes at x′ = x)
    #   μ  = α x + (1 − α) x′ = x − (1 − α) η′ (g + λ′ x)
    #   G  = γ (x − μ) = γ (1 − α) η′ (g + λ′ x)
    #   x ← x − η G
    q = quadratic(dim=5, seed=1, centred=False)
    x = jnp.asarray(np.random.default_rng(0).normal(size=5), jnp.float32)
    eta, eta_in, gamma, alpha, wd_in = 0.7, 0.05, 2.0, 0.75, 1e-2
    kw = dict(
        inner_steps=1, coupling=gamma, inner_learning_rate=eta_in, noise=0.0,
        average_weight=alpha, inner_weight_decay=wd_in, momentum=0.0, clamp_fraction=1.0,
    )  # ηγ = 1.4 < 2, η′γ = 0.1 < 2: inside both stability bounds
    g = q.hessian @ (x - q.minimum)
    expected = x - eta * gamma * (1 - alpha) * eta_in * (g + wd_in * x)
    if mode == "scan":
        opt = flatjax.entropy_sgd(eta, **kw)
        updates, _ = opt.update(None, opt.init(x), x, grad_fn=lambda w, i: q.grad(w))
        new_x = x + updates
    else:
        opt = flatjax.entropy_sgd_stepwise(eta, **kw)
        walker, state = _run_stepwise(opt, lambda w, c: q.grad(w), x, calls=1)
        new_x = flatjax.entropy_sgd_eval_params(state, walker)
        np.testing.assert_allclose(walker, new_x, rtol=1e-6)  # params land on x
    np.testing.assert_allclose(new_x, expected, rtol=1e-5, atol=1e-6)


def test_two_inner_steps_closed_form_with_pull_and_nesterov():
    # L = 2, ε = 0, λ′ = 0; written out in numpy:
    #   x′1 = x − η′ H(x − w*);             μ1 = α x + (1 − α) x′1
    #   x′2 = x′1 − η′ (H(x′1 − w*) + γ (x′1 − x));  μ2 = α μ1 + (1 − α) x′2
    #   G = γ (x − μ2);  then one step of SGD with Nesterov momentum 0.9:
    #   m = G;  x ← x − η (G + 0.9 m)
    q = quadratic(dim=4, seed=2, centred=False)
    h, w_star = np.asarray(q.hessian, np.float64), np.asarray(q.minimum, np.float64)
    x = np.random.default_rng(1).normal(size=4)
    eta, eta_in, gamma, alpha = 0.3, 0.08, 1.5, 0.6
    x1 = x - eta_in * h @ (x - w_star)
    mu1 = alpha * x + (1 - alpha) * x1
    x2 = x1 - eta_in * (h @ (x1 - w_star) + gamma * (x1 - x))
    mu2 = alpha * mu1 + (1 - alpha) * x2
    big_g = gamma * (x - mu2)
    expected = x - eta * (big_g + 0.9 * big_g)

    opt = flatjax.entropy_sgd(
        eta, inner_steps=2, coupling=gamma, inner_learning_rate=eta_in, noise=0.0,
        average_weight=alpha, inner_weight_decay=0.0,
    )
    xj = jnp.asarray(x, jnp.float32)
    updates, _ = opt.update(None, opt.init(xj), xj, grad_fn=lambda w, i: q.grad(w))
    np.testing.assert_allclose(xj + updates, expected, rtol=1e-5, atol=1e-6)


# --- reductions --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["scan", "stepwise"])
def test_zero_coupling_anchor_does_not_move(mode):
    q = quadratic(dim=6, seed=3, centred=False)
    x = jnp.ones(6)
    kw = dict(inner_steps=3, coupling=0.0, noise=1e-2, weight_decay=0.0)
    if mode == "scan":
        opt = flatjax.entropy_sgd(0.5, **kw)
        state = opt.init(x)
        for _ in range(3):
            updates, state = opt.update(None, state, x, grad_fn=lambda w, i: q.grad(w))
            x = optax.apply_updates(x, updates)
        anchor = x
    else:
        opt = flatjax.entropy_sgd_stepwise(0.5, **kw)
        walker, state = _run_stepwise(opt, lambda w, c: q.grad(w), x, calls=8)
        anchor = flatjax.entropy_sgd_eval_params(state, walker)
        assert not np.allclose(walker, 1.0)  # the walker did move
    np.testing.assert_array_equal(anchor, jnp.ones(6))


def test_walker_follows_sgd_without_coupling_and_noise():
    q = quadratic(dim=5, seed=4, centred=False)
    x = jnp.asarray(np.random.default_rng(2).normal(size=5), jnp.float32)
    inner_steps, eta_in = 6, 0.05
    opt = flatjax.entropy_sgd_stepwise(
        1.0, inner_steps=inner_steps, coupling=0.0, inner_learning_rate=eta_in,
        noise=0.0, inner_weight_decay=0.0,
    )
    sgd = optax.sgd(eta_in)
    walker, state = x, opt.init(x)
    reference, sgd_state = x, sgd.init(x)
    for _ in range(inner_steps - 1):  # the L-th call would land the outer step
        updates, state = opt.update(q.grad(walker), state, walker)
        walker = optax.apply_updates(walker, updates)
        sgd_updates, sgd_state = sgd.update(q.grad(reference), sgd_state, reference)
        reference = optax.apply_updates(reference, sgd_updates)
        np.testing.assert_allclose(walker, reference, rtol=1e-6)


@pytest.mark.parametrize("mode", ["scan", "stepwise"])
def test_noise_variance(mode):
    # Zero gradient, γ = 1, L = 1, α = 0, outer SGD lr 1 without momentum:
    #   x′ = x + σ ξ with σ = ε √(2η′);  μ = x′;  G = γ (x − μ) = −σ ξ;  x ← x + σ ξ.
    # So the anchor's step is N(0, σ²) per coordinate; n draws give the sample
    # variance s² with (n − 1) s²/σ² ~ χ²_{n−1}: mean 1, sd √(2/(n − 1)).
    n, eps, eta_in = 40_000, 0.3, 0.02
    sigma2 = eps**2 * 2 * eta_in
    kw = dict(
        inner_steps=1, coupling=1.0, inner_learning_rate=eta_in, noise=eps,
        average_weight=0.0, inner_weight_decay=0.0, momentum=0.0, seed=7,
    )
    x = jnp.zeros(n)
    zero_grad = lambda w, *_: jnp.zeros_like(w)
    if mode == "scan":
        opt = flatjax.entropy_sgd(1.0, **kw)
        step, _ = opt.update(None, opt.init(x), x, grad_fn=zero_grad)
    else:
        opt = flatjax.entropy_sgd_stepwise(1.0, **kw)
        step, _ = opt.update(jnp.zeros(n), opt.init(x), x)
    step = np.asarray(step, np.float64)
    ratio = step.var(ddof=1) / sigma2
    assert abs(ratio - 1) < 5 * np.sqrt(2 / (n - 1))
    assert abs(step.mean()) < 5 * np.sqrt(sigma2 / n)


def test_same_seed_is_deterministic_and_seeds_differ():
    x = jnp.zeros(100)
    zero_grad = lambda w, i: jnp.zeros_like(w)

    def step(seed):
        opt = flatjax.entropy_sgd(1.0, coupling=1.0, noise=0.1, seed=seed)
        update = jax.jit(lambda state, x: opt.update(None, state, x, grad_fn=zero_grad))
        return update(opt.init(x), x)[0]

    np.testing.assert_array_equal(step(3), step(3))
    assert not np.allclose(step(3), step(4))


# --- the two drivers agree ---------------------------------------------------


def _mlp_batches(inner_steps, outer_steps, batch=16):
    _, params, x, y, loss_fn = tiny_mlp_problem(seed=0, n=inner_steps * outer_steps * batch)
    xs = x.reshape(outer_steps, inner_steps, batch, -1)
    ys = y.reshape(outer_steps, inner_steps, batch)
    return params, xs, ys, loss_fn


def test_scan_and_stepwise_train_state_give_same_anchor():
    inner_steps, outer_steps = 3, 2
    params, xs, ys, loss_fn = _mlp_batches(inner_steps, outer_steps)
    kw = dict(
        inner_steps=inner_steps, noise=1e-2, seed=5, weight_decay=1e-3,
        coupling=flatjax.exponential_coupling(0.5, outer_steps, factor=10.0),
    )
    grad = jax.grad(loss_fn)

    scan_opt = flatjax.entropy_sgd(0.5, **kw)

    @jax.jit
    def outer(params, state, bx, by):
        updates, state = scan_opt.update(
            None, state, params, grad_fn=lambda w, i: grad(w, bx[i], by[i])
        )
        return optax.apply_updates(params, updates), state

    anchor, state = params, scan_opt.init(params)
    for t in range(outer_steps):
        anchor, state = outer(anchor, state, xs[t], ys[t])

    # stepwise mode through an unmodified flax TrainState loop
    ts = train_state.TrainState.create(
        apply_fn=None, params=params, tx=flatjax.entropy_sgd_stepwise(0.5, **kw)
    )
    apply = jax.jit(lambda ts, bx, by: ts.apply_gradients(grads=grad(ts.params, bx, by)))
    for t in range(outer_steps):
        for i in range(inner_steps):
            ts = apply(ts, xs[t, i], ys[t, i])
    stepwise_anchor = flatjax.entropy_sgd_eval_params(ts.opt_state, ts.params)

    assert not jax.tree.all(jax.tree.map(jnp.allclose, anchor, params))  # it moved
    chex.assert_trees_all_close(stepwise_anchor, anchor, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(ts.params, anchor, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        flatjax.entropy_sgd_coupling(state), flatjax.entropy_sgd_coupling(ts.opt_state)
    )


def test_stepwise_inside_lax_scan_matches_python_loop():
    inner_steps = 2
    params, xs, ys, loss_fn = _mlp_batches(inner_steps, outer_steps=2)
    bx = xs.reshape(-1, *xs.shape[2:])
    by = ys.reshape(-1, *ys.shape[2:])
    opt = flatjax.entropy_sgd_stepwise(0.3, inner_steps=inner_steps, coupling=1.0, noise=1e-2)
    grad = jax.grad(loss_fn)

    def step(carry, batch):
        params, state = carry
        updates, state = opt.update(grad(params, *batch), state, params)
        return (optax.apply_updates(params, updates), state), None

    (scanned, scan_state), _ = jax.jit(lambda c: jax.lax.scan(step, c, (bx, by)))(
        (params, opt.init(params))
    )
    carry = (params, opt.init(params))
    for k in range(bx.shape[0]):
        carry, _ = step(carry, (bx[k], by[k]))
    chex.assert_trees_all_close(scanned, carry[0], rtol=1e-5, atol=1e-6)
    assert int(scan_state.count) == 2


# --- coupling and its calibration --------------------------------------------


def test_coupling_follows_schedule():
    schedule = flatjax.linear_coupling(0.5, total_steps=4, factor=5.0)
    opt = flatjax.entropy_sgd(0.1, inner_steps=1, coupling=schedule, noise=0.0)
    x = jnp.ones(3)
    state = opt.init(x)
    for t in range(6):
        assert float(flatjax.entropy_sgd_coupling(state)) == pytest.approx(float(schedule(t)))
        updates, state = opt.update(None, state, x, grad_fn=lambda w, i: w)
        x = optax.apply_updates(x, updates)


@pytest.mark.parametrize("mode", ["scan", "stepwise"])
@pytest.mark.parametrize("calibration_step", [0, 1])
def test_calibration_closed_form(mode, calibration_step):
    # L = 1, ε = 0, λ′ = 0, momentum 0 (the authors' rule, their gtime = calibration_step):
    # outer steps t <= gtime run with γ = 0 and have size zero (γ-scaled outer
    # step); the inner loop of t = gtime gives x′ = x − η′ g with the loss L(x)
    # of its last minibatch, γ̂0 = L(x) / (½ ‖η′ g‖²). At t = gtime + 1, with a
    # constant coupling: μ = α x + (1 − α) x′ and x ← x − η γ̂0 (1 − α) η′ g.
    q = quadratic(dim=3, seed=5, centred=False)
    x = jnp.asarray([0.5, -1.0, 2.0])
    eta, eta_in, alpha = 0.1, 0.1, 0.75
    g = np.asarray(q.grad(x), np.float64)
    gamma_hat = float(q.loss(x)) / (0.5 * eta_in**2 * g @ g)
    expected = np.asarray(x) - eta * gamma_hat * (1 - alpha) * eta_in * g
    kw = dict(
        inner_steps=1, coupling=3.0, inner_learning_rate=eta_in, noise=0.0,
        average_weight=alpha, inner_weight_decay=0.0, momentum=0.0,
        calibrate_coupling=True, calibration_step=calibration_step, clamp_fraction=1.0,
    )
    if mode == "scan":
        opt = flatjax.entropy_sgd(eta, **kw)
        state = opt.init(x)
        params = x
        for t in range(calibration_step + 2):
            assert float(flatjax.entropy_sgd_coupling(state)) == (
                0.0 if t <= calibration_step else pytest.approx(gamma_hat, rel=1e-4)
            )
            updates, state = opt.update(
                None, state, params, grad_fn=lambda w, i: (q.grad(w), q.loss(w))
            )
            params = params + updates
            if t <= calibration_step:
                np.testing.assert_array_equal(params, x)  # zero-size outer steps
    else:
        opt = flatjax.entropy_sgd_stepwise(eta, **kw)
        params, state = _run_stepwise(
            opt, lambda w, c: q.grad(w), x, calls=calibration_step + 2,
            value_of=lambda w, c: q.loss(w),
        )
    np.testing.assert_allclose(params, expected, rtol=1e-4)
    assert float(flatjax.entropy_sgd_coupling(state)) == pytest.approx(gamma_hat, rel=1e-4)


@pytest.mark.parametrize("mode", ["scan", "stepwise"])
def test_calibration_reads_the_last_inner_loss(mode):
    # L = 2 on a linear loss (constant gradient g): x′_2 = x − 2η′g whatever γ = 0;
    # the inner losses are 10 (i = 0) and 1 (i = 1): γ̂0 = 1 / (½ ‖2η′g‖²).
    g = jnp.asarray([1.0, -2.0])
    x = jnp.zeros(2)
    eta_in = 0.1
    losses = jnp.asarray([10.0, 1.0])
    kw = dict(
        inner_steps=2, coupling=1.0, inner_learning_rate=eta_in, noise=0.0,
        inner_weight_decay=0.0, calibrate_coupling=True, calibration_step=0,
        clamp_fraction=1.0,
    )
    expected = 1.0 / (0.5 * (2 * eta_in) ** 2 * float(g @ g))
    if mode == "scan":
        opt = flatjax.entropy_sgd(0.1, **kw)
        _, state = opt.update(None, opt.init(x), x, grad_fn=lambda w, i: (g, losses[i]))
    else:
        opt = flatjax.entropy_sgd_stepwise(0.1, **kw)
        _, state = _run_stepwise(
            opt, lambda w, c: g, x, calls=2, value_of=lambda w, c: losses[c]
        )
    assert float(flatjax.entropy_sgd_coupling(state)) == pytest.approx(expected, rel=1e-5)


def test_calibration_with_zero_displacement_keeps_coupling():
    opt = flatjax.entropy_sgd(
        0.1, inner_steps=2, coupling=3.0, noise=0.0, calibrate_coupling=True
    )
    x = jnp.zeros(3)
    grad_fn = lambda w, i: (jnp.zeros_like(w), jnp.float32(1.0))
    state = opt.init(x)
    for _ in range(2):  # t = 0, 1 = calibration_step
        updates, state = opt.update(None, state, x, grad_fn=grad_fn)
        assert np.all(np.isfinite(updates))
    assert float(flatjax.entropy_sgd_coupling(state)) == pytest.approx(3.0)


# --- composition, compilation, state -----------------------------------------


def test_chain_with_clipping():
    q = quadratic(dim=4, seed=6, centred=False)
    x = jnp.full(4, 5.0)
    # stepwise: clipping acts on the walker's gradients; without coupling and
    # noise the walker is clipped SGD.
    esgd = flatjax.entropy_sgd_stepwise(
        1.0, inner_steps=4, coupling=0.0, noise=0.0, inner_learning_rate=0.1,
        inner_weight_decay=0.0,
    )
    opt = optax.chain(optax.clip_by_global_norm(0.5), esgd)
    ref = optax.chain(optax.clip_by_global_norm(0.5), optax.sgd(0.1))
    walker, state = _run_stepwise(opt, lambda w, c: q.grad(w), x, calls=3)
    reference, _ = _run_stepwise(ref, lambda w, c: q.grad(w), x, calls=3)
    np.testing.assert_allclose(walker, reference, rtol=1e-6)
    np.testing.assert_array_equal(flatjax.entropy_sgd_eval_params(state, walker), x)
    # scan mode: clipping after it bounds the outer step
    opt = optax.chain(flatjax.entropy_sgd(0.5, coupling=1.0), optax.clip_by_global_norm(0.01))
    updates, state = opt.update(None, opt.init(x), x, grad_fn=lambda w, i: q.grad(w))
    assert float(optax.tree.norm(updates)) == pytest.approx(0.01, rel=1e-4)
    assert float(flatjax.entropy_sgd_coupling(state)) == 1.0


def test_scale_by_entropy_sgd_returns_gradient_of_minus_local_entropy():
    # L = 1, ε = 0, λ′ = 0: G = γ (1 − α) η′ g (see the L = 1 closed form).
    q = quadratic(dim=3, seed=7, centred=False)
    x = jnp.asarray([1.0, 2.0, -1.0])
    opt = optax.chain(
        flatjax.scale_by_entropy_sgd(
            inner_steps=1, coupling=2.0, noise=0.0, inner_weight_decay=0.0,
            inner_learning_rate=0.1, average_weight=0.5,
        ),
        optax.sgd(1.0),
    )
    updates, state = opt.update(None, opt.init(x), x, grad_fn=lambda w, i: q.grad(w))
    np.testing.assert_allclose(updates, -2.0 * 0.5 * 0.1 * q.grad(x), rtol=1e-5)
    assert flatjax.entropy_sgd_eval_params(state, x) is x


@pytest.mark.parametrize("mode", ["scan", "stepwise"])
def test_no_recompilation_and_stable_state(mode):
    _, params, x, y, loss_fn = tiny_mlp_problem(seed=1, n=32)
    traces = []
    make = flatjax.entropy_sgd if mode == "scan" else flatjax.entropy_sgd_stepwise
    opt = make(
        0.1, inner_steps=2, coupling=flatjax.exponential_coupling(0.1, 10), noise=1e-3,
        calibrate_coupling=True,
    )

    @jax.jit
    def step(params, state):
        traces.append(None)
        if mode == "scan":
            grad_fn = lambda w, i: jax.value_and_grad(loss_fn)(w, x, y)[::-1]
            updates, state = opt.update(None, state, params, grad_fn=grad_fn)
        else:
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            updates, state = opt.update(grads, state, params, value=loss)
        return optax.apply_updates(params, updates), state

    state0 = opt.init(params)
    state = state0
    for _ in range(3):
        params, state = step(params, state)
    assert len(traces) == 1
    assert step._cache_size() == 1
    assert jax.tree.structure(state) == jax.tree.structure(state0)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, state0)
    assert state.count.dtype == jnp.int32 and state.inner_count.dtype == jnp.int32


# --- errors ------------------------------------------------------------------


def _negative_schedule(count):
    return -1.0 + 0.0 * count


@pytest.mark.parametrize("make", [flatjax.entropy_sgd, flatjax.entropy_sgd_stepwise])
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(inner_steps=0), ValueError, "inner_steps"),
        (dict(inner_steps=2.0), TypeError, "inner_steps"),
        (dict(coupling=-0.1), ValueError, "coupling"),
        (dict(coupling=_negative_schedule), ValueError, "coupling"),
        (dict(coupling="big"), TypeError, "coupling"),
        (dict(coupling=0.0, calibrate_coupling=True), ValueError, "calibrate_coupling"),
        (dict(inner_learning_rate=0.0), ValueError, "inner_learning_rate"),
        (dict(inner_learning_rate=-0.1), ValueError, "inner_learning_rate"),
        (dict(noise=-1e-4), ValueError, "noise"),
        (dict(average_weight=1.0), ValueError, "average_weight"),
        (dict(average_weight=-0.1), ValueError, "average_weight"),
        (dict(inner_weight_decay=-1e-4), ValueError, "inner_weight_decay"),
        (dict(inner_momentum=1.0), ValueError, "inner_momentum"),
        (dict(momentum=1.0), ValueError, "momentum"),
        (dict(weight_decay=-1.0), ValueError, "weight_decay"),
        (dict(learning_rate=-0.1), ValueError, "learning_rate"),
        (dict(learning_rate=None), ValueError, "learning_rate"),
        (dict(outer_optimizer=optax.sgd(0.1)), ValueError, "not both"),
        (dict(seed="zero"), TypeError, "seed"),
    ],
)
def test_bad_hyperparameters(make, kwargs, error, match):
    kwargs = {"learning_rate": 0.1, **kwargs}
    with pytest.raises(error, match=match):
        make(**kwargs)


def test_the_three_factories_share_one_signature():
    """stepwise and scale_by take entropy_sgd's hyperparameters and defaults, minus their own."""
    import inspect

    full = inspect.signature(flatjax.entropy_sgd).parameters
    stepwise = inspect.signature(flatjax.entropy_sgd_stepwise).parameters
    scale_by = inspect.signature(flatjax.scale_by_entropy_sgd).parameters
    assert set(full) - set(stepwise) == {"unroll", "has_aux", "aux_init"}
    assert set(full) - set(scale_by) == {"learning_rate", "momentum", "nesterov", "weight_decay"}
    for name, p in stepwise.items():
        assert p.default == full[name].default and p.kind == full[name].kind, name
    for name, p in scale_by.items():
        expected = "gradient" if name == "outer_scale" else full[name].default
        assert p.default == expected, name
    # inner_steps and coupling stay positional, the rest keyword-only, as in entropy_sgd.
    assert flatjax.scale_by_entropy_sgd(3, 0.5).init(jnp.zeros(2)).coupling == 0.5
    with pytest.raises(TypeError, match=r"entropy_sgd_stepwise\(\).*'unroll'"):
        flatjax.entropy_sgd_stepwise(0.1, unroll=2)
    with pytest.raises(TypeError, match=r"scale_by_entropy_sgd\(\).*'learning_rate'"):
        flatjax.scale_by_entropy_sgd(learning_rate=0.1)
    with pytest.raises(TypeError, match="too many positional"):
        flatjax.entropy_sgd_stepwise(0.1, 5, 0.03, 0.1)


def test_update_errors():
    x = jnp.zeros(2)
    opt = flatjax.entropy_sgd(0.1)
    with pytest.raises(ValueError, match="grad_fn"):
        opt.update(None, opt.init(x), x)
    with pytest.raises(ValueError, match="params"):
        opt.update(None, opt.init(x), None, grad_fn=lambda w, i: w)
    opt = flatjax.entropy_sgd_stepwise(0.1, calibrate_coupling=True)
    with pytest.raises(ValueError, match="value=loss"):
        opt.update(x, opt.init(x), x)
    with pytest.raises(ValueError, match="params"):
        opt.update(x, opt.init(x), None, value=1.0)
    with pytest.raises(ValueError, match="exactly one EntropySGDState"):
        flatjax.entropy_sgd_eval_params(optax.sgd(0.1).init(x), x)


def test_custom_optimizers():
    q = quadratic(dim=3, seed=8, centred=False)
    x = jnp.ones(3)
    # outer_optimizer replaces the default; inner adam still descends.
    opt = flatjax.entropy_sgd(
        None, coupling=1.0, noise=0.0, outer_optimizer=optax.sgd(1.0),
        inner_optimizer=optax.adam(0.05),
    )
    updates, _ = opt.update(None, opt.init(x), x, grad_fn=lambda w, i: q.grad(w))
    assert float(q.loss(x + updates)) < float(q.loss(x))


# --- stability and precision -------------------------------------------------


@pytest.mark.parametrize("mode", ["scan", "stepwise"])
@pytest.mark.parametrize("inner_momentum", [0.0, 0.9])
def test_calibrated_coupling_past_the_bound_is_clamped_and_logged(mode, inner_momentum):
    # A calibrated γ_0 times a 1e6 growth factor would put η′γ far above the
    # inner step's stability bound; the applied γ stays at half the bound
    # (Nesterov β′: 2(1 + β′)/(1 + 2β′) / η′), the request is visible, x finite.
    from flatjax._stability import stable_coupling_step

    q = quadratic(dim=4, seed=3, centred=False)
    x = jnp.full(4, 2.0)
    eta_in = 0.1
    schedule = flatjax.exponential_coupling(1.0, total_steps=10, factor=1e6)
    kw = dict(
        inner_steps=3, coupling=schedule, inner_learning_rate=eta_in, noise=0.0,
        inner_momentum=inner_momentum, calibrate_coupling=True, calibration_step=0,
    )
    bound = 0.5 * stable_coupling_step(inner_momentum, True) / eta_in
    if mode == "scan":
        opt = flatjax.entropy_sgd(0.01, **kw)  # the outer bound 1.357/0.01 is far away
        state, params = opt.init(x), x
        for _ in range(12):
            updates, state = opt.update(
                None, state, params, grad_fn=lambda w, i: (q.grad(w), q.loss(w))
            )
            params = params + updates
        anchor = params
    else:
        opt = flatjax.entropy_sgd_stepwise(0.01, **kw)
        params, state = _run_stepwise(
            opt, lambda w, c: q.grad(w), x, calls=36, value_of=lambda w, c: q.loss(w)
        )
        anchor = flatjax.entropy_sgd_eval_params(state, params)
    assert np.all(np.isfinite(anchor))
    assert float(state.requested_coupling) > 10 * bound
    assert float(flatjax.entropy_sgd_coupling(state)) == pytest.approx(bound, rel=1e-5)


def test_max_coupling_is_absolute_under_calibration():
    q = quadratic(dim=3, seed=5, centred=False)
    x = jnp.asarray([0.5, -1.0, 2.0])
    opt = flatjax.entropy_sgd(
        0.2, inner_steps=1, coupling=flatjax.exponential_coupling(1.0, 10, 100.0),
        inner_learning_rate=0.01, noise=0.0, calibrate_coupling=True, calibration_step=0,
        max_coupling=0.7,
    )
    state, params = opt.init(x), x
    for _ in range(3):
        updates, state = opt.update(
            None, state, params, grad_fn=lambda w, i: (q.grad(w), q.loss(w))
        )
        params = params + updates
    assert float(state.requested_coupling) > 0.7
    assert float(flatjax.entropy_sgd_coupling(state)) == pytest.approx(0.7)


def test_bfloat16_params_keep_the_langevin_noise_std():
    # ε √(2η′) = 1e-4 · √0.2 ≈ 4.47e-5, far below bfloat16's spacing at 1
    # (2⁻⁷): the float32 walker in the state must carry it.
    n, eps, eta_in = 200_000, 1e-4, 0.1
    params = jnp.ones(n, jnp.bfloat16)
    opt = flatjax.entropy_sgd_stepwise(
        0.1, inner_steps=2, coupling=0.0, noise=eps, inner_learning_rate=eta_in,
        inner_weight_decay=0.0,
    )
    state = opt.init(params)
    assert state.walker.dtype == jnp.float32 and state.anchor.dtype == jnp.float32
    updates, state = opt.update(jnp.zeros_like(params), state, params)
    assert updates.dtype == jnp.bfloat16
    moved = np.asarray(state.walker, np.float64) - 1.0
    expected = eps * np.sqrt(2 * eta_in)
    assert np.std(moved) == pytest.approx(expected, rel=0.02)
    assert abs(np.mean(moved)) < 5 * expected / np.sqrt(n)
    # scan mode: grad_fn sees the params' dtype, the outer step returns it.
    seen = []
    scan = flatjax.entropy_sgd(0.1, inner_steps=2, coupling=0.5)

    def grad_fn(w, i):
        seen.append(w.dtype)
        return jnp.zeros_like(w)

    updates, _ = scan.update(None, scan.init(params[:8]), params[:8], grad_fn=grad_fn)
    assert set(seen) == {jnp.dtype(jnp.bfloat16)} and updates.dtype == jnp.bfloat16


def test_fresh_stepwise_state_can_be_donated():
    opt = flatjax.entropy_sgd_stepwise(0.1, inner_steps=2, noise=0.0)
    params = jnp.ones(4)
    state = opt.init(params)
    step = jax.jit(lambda g, s, p: opt.update(g, s, p), donate_argnums=(1,))
    updates, state = step(jnp.ones(4), state, params)
    assert np.all(np.isfinite(updates))


def test_outer_step_clamp_follows_the_outer_learning_rate():
    # −F's Hessian is at most γ: the γ-scaled outer step of rate η is stable
    # while ηγ < 2(1 + β)/(1 + 2β) (Nesterov β = 0.9); γ is clamped at half.
    from flatjax._stability import stable_coupling_step

    bound = stable_coupling_step(0.9, True)
    for lr in (0.5, 2.0):
        opt = flatjax.entropy_sgd(lr, coupling=100.0, inner_learning_rate=0.001)
        state = opt.init(jnp.zeros(3))
        assert float(state.coupling) == pytest.approx(0.5 * bound / lr, rel=1e-5)
    # With a cosine learning rate the bound follows η_t.
    schedule = optax.cosine_decay_schedule(1.0, 10)
    opt = flatjax.entropy_sgd(schedule, coupling=1e3, inner_learning_rate=1e-4, noise=0.0)
    state, x = opt.init(jnp.zeros(3)), jnp.zeros(3)
    for _ in range(5):
        _, state = opt.update(None, state, x, grad_fn=lambda w, i: w)
    assert float(state.coupling) == pytest.approx(0.5 * bound / float(schedule(5)), rel=1e-4)
    # Chaudhari's unscaled outer step ("none") needs no outer bound.
    opt = flatjax.entropy_sgd(2.0, coupling=100.0, inner_learning_rate=0.001, outer_scale="none")
    assert float(opt.init(jnp.zeros(3)).coupling) == pytest.approx(100.0)


def test_scan_mode_takes_the_first_inner_gradient_from_updates():
    # grad_fn runs L − 1 times per outer step (counted at run time), and the
    # result equals grad_fn computing all L gradients itself (updates=None).
    q = quadratic(dim=4, seed=7, centred=False)
    x = jnp.full(4, 1.5)
    calls = []

    def grad_fn(w, i):
        jax.debug.callback(lambda i: calls.append(int(i)), i)
        return q.grad(w)

    opt = flatjax.entropy_sgd(0.5, inner_steps=4, coupling=0.5, noise=0.0)
    step = jax.jit(lambda s, p: opt.update(q.grad(p), s, p, grad_fn=grad_fn))
    state = opt.init(x)
    for _ in range(3):
        updates, state = step(state, x)
        jax.block_until_ready(updates)
    assert sorted(calls) == sorted([1, 2, 3] * 3)
    both, _ = opt.update(None, opt.init(x), x, grad_fn=lambda w, i: q.grad(w))
    first, _ = opt.update(q.grad(x), opt.init(x), x, grad_fn=lambda w, i: q.grad(w))
    np.testing.assert_allclose(first, both, rtol=1e-6)


def test_a_transform_chained_before_scan_mode_acts_on_the_first_gradient():
    # Clipping the first inner gradient to zero leaves x′ = x after inner step 0;
    # with L = 1 the outer step is then zero.
    x = jnp.full(3, 2.0)
    opt = optax.chain(optax.clip_by_global_norm(0.0),
                      flatjax.entropy_sgd(0.5, inner_steps=1, coupling=0.5, noise=0.0,
                                          inner_weight_decay=0.0))
    updates, _ = opt.update(jnp.ones(3), opt.init(x), x, grad_fn=lambda w, i: w)
    np.testing.assert_array_equal(updates, jnp.zeros(3))
    unclipped = flatjax.entropy_sgd(0.5, inner_steps=1, coupling=0.5, noise=0.0)
    updates, _ = unclipped.update(jnp.ones(3), unclipped.init(x), x, grad_fn=lambda w, i: w)
    assert float(jnp.abs(updates).max()) > 0


def test_calibration_with_one_inner_step_needs_the_loss_value():
    # L = 1, gradient g = x at x = (1, 1), ε = 0: x′ = x − η′(1 + λ′) x, so with the
    # loss value 1 the calibrated γ̂0 = 1 / (½ ‖η′(1 + λ′) x‖²) (constant schedule).
    eta_in, wd_in = 0.1, 1e-4
    opt = flatjax.entropy_sgd(0.1, inner_steps=1, calibrate_coupling=True, calibration_step=0,
                              noise=0.0, inner_learning_rate=eta_in, inner_weight_decay=wd_in,
                              clamp_fraction=1.0, momentum=0.0)
    x = jnp.ones(2)
    with pytest.raises(ValueError, match="value=loss"):
        opt.update(x, opt.init(x), x, grad_fn=lambda w, i: (w, 0.0))
    _, state = opt.update(x, opt.init(x), x, grad_fn=lambda w, i: (w, 0.0), value=1.0)
    expected = 1.0 / (0.5 * 2 * (eta_in * (1 + wd_in)) ** 2)
    assert float(state.requested_coupling) == pytest.approx(expected, rel=1e-5)


# --- auxiliary values through grad_fn (has_aux) ------------------------------


def test_has_aux_threads_the_walker_statistics_like_the_stepwise_driver():
    # aux accumulates Σ_l ‖x′_l‖² over the points where gradients are taken.
    # The stepwise driver is handed the walker itself at every call, so the
    # same sum over its walkers must come out of scan mode's aux.
    q = quadratic(dim=4, seed=3, centred=False)
    x = jnp.asarray(np.random.default_rng(1).normal(size=4), jnp.float32)
    kw = dict(inner_steps=4, coupling=0.7, inner_learning_rate=0.05, noise=0.0,
              inner_momentum=0.9)

    def f(w, i, acc):
        return q.loss(w), acc + jnp.sum(w ** 2)

    vg = jax.value_and_grad(f, has_aux=True)
    opt = flatjax.entropy_sgd(0.3, has_aux=True, **kw)
    (loss0, acc0), g0 = vg(x, 0, jnp.zeros(()))
    updates, state = opt.update(g0, opt.init(x), x, grad_fn=vg, value=loss0, aux=acc0)

    walkers = []
    step = flatjax.entropy_sgd_stepwise(0.3, **kw)
    w, s = x, step.init(x)
    for _ in range(4):
        walkers.append(w)
        u, s = step.update(q.grad(w), s, w)
        w = optax.apply_updates(w, u)
    expected = sum(float(jnp.sum(v ** 2)) for v in walkers)
    np.testing.assert_allclose(float(flatjax.entropy_sgd_aux(state)), expected, rtol=1e-5)
    np.testing.assert_allclose(float(state.loss), float(q.loss(walkers[-1])), rtol=1e-5)
    # and the outer step is the one the stepwise driver lands
    np.testing.assert_allclose(optax.apply_updates(x, updates), w, rtol=1e-5, atol=1e-6)


def test_has_aux_calibrates_from_the_returned_loss():
    # With has_aux the loss comes out of grad_fn's ((loss, aux), grads): the
    # calibration γ_0 = loss_{L−1} / (½‖x − x′‖²) reads it without (grads, loss).
    q = quadratic(dim=3, seed=5, centred=False)
    x = jnp.ones(3)
    kw = dict(inner_steps=3, coupling=1.0, inner_learning_rate=0.05, noise=0.0,
              calibrate_coupling=True, calibration_step=0)
    f = lambda w, i, a: (q.loss(w), a)
    plain = flatjax.entropy_sgd(0.1, **kw)
    _, s_plain = plain.update(q.grad(x), plain.init(x), x,
                              grad_fn=lambda w, i: (q.grad(w), q.loss(w)), value=q.loss(x))
    aux = flatjax.entropy_sgd(0.1, has_aux=True, **kw)
    _, s_aux = aux.update(q.grad(x), aux.init(x), x, grad_fn=jax.value_and_grad(f, has_aux=True),
                          value=q.loss(x), aux=jnp.zeros(()))
    assert float(s_plain.coupling_scale) != 1.0
    np.testing.assert_allclose(float(s_aux.coupling_scale), float(s_plain.coupling_scale),
                               rtol=1e-6)


def test_has_aux_bad_calls_say_what_to_pass():
    x = jnp.ones(2)
    opt = flatjax.entropy_sgd(0.1, inner_steps=2, has_aux=True)
    state = opt.init(x)
    with pytest.raises(ValueError, match="aux="):
        opt.update(x, state, x, grad_fn=lambda w, i, a: ((0.0, a), w))
    with pytest.raises(ValueError, match=r"\(\(loss, aux\), grads\)"):
        opt.update(x, state, x, grad_fn=lambda w, i, a: w, aux=0.0)


def test_chaining_the_primitive_with_sgd_is_the_gradient_scaled_alias():
    # entropy_sgd(outer_scale="gradient") feeds G = γ(x − μ) to
    # chain(add_decayed_weights(λ), sgd(η, β, nesterov)); the primitive chained
    # with the same optax transforms computes the same steps (the clamp does
    # not bind at this γ).
    q = quadratic(dim=4, seed=2, centred=False)
    x = jnp.asarray(np.random.default_rng(3).normal(size=4), jnp.float32)
    kw = dict(inner_steps=3, coupling=0.2, inner_learning_rate=0.05, noise=1e-3,
              inner_momentum=0.5, seed=7)
    alias = flatjax.entropy_sgd(0.4, momentum=0.9, weight_decay=1e-2,
                                outer_scale="gradient", **kw)
    chained = optax.chain(
        flatjax.scale_by_entropy_sgd(**kw),
        optax.add_decayed_weights(1e-2),
        optax.sgd(0.4, momentum=0.9, nesterov=True),
    )
    grad_fn = lambda w, i: q.grad(w)
    xa, xc = x, x
    sa, sc = alias.init(x), chained.init(x)
    for _ in range(4):
        ua, sa = alias.update(q.grad(xa), sa, xa, grad_fn=grad_fn)
        uc, sc = chained.update(q.grad(xc), sc, xc, grad_fn=grad_fn)
        xa, xc = optax.apply_updates(xa, ua), optax.apply_updates(xc, uc)
    assert float(flatjax.entropy_sgd_coupling(sa)) == pytest.approx(0.2)
    np.testing.assert_allclose(xa, xc, rtol=1e-5, atol=1e-7)


def _langevin_noise(generator, seed, num_steps):
    """The Langevin noise z of ``num_steps`` outer steps, read off the updates.

    Zero gradient, γ = 1, L = 1, α = 0, outer SGD lr 1: each outer step moves
    the anchor by exactly σ ξ (test_noise_variance), so steps on a pytree of
    several leaves expose the noise itself, z = step / σ.
    """
    eps, eta_in = 0.5, 0.02
    sigma = eps * np.sqrt(2 * eta_in)
    kw = dict(
        inner_steps=1, coupling=1.0, inner_learning_rate=eta_in, noise=eps,
        average_weight=0.0, inner_weight_decay=0.0, momentum=0.0,
    )
    if generator is not None:
        kw["noise_generator"] = generator
    params = {"a": jnp.zeros(30_011), "b": jnp.zeros((97, 101)), "c": jnp.zeros(7)}
    zero_grad = lambda w, *_: jax.tree.map(jnp.zeros_like, w)
    opt = flatjax.entropy_sgd(1.0, seed=seed, **kw)
    state, x, out = opt.init(params), params, []
    for _ in range(num_steps):
        step, state = opt.update(None, state, x, grad_fn=zero_grad)
        x = optax.apply_updates(x, step)
        out.append(np.concatenate([np.ravel(v) for v in jax.tree.leaves(step)]) / sigma)
    return out


def _assert_independent(z, other_seed):
    """No correlation between neighbours (across leaf boundaries too), steps or seeds."""
    bound = 5 / np.sqrt(z[0].size)
    for zi in z:
        assert abs(np.corrcoef(zi[:-1], zi[1:])[0, 1]) < bound
        assert abs(np.corrcoef(zi[:-2], zi[2:])[0, 1]) < bound
    assert abs(np.corrcoef(z[0], z[1])[0, 1]) < bound
    assert abs(np.corrcoef(z[1], z[2])[0, 1]) < bound
    assert abs(np.corrcoef(z[0], other_seed)[0, 1]) < bound
    # No two leaves repeat each other's noise (one draw split into the leaves).
    a, b = z[0][:7], z[0][-7:]
    assert not np.allclose(a, b)


@pytest.mark.parametrize("generator", ["hash", "threefry"])
def test_langevin_noise_is_iid_standard_normal(generator):
    # The Gaussian generators: moments, distribution (Kolmogorov–Smirnov),
    # tails and correlations of i.i.d. N(0, 1).
    from scipy import stats

    z = _langevin_noise(generator, seed=3, num_steps=3)
    all_z = np.concatenate(z).astype(np.float64)
    big_n = all_z.size
    assert abs(all_z.mean()) < 5 / np.sqrt(big_n)
    assert abs(all_z.var(ddof=1) - 1) < 5 * np.sqrt(2 / big_n)
    assert stats.kstest(all_z, "norm").pvalue > 1e-3
    for t in (1.0, 2.0, 3.0):
        p = 2 * stats.norm.sf(t)
        frac = np.mean(np.abs(all_z) > t)
        assert abs(frac - p) < 5 * np.sqrt(p * (1 - p) / big_n), (t, frac, p)
    _assert_independent(z, _langevin_noise(generator, seed=4, num_steps=1)[0])


def test_default_langevin_noise_is_standardised_irwin_hall():
    # The default law: z = (S − 510) / √(4 (256² − 1) / 12) with S the sum of
    # four i.i.d. uniform bytes. Its support is that lattice, its frequencies
    # are the 4-fold convolution of the uniform pmf on {0..255} (χ² test),
    # its first three moments are the normal's (0, 1, 0), E z⁴ is the
    # Irwin–Hall 3 − (6/5)(256² + 1)/(4 (256² − 1)), and draws are independent.
    from scipy import stats

    z = _langevin_noise(None, seed=3, num_steps=3)
    all_z = np.concatenate(z).astype(np.float64)
    big_n = all_z.size
    std = np.sqrt(4 * (256**2 - 1) / 12)
    s = all_z * std + 510
    levels = np.rint(s)
    np.testing.assert_allclose(s, levels, atol=1e-3)  # on the lattice, float32 exact
    assert levels.min() >= 0 and levels.max() <= 1020
    pmf = np.ones(256) / 256
    for _ in range(3):
        pmf = np.convolve(pmf, np.ones(256) / 256)
    counts = np.bincount(levels.astype(int), minlength=1021)
    # Bins of ~equal probability (40) so that every expected count is large.
    edges = np.searchsorted(np.cumsum(pmf), np.linspace(0, 1, 41)[1:-1])
    observed = np.add.reduceat(counts, np.r_[0, edges])
    expected = np.add.reduceat(pmf, np.r_[0, edges]) * big_n
    assert stats.chisquare(observed, expected).pvalue > 1e-3
    for k, exact in ((1, 0.0), (2, 1.0), (3, 0.0)):
        se = np.sqrt(np.var(all_z**k) / big_n)
        assert abs(np.mean(all_z**k) - exact) < 5 * se, k
    kurtosis = 3 - 6 / 5 * (256**2 + 1) / (4 * (256**2 - 1))
    assert abs(np.mean(all_z**4) - kurtosis) < 5 * np.sqrt(np.var(all_z**4) / big_n)
    assert np.abs(all_z).max() <= 510 / std + 1e-5
    _assert_independent(z, _langevin_noise(None, seed=4, num_steps=1)[0])


def test_noise_generator_is_validated():
    with pytest.raises(ValueError, match="noise_generator"):
        flatjax.entropy_sgd(0.1, noise_generator="philox")
