"""Flatness measures against closed forms on quadratics and a tiny ReLU MLP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import flatjax
from tests.helpers import blobs, quadratic, tiny_mlp_problem

KEY = jax.random.PRNGKey(0)


def _mlp(n=64, dim=4, hidden=5):
    model, params, x, y, loss_fn = tiny_mlp_problem(n=n, dim=dim, hidden=hidden)
    apply_fn = lambda v, inputs: model.apply(v, inputs, train=False)
    return apply_fn, {"params": params}, x, y, loss_fn


def _linear(n=40, dim=4):
    """A linear classifier: the cheapest model to compile."""
    x, y = blobs(n=n, dim=dim, num_classes=3, seed=1)
    rng = np.random.default_rng(0)
    params = {
        "kernel": jnp.asarray(rng.normal(size=(dim, 3)), jnp.float32),
        "bias": jnp.asarray(rng.normal(size=3), jnp.float32),
    }
    apply_fn = lambda v, inputs: inputs @ v["params"]["kernel"] + v["params"]["bias"]
    return apply_fn, {"params": params}, jnp.asarray(x), jnp.asarray(y)


def _explicit_hessian(loss, params):
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.hessian(lambda w: loss(unravel(w)))(flat), np.float64)


# --- local energy on a quadratic -------------------------------------------
#
# E(w) = ½ wᵀHw. Additive noise: E[½(w+σz)ᵀH(w+σz)] − E(w) = σ E[zᵀ]Hw + ½σ² E[zᵀHz]
# = ½σ² tr H. Multiplicative noise: w ⊙ (1+σz) = w + σ (w ⊙ z), so the same
# algebra with z replaced by w ⊙ z gives ½σ² E[(w⊙z)ᵀH(w⊙z)] = ½σ² Σᵢ Hᵢᵢ wᵢ².


@pytest.mark.parametrize("noise", ["additive", "multiplicative"])
def test_local_energy_quadratic_closed_form(noise):
    q = quadratic(dim=6, seed=1)
    w = jnp.linspace(-1.0, 1.5, 6)
    sigmas = jnp.array([0.05, 0.2, 0.5])
    h = np.asarray(q.hessian, np.float64)
    if noise == "additive":
        curvature = np.trace(h)
    else:
        curvature = np.sum(np.diag(h) * np.asarray(w, np.float64) ** 2)
    expected = 0.5 * np.asarray(sigmas) ** 2 * curvature
    le = flatjax.local_energy_fn(q.loss, w, sigmas, key=KEY, num_draws=4000, noise=noise)
    assert le.mean.shape == (3,) and le.stderr.shape == (3,)
    assert float(le.base) == pytest.approx(float(q.loss(w)), rel=1e-6)
    np.testing.assert_array_less(np.abs(np.asarray(le.mean) - expected), 4 * np.asarray(le.stderr))
    assert np.all(np.asarray(le.stderr) > 0)


def test_local_energy_perturb_only_selected_leaves():
    """With perturb="no_bias_bn" the bias leaf is fixed: ½σ² Σ over kernel entries only."""
    q = quadratic(dim=4, seed=2)
    params = {"kernel": jnp.array([1.0, -2.0]), "bias": jnp.array([0.5, 3.0])}
    energy = lambda p: q.loss(jnp.concatenate([p["bias"], p["kernel"]]))
    h = np.asarray(q.hessian, np.float64)
    # ravel order of the dict is (bias, kernel): kernel entries are indices 2, 3.
    expected_kernel = 0.5 * 0.3**2 * (h[2, 2] * 1.0 + h[3, 3] * 4.0)
    le = flatjax.local_energy_fn(energy, params, 0.3, key=KEY, num_draws=4000, perturb="no_bias_bn")
    assert abs(float(le.mean[0]) - expected_kernel) < 4 * float(le.stderr[0])
    only_bias = flatjax.local_energy_fn(
        energy, params, 0.3, key=KEY, num_draws=4000, perturb=lambda path, leaf: "bias" in path
    )
    expected_bias = 0.5 * 0.3**2 * (h[0, 0] * 0.25 + h[1, 1] * 9.0)
    assert abs(float(only_bias.mean[0]) - expected_bias) < 4 * float(only_bias.stderr[0])


@pytest.mark.parametrize("noise, metric", [("additive", "loss"), ("multiplicative", "error")])
def test_local_energy_sigma_zero_is_exactly_zero(noise, metric):
    apply_fn, variables, x, y = _linear()
    le = flatjax.local_energy(
        apply_fn, variables, (x, y), [0.0, 0.1], key=KEY, num_draws=5, noise=noise, metric=metric
    )
    assert float(le.mean[0]) == 0.0 and float(le.stderr[0]) == 0.0


def test_local_energy_chunking_does_not_change_the_estimate():
    apply_fn, variables, x, y = _linear()
    kwargs = dict(key=KEY, num_draws=7, metric="loss", batch_size=16)
    runs = [
        flatjax.local_energy(apply_fn, variables, (x, y), [0.05, 0.2], chunk_size=c, **kwargs)
        for c in (3, None)
    ]
    for other in runs[1:]:
        np.testing.assert_allclose(other.mean, runs[0].mean, rtol=1e-5, atol=1e-6)


# --- local energy on the tiny MLP ------------------------------------------


@pytest.mark.parametrize("batch_size", [1000, 24])
def test_dataset_streaming_counts_every_example_once(batch_size):
    apply_fn, variables, x, y, loss_fn = _mlp()
    logits = apply_fn(variables, x)
    error = 100.0 * float(jnp.mean(jnp.argmax(logits, -1) != y))
    mean_loss = float(loss_fn(variables["params"], x, y))
    streamed = flatjax.dataset_loss(apply_fn, variables, (x, y), batch_size=batch_size)
    assert float(streamed(variables["params"])) == pytest.approx(mean_loss, rel=1e-5)
    err_fn = flatjax.dataset_loss(
        apply_fn, variables, {"image": x, "label": y}, batch_size=batch_size, metric="error"
    )
    assert float(err_fn(variables["params"])) == pytest.approx(error, abs=1e-4)
    le = flatjax.local_energy(
        apply_fn, variables, (x, y), 0.0, key=KEY, num_draws=1, batch_size=batch_size
    )
    assert float(le.base) == pytest.approx(error, abs=1e-4)
    assert np.isnan(float(le.stderr[0]))  # a single draw has no spread


def test_local_energy_of_the_loss_is_half_sigma_squared_trace():
    """Small additive σ: δE = ½σ² tr ∇²L + O(σ⁴) (odd orders average out)."""
    apply_fn, variables, x, y, loss_fn = _mlp()
    hess = _explicit_hessian(lambda p: loss_fn(p, x, y), variables["params"])
    sigma = 0.05
    le = flatjax.local_energy(
        apply_fn,
        variables,
        (x, y),
        sigma,
        key=KEY,
        num_draws=1000,
        noise="additive",
        metric="loss",
    )
    expected = 0.5 * sigma**2 * np.trace(hess)
    assert abs(float(le.mean[0]) - expected) < 4 * float(le.stderr[0]) + 0.05 * expected


def _rescale(params, c):
    """ReLU symmetry: layer 1 (kernel, bias) × c, layer 2 kernel ÷ c; same function."""
    p = jax.tree_util.tree_map(lambda a: a, params)
    p["Dense_0"] = {
        "kernel": params["Dense_0"]["kernel"] * c,
        "bias": params["Dense_0"]["bias"] * c,
    }
    p["Dense_1"] = {"kernel": params["Dense_1"]["kernel"] / c, "bias": params["Dense_1"]["bias"]}
    return p


@pytest.mark.parametrize("metric", ["error", "loss"])
def test_multiplicative_local_energy_is_invariant_to_relu_rescaling(metric):
    apply_fn, variables, x, y, _ = _mlp()
    rescaled = {"params": _rescale(variables["params"], 4.0)}
    np.testing.assert_allclose(apply_fn(rescaled, x), apply_fn(variables, x), rtol=1e-4, atol=1e-5)
    sigmas = [0.1, 0.3]
    kwargs = dict(key=KEY, num_draws=50, metric=metric)
    mult = flatjax.local_energy(apply_fn, variables, (x, y), sigmas, **kwargs)
    mult_rescaled = flatjax.local_energy(apply_fn, rescaled, (x, y), sigmas, **kwargs)
    np.testing.assert_allclose(mult_rescaled.mean, mult.mean, rtol=1e-3, atol=1e-3)


def test_additive_local_energy_is_not_invariant_to_relu_rescaling():
    apply_fn, variables, x, y, _ = _mlp()
    rescaled = {"params": _rescale(variables["params"], 10.0)}
    kwargs = dict(key=KEY, num_draws=100, metric="loss", noise="additive")
    add = flatjax.local_energy(apply_fn, variables, (x, y), [0.1, 0.3], **kwargs)
    add_rescaled = flatjax.local_energy(apply_fn, rescaled, (x, y), [0.1, 0.3], **kwargs)
    gap = np.abs(np.asarray(add_rescaled.mean) - np.asarray(add.mean))
    assert np.all(gap > 4 * np.hypot(add.stderr, add_rescaled.stderr))


def test_local_energy_never_perturbs_batch_stats():
    """Energy that depends on batch_stats only: perturbing params changes nothing."""
    x, y = jnp.eye(3), jnp.array([0, 1, 1])
    variables = {
        "params": {"unused": jnp.ones(2)},
        "batch_stats": {"w": jnp.eye(3)},
    }
    apply_fn = lambda v, inputs: inputs @ v["batch_stats"]["w"] + 0.0 * v["params"]["unused"][0]
    le = flatjax.local_energy(
        apply_fn, variables, (x, y), [0.5, 1.0], key=KEY, num_draws=4, metric="loss"
    )
    np.testing.assert_allclose(le.mean, 0.0, atol=1e-6)


# --- Hessian ----------------------------------------------------------------


def test_hvp_matches_explicit_hessian():
    _, variables, x, y, loss_fn = _mlp()
    params = variables["params"]
    loss = lambda p: loss_fn(p, x, y)
    flat, unravel = ravel_pytree(params)
    v = jax.random.normal(KEY, flat.shape)
    got = ravel_pytree(flatjax.hvp(loss, params, unravel(v)))[0]
    np.testing.assert_allclose(got, _explicit_hessian(loss, params) @ np.asarray(v), atol=1e-4)


def test_top_eigenvalue_and_trace_match_eigh():
    _, variables, x, y, loss_fn = _mlp()
    params = variables["params"]
    loss = lambda p: loss_fn(p, x, y)
    hess = _explicit_hessian(loss, params)
    eigvals = np.linalg.eigvalsh(hess)
    top = eigvals[np.argmax(np.abs(eigvals))]

    res = flatjax.hessian_top_eigenvalue(loss, params, key=KEY, num_iters=2000, tol=1e-7)
    assert float(res.eigenvalue) == pytest.approx(top, rel=1e-3)
    v = np.asarray(ravel_pytree(res.eigenvector)[0], np.float64)
    assert np.linalg.norm(v) == pytest.approx(1.0, rel=1e-4)
    assert np.linalg.norm(hess @ v - top * v) < 0.05 * abs(top)

    trace = flatjax.hessian_trace(loss, params, key=KEY, num_samples=400)
    assert abs(float(trace.mean) - np.trace(hess)) < 4 * float(trace.stderr)
    assert float(trace.stderr) > 0


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    d = jnp.array([0.5, 2.0, -1.0, 4.0])
    loss = lambda p: 0.5 * jnp.sum(d * p["w"] ** 2)
    trace = flatjax.hessian_trace(loss, {"w": jnp.ones(4)}, key=KEY, num_samples=16, chunk_size=5)
    assert float(trace.mean) == pytest.approx(5.5, rel=1e-6)
    assert float(trace.stderr) == pytest.approx(0.0, abs=1e-6)


def test_top_eigenvalue_of_a_quadratic():
    q = quadratic(dim=6, seed=3, condition=20.0)
    res = flatjax.hessian_top_eigenvalue(q.loss, jnp.ones(6), key=KEY, num_iters=500, tol=1e-8)
    assert float(res.eigenvalue) == pytest.approx(20.0, rel=1e-4)
    assert 2 <= int(res.num_iters) <= 500


# --- SAM sharpness ------------------------------------------------------------


def test_sam_single_step_closed_form_and_bound():
    """L = ½wᵀHw, g = Hw, ε = ρg/‖g‖: L(w+ε) − L(w) = ρ‖g‖ + ½ρ² gᵀHg/‖g‖²."""
    q = quadratic(dim=5, seed=4)
    h = np.asarray(q.hessian, np.float64)
    w = np.array([1.0, -0.5, 0.2, 0.0, 2.0])
    g = h @ w
    gn = np.linalg.norm(g)
    bound = lambda rho: rho * gn + 0.5 * rho**2 * np.linalg.eigvalsh(h)[-1]
    for rho in (0.01, 0.3, 3.0):
        expected = rho * gn + 0.5 * rho**2 * (g @ h @ g) / gn**2
        one = float(flatjax.sam_sharpness(q.loss, jnp.asarray(w, jnp.float32), rho))
        assert one == pytest.approx(expected, rel=1e-4)
        many = float(flatjax.sam_sharpness(q.loss, jnp.asarray(w, jnp.float32), rho, num_steps=20))
        assert one - 1e-6 <= many <= bound(rho) * (1 + 1e-5)


def test_sam_sharpness_zero_gradient_is_zero_not_nan():
    q = quadratic(dim=3, seed=0)
    assert float(flatjax.sam_sharpness(q.loss, jnp.zeros(3), 0.5, num_steps=3)) == 0.0


# --- local entropy -------------------------------------------------------------
#
# L(w) = ½wᵀHw, A = H + γI. Completing the square in
#   −½wᵀHw − (γ/2)‖w − w̃‖² = −½wᵀAw + γw̃ᵀw − (γ/2)‖w̃‖²
# and integrating the Gaussian gives
#   F(w̃; γ) = (d/2) log 2π − ½ log det A + (γ²/2) w̃ᵀA⁻¹w̃ − (γ/2)‖w̃‖²
#           = (d/2) log 2π − ½ log det(H + γI) − (γ/2) w̃ᵀ(I − γ(H + γI)⁻¹)w̃.


def _quadratic_local_entropy(h, w_tilde, gamma):
    d = h.shape[0]
    a = h + gamma * np.eye(d)
    return (
        0.5 * d * np.log(2 * np.pi)
        - 0.5 * np.linalg.slogdet(a)[1]
        - 0.5 * gamma * w_tilde @ (np.eye(d) - gamma * np.linalg.inv(a)) @ w_tilde
    )


_ENTROPY_PROBLEM = quadratic(dim=5, seed=0)  # shared: both γ reuse one compiled program


@pytest.mark.parametrize("gamma", [0.3, 5.0])
def test_local_entropy_of_a_quadratic_matches_the_gaussian_integral(gamma):
    q = _ENTROPY_PROBLEM
    h = np.asarray(q.hessian, np.float64)
    w_tilde = np.linspace(-1.0, 1.0, 5)
    res = flatjax.local_entropy(q.loss, jnp.asarray(w_tilde, jnp.float32), gamma, key=KEY)
    exact = _quadratic_local_entropy(h, w_tilde, gamma)
    assert 0 < float(res.stderr) < 0.3
    assert abs(float(res.value) - exact) < 4 * float(res.stderr) + 0.05
    # The normalised value is F + (d/2) log(γ/2π), exactly.
    assert float(res.normalized - res.value) == pytest.approx(
        2.5 * np.log(gamma / (2 * np.pi)), rel=1e-5
    )
    # First rung: w ~ N(γA⁻¹w̃, A⁻¹), so ⟨‖w − w̃‖²⟩_γ = tr A⁻¹ + ‖γA⁻¹w̃ − w̃‖².
    a = h + gamma * np.eye(5)
    mean = gamma * np.linalg.solve(a, w_tilde)
    msd = np.trace(np.linalg.inv(a)) + np.sum((mean - w_tilde) ** 2)
    assert abs(float(res.mean_sq_distance[0]) - msd) < 5 * float(res.mean_sq_distance_stderr[0])
    assert np.all((np.asarray(res.acceptance) > 0.3) & (np.asarray(res.acceptance) < 0.9))


# --- bad inputs -----------------------------------------------------------------


def _le_call(**overrides):
    apply_fn, variables, x, y, _ = _mlp(n=8)
    args = dict(apply_fn=apply_fn, variables=variables, data=(x, y), sigmas=[0.0, 0.1], key=KEY)
    args.update(overrides)
    return flatjax.local_energy(
        args.pop("apply_fn"), args.pop("variables"), args.pop("data"), args.pop("sigmas"), **args
    )


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(data=(jnp.zeros((0, 4)), jnp.zeros((0,), jnp.int32))), ValueError, "empty"),
        (dict(data=(jnp.zeros((5, 4)), jnp.zeros((4,), jnp.int32))), ValueError, "same length"),
        (dict(data=(jnp.zeros((4, 4)), jnp.zeros((4,)))), TypeError, "integer"),
        (dict(data=jnp.zeros((4, 4))), TypeError, "pair"),
        (dict(data={"x": 1}), ValueError, "'image' and 'label'"),
        (dict(sigmas=[0.1, -0.1]), ValueError, ">= 0"),
        (dict(sigmas=[0.1, float("nan")]), ValueError, "finite"),
        (dict(sigmas=[float("inf")]), ValueError, "finite"),
        (dict(sigmas=[]), ValueError, "non-empty"),
        (dict(num_draws=0), ValueError, "num_draws"),
        (dict(num_draws=2.5), ValueError, "num_draws"),
        (dict(noise="gaussian"), ValueError, "noise"),
        (dict(metric="accuracy"), ValueError, "metric"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(perturb="weights"), ValueError, "perturb"),
        (dict(perturb=lambda path, leaf: False), ValueError, "no parameter"),
        (dict(variables={"batch_stats": {}}), ValueError, "'params'"),
        (dict(apply_fn=3), TypeError, "apply_fn"),
        (dict(key=None), ValueError, "key"),
    ],
)
def test_local_energy_bad_inputs(overrides, error, match):
    with pytest.raises(error, match=match):
        _le_call(**overrides)


def test_local_energy_fn_bad_inputs():
    with pytest.raises(TypeError, match="energy_fn"):
        flatjax.local_energy_fn(None, jnp.ones(2), 0.1, key=KEY)
    with pytest.raises(ValueError, match=">= 0"):
        flatjax.local_energy_fn(jnp.sum, jnp.ones(2), -1.0, key=KEY)
    with pytest.raises(ValueError, match="shape"):
        flatjax.local_energy_fn(jnp.sum, jnp.ones(2), [[0.1]], key=KEY)


def _quad():
    q = quadratic(dim=3, seed=0)
    return q.loss, jnp.ones(3)


@pytest.mark.parametrize(
    "fn, kwargs, error, match",
    [
        (flatjax.hessian_top_eigenvalue, dict(key=KEY, num_iters=0), ValueError, "num_iters"),
        (flatjax.hessian_top_eigenvalue, dict(key=KEY, tol=0.0), ValueError, "tol"),
        (flatjax.hessian_top_eigenvalue, dict(key=KEY, tol="x"), TypeError, "tol"),
        (flatjax.hessian_trace, dict(key=KEY, num_samples=0), ValueError, "num_samples"),
        (flatjax.hessian_trace, dict(key=KEY, chunk_size=-1), ValueError, "chunk_size"),
        (flatjax.local_entropy, dict(coupling=0.0, key=KEY), ValueError, "coupling"),
        (flatjax.local_entropy, dict(coupling=1.0, key=KEY, num_rungs=1), ValueError, "num_rungs"),
        (flatjax.local_entropy, dict(coupling=1.0, key=KEY, num_chains=1), ValueError, "chains"),
        (
            flatjax.local_entropy,
            dict(coupling=1.0, key=KEY, num_steps=10, burn_in=10),
            ValueError,
            "burn_in",
        ),
        (flatjax.local_entropy, dict(coupling=1.0, key=KEY, sampler="hmc"), ValueError, "sampler"),
        (
            flatjax.local_entropy,
            dict(coupling=1.0, key=KEY, step_fraction=2.0),
            ValueError,
            "step_fraction",
        ),
        (
            flatjax.local_entropy,
            dict(coupling=1.0, key=KEY, gamma_max=0.5),
            ValueError,
            "gamma_max",
        ),
        (
            flatjax.local_entropy,
            dict(coupling=1.0, key=KEY, curvature=-1.0),
            ValueError,
            "curvature",
        ),
        (
            flatjax.local_entropy,
            dict(coupling=1.0, key=KEY, num_anchor_samples=1),
            ValueError,
            "num_anchor",
        ),
        (flatjax.local_entropy, dict(coupling=1.0, key=None), ValueError, "key"),
    ],
)
def test_hessian_and_entropy_bad_inputs(fn, kwargs, error, match):
    loss, params = _quad()
    with pytest.raises(error, match=match):
        fn(loss, params, **kwargs)


@pytest.mark.parametrize(
    "rho, num_steps, match",
    [(0.0, 1, "rho"), (-1.0, 1, "rho"), (float("inf"), 1, "rho"), (0.1, 0, "num_steps")],
)
def test_sam_bad_inputs(rho, num_steps, match):
    loss, params = _quad()
    with pytest.raises(ValueError, match=match):
        flatjax.sam_sharpness(loss, params, rho, num_steps=num_steps)


# --- dataset_loss through the Hessian tools -------------------------------------


def test_hessian_tools_on_dataset_loss_match_the_full_batch_loss():
    """Per-batch HVPs accumulated over padded, masked batches = the full-batch HVP."""
    apply_fn, variables, x, y, loss_fn = _mlp(n=50)
    params = variables["params"]
    full = lambda p: loss_fn(p, x, y)
    streamed = flatjax.dataset_loss(apply_fn, variables, (x, y), batch_size=16)  # 4 batches of 13
    assert float(jax.jit(streamed)(params)) == pytest.approx(float(full(params)), rel=1e-5)
    flat, unravel = ravel_pytree(params)
    v = unravel(jax.random.normal(KEY, flat.shape))
    want = ravel_pytree(flatjax.hvp(full, params, v))[0]
    np.testing.assert_allclose(
        ravel_pytree(flatjax.hvp(streamed, params, v))[0], want, rtol=1e-4, atol=1e-5
    )
    # Inside the caller's jit the same products are traced in place.
    jitted = jax.jit(lambda p, u: flatjax.hvp(streamed, p, u))(params, v)
    np.testing.assert_allclose(ravel_pytree(jitted)[0], want, rtol=1e-4, atol=1e-5)

    kw = dict(key=KEY, num_iters=40, tol=1e-6)
    eig_full = flatjax.hessian_top_eigenvalue(full, params, **kw)
    eig = flatjax.hessian_top_eigenvalue(streamed, params, **kw)
    assert float(eig.eigenvalue) == pytest.approx(float(eig_full.eigenvalue), rel=1e-4)
    eig_jit = jax.jit(lambda p: flatjax.hessian_top_eigenvalue(streamed, p, **kw))(params)
    assert abs(int(eig_jit.num_iters) - int(eig.num_iters)) <= 3  # rounding may stop it earlier
    assert float(eig_jit.eigenvalue) == pytest.approx(float(eig.eigenvalue), rel=1e-4)
    few = flatjax.hessian_top_eigenvalue(streamed, params, key=KEY, num_iters=3)
    assert int(few.num_iters) == 3
    v3 = np.asarray(ravel_pytree(few.eigenvector)[0])
    hv3 = np.asarray(ravel_pytree(flatjax.hvp(full, params, few.eigenvector))[0])
    # λ is the Rayleigh quotient of the returned vector.
    assert float(few.eigenvalue) == pytest.approx(float(v3 @ hv3), rel=1e-4)

    tr_full = flatjax.hessian_trace(full, params, key=KEY, num_samples=6)
    tr = flatjax.hessian_trace(streamed, params, key=KEY, num_samples=6)
    assert float(tr.mean) == pytest.approx(float(tr_full.mean), rel=1e-4)
    assert float(tr.stderr) == pytest.approx(float(tr_full.stderr), rel=1e-3)
    tr_jit = jax.jit(lambda p: flatjax.hessian_trace(streamed, p, key=KEY, num_samples=6))(params)
    assert float(tr_jit.mean) == pytest.approx(float(tr.mean), rel=1e-4)


# --- compile once ----------------------------------------------------------------


def _traces_of_every_tool(scale: int, batch_size: int) -> int:
    """How often a fresh ``apply_fn`` is traced by one round of every flatness tool."""
    x, y = blobs(n=30, dim=4, num_classes=3, seed=1)
    rng = np.random.default_rng(0)
    variables = {
        "params": {
            "kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=3), jnp.float32),
        }
    }
    traces = [0]

    def apply_fn(v, inputs):
        traces[0] += 1  # Python runs only while JAX traces
        return jnp.tanh(inputs @ v["params"]["kernel"] + v["params"]["bias"])

    data = (jnp.asarray(x), jnp.asarray(y))
    params = variables["params"]
    loss = flatjax.dataset_loss(apply_fn, variables, data, batch_size=batch_size)
    flatjax.hessian_top_eigenvalue(loss, params, key=KEY, num_iters=20 * scale, tol=1e-30)
    flatjax.hessian_trace(loss, params, key=KEY, num_samples=4 * scale)
    v = jax.tree.map(jnp.ones_like, params)
    flatjax.hvp(loss, params, v)
    flatjax.hvp(loss, params, v)
    for seed in range(2):  # same grid shape, other values: no new program
        sigmas = np.linspace(0.0, 0.1 + 0.05 * seed, 3 * scale)
        flatjax.local_energy(
            apply_fn, variables, data, sigmas, key=jax.random.PRNGKey(seed),
            num_draws=4 * scale, batch_size=batch_size, chunk_size=5,  # both leave a rest
        )  # fmt: skip
    return traces[0]


def test_every_tool_compiles_once_whatever_the_iterations_probes_sigmas_and_batches():
    small = _traces_of_every_tool(scale=1, batch_size=16)  # 2 batches
    large = _traces_of_every_tool(scale=3, batch_size=4)  # 8 batches, 3× everything
    assert small == large
    # The label check (1), the per-batch HVP (1), local energy's base, chunk and rest (3).
    assert large <= 5


# --- input checks and progress ---------------------------------------------------


def test_nan_inputs_labels_out_of_range_and_nan_params_raise():
    apply_fn, variables, x, y = _linear()
    bad_x = x.at[3, 1].set(jnp.nan).at[7, 0].set(jnp.inf)
    with pytest.raises(ValueError, match=r"inputs x contain NaN or inf in 2 of 40 .*index 3"):
        flatjax.dataset_loss(apply_fn, variables, (bad_x, y))
    with pytest.raises(ValueError, match=r"inputs x contain NaN"):
        flatjax.local_energy(apply_fn, variables, (bad_x, y), 0.1, key=KEY)
    with pytest.raises(ValueError, match=r"labels y must be class indices in \[0, 3\).*\[0, 3\]"):
        flatjax.dataset_loss(apply_fn, variables, (x, y.at[0].set(3)))
    with pytest.raises(ValueError, match=r"labels y .*got labels in \[-1, 2\]"):
        flatjax.local_energy(apply_fn, variables, (x, y.at[5].set(-1)), 0.1, key=KEY)
    nan_params = {"params": {**variables["params"], "bias": jnp.array([0.0, jnp.nan, 0.0])}}
    with pytest.raises(ValueError, match=r"params'\] contain NaN or inf at \['bias'\]"):
        flatjax.local_energy(apply_fn, nan_params, (x, y), 0.1, key=KEY)
    with pytest.raises(ValueError, match=r"contain NaN or inf"):
        flatjax.local_energy_fn(jnp.sum, jnp.array([1.0, jnp.nan]), 0.1, key=KEY)


def test_progress_lines_go_to_the_callable(monkeypatch):
    from flatjax.flatness import _progress

    monkeypatch.setattr(_progress, "_PROGRESS_EVERY", 0.0)  # a line at every step
    apply_fn, variables, x, y = _linear()
    loss = flatjax.dataset_loss(apply_fn, variables, (x, y), batch_size=16)
    params = variables["params"]
    lines = []
    flatjax.hessian_top_eigenvalue(
        loss, params, key=KEY, num_iters=5, tol=1e-30, progress=lines.append
    )
    assert [line.split(",")[0] for line in lines] == [
        f"hessian_top_eigenvalue: {i}/5" for i in range(1, 6)
    ]
    assert lines[-1].startswith("hessian_top_eigenvalue: 5/5, λ = ")
    lines.clear()
    flatjax.hessian_trace(loss, params, key=KEY, num_samples=3, progress=lines.append)
    assert [line.split(" (")[0] for line in lines] == [f"hessian_trace: {i}/3" for i in (1, 2, 3)]
    lines.clear()
    le = flatjax.local_energy(
        apply_fn, variables, (x, y), [0.0, 0.1], key=KEY, num_draws=4, chunk_size=3,
        progress=lines.append,
    )  # fmt: skip
    quiet = flatjax.local_energy(apply_fn, variables, (x, y), [0.0, 0.1], key=KEY, num_draws=4,
                                 chunk_size=3)  # fmt: skip
    np.testing.assert_array_equal(le.mean, quiet.mean)
    # Ticks from inside the compiled program (after the base, 1, and after the chunk of
    # 3 draws, 4, in either order: only rising counts are shown), then the end.
    counts = [line.split(" (")[0] for line in lines]
    assert counts[-1] == "local_energy: 5/5 evaluations"
    assert counts[:-1] in (["local_energy: 1/5 evaluations", "local_energy: 4/5 evaluations"],
                           ["local_energy: 4/5 evaluations"])  # fmt: skip
    assert all(line.count("\n") == 0 for line in lines)
    with pytest.raises(TypeError, match="progress"):
        flatjax.hessian_trace(loss, params, key=KEY, progress="yes")


def test_a_convolutional_network_is_recognised_for_the_chunk_heuristic():
    from flatjax.flatness import _chunks

    kernel = jnp.ones((3, 3, 1, 2))
    conv = lambda v, x: jnp.mean(
        jax.lax.conv_general_dilated(x, v["params"]["k"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")), axis=(1, 2)
    )  # fmt: skip
    x, y = jnp.ones((4, 5, 5, 1)), jnp.array([0, 1, 0, 1])
    assert flatjax.dataset_loss(conv, {"params": {"k": kernel}}, (x, y)).energy.has_conv
    apply_fn, variables, xs, ys = _linear()
    assert not flatjax.dataset_loss(apply_fn, variables, (xs, ys)).energy.has_conv
    if jax.default_backend() == "cpu":
        assert _chunks._default_chunk_size(100, 10, 50, has_conv=True) == 1
