"""Gaussian mixture theory: exact errors against Monte Carlo, known limits, estimators."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flatjax import theory


def _unit(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v)


def _classifier_with_overlap(v, m, seed=0):
    """A unit vector w with w·v = m."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=v.shape)
    u -= (u @ v) * v
    return m * v + math.sqrt(1 - m * m) * _unit(u)


# --------------------------------------------------------------------------- exact errors


@pytest.mark.parametrize(
    "rho, bias, overlap",
    [(0.5, 0.0, 0.6), (0.5, 0.0, -0.4), (0.25, 0.4, 0.7), (0.25, -0.6, 0.3), (0.8, 0.5, -0.5)],
)
def test_generalization_error_matches_monte_carlo(rho, bias, overlap):
    dim, delta, n = 20, 1.5, 200_000
    v = theory.teacher_direction(jax.random.key(0), dim)
    w = 3.0 * _classifier_with_overlap(np.asarray(v, np.float64), overlap)
    x, y = theory.sample_mixture(jax.random.key(1), v, n, delta=delta, rho=rho)
    mc = float(jnp.mean(jnp.sign(x @ jnp.asarray(w, jnp.float32) + bias) != y))
    exact = float(theory.generalization_error(w, bias, v, delta=delta, rho=rho))
    assert abs(mc - exact) < 4 * math.sqrt(exact * (1 - exact) / n) + 1e-4
    assert abs(float(jnp.mean(y == 1)) - rho) < 4 * math.sqrt(rho * (1 - rho) / n)


def test_generalization_error_sign_conventions():
    v = jnp.array([1.0, 0.0, 0.0])
    h = lambda u: 0.5 * math.erfc(u / math.sqrt(2))
    # The cluster direction itself: H(1/√Δ); its opposite: 1 − H(1/√Δ).
    assert float(theory.generalization_error(v, 0.0, v, delta=4.0)) == pytest.approx(h(0.5))
    assert float(theory.generalization_error(-v, 0.0, v, delta=4.0)) == pytest.approx(1 - h(0.5))
    # A huge positive bias says +1 always: error 1 − ρ.
    assert float(theory.generalization_error(v, 1e6, v, rho=0.25)) == pytest.approx(0.75)
    assert float(theory.generalization_error(v, -1e6, v, rho=0.25)) == pytest.approx(0.25)


@pytest.mark.parametrize("scale", [1e-3, 0.5, 1e3])
def test_errors_are_invariant_to_positive_rescaling(scale):
    data = theory.gaussian_mixture(jax.random.key(3), dim=30, alpha=2.0, rho=0.3)
    w = theory.hebbian(data.x, data.y)
    b = 0.2
    eg = theory.generalization_error(w, b, data.v, rho=0.3)
    assert float(theory.generalization_error(scale * w, scale * b, data.v, rho=0.3)) == (
        pytest.approx(float(eg), rel=1e-5)
    )
    # The norm of w alone (b = 0) does not matter either.
    assert float(theory.generalization_error(scale * w, 0.0, data.v)) == pytest.approx(
        float(theory.generalization_error(w, 0.0, data.v)), rel=1e-5
    )
    assert float(theory.training_error(scale * w, scale * b, data.x, data.y)) == float(
        theory.training_error(w, b, data.x, data.y)
    )
    le = theory.classifier_local_energy(w, b, data.x, data.y, [0.1, 0.3])
    le_scaled = theory.classifier_local_energy(scale * w, scale * b, data.x, data.y, [0.1, 0.3])
    np.testing.assert_allclose(le_scaled, le, atol=1e-5)
    le = theory.classifier_local_energy(w, b, data.x, data.y, [0.5, 2.0], noise="relative")
    le_scaled = theory.classifier_local_energy(scale * w, scale * b, data.x, data.y, [0.5, 2.0],
                                               noise="relative")
    np.testing.assert_allclose(le_scaled, le, atol=1e-5)
    p = {"w": w, "b": jnp.asarray(b)}
    ps = {"w": scale * w, "b": jnp.asarray(scale * b)}
    assert float(theory.smoothed_error(ps, data.x, data.y, 0.5)) == pytest.approx(
        float(theory.smoothed_error(p, data.x, data.y, 0.5)), rel=1e-5
    )


def test_bayes_optimal_error_closed_forms():
    for alpha, delta in [(0.5, 1.0), (2.0, 1.0), (3.0, 0.5)]:
        balanced = 0.5 * math.erfc(math.sqrt(alpha / (delta * (alpha + delta))) / math.sqrt(2))
        assert theory.bayes_optimal_error(alpha, delta) == pytest.approx(balanced)
    # The paper's numbers at Δ = 1.
    assert [round(theory.bayes_optimal_error(a), 3) for a in (0.5, 2.0, 5.0)] == [
        0.282, 0.207, 0.181
    ]
    # Unbalanced: never worse than predicting the majority class, and the
    # optimal bias minimises ε_g over b for a direction of overlap m.
    for rho in (0.1, 0.25, 0.7):
        assert theory.bayes_optimal_error(1.0, 1.0, rho) < min(rho, 1 - rho)
        m = theory.bayes_optimal_overlap(1.0, 1.0)
        v = np.eye(8)[0]
        w = _classifier_with_overlap(v, m)
        grid = np.linspace(-3, 3, 601)
        errs = [float(theory.generalization_error(w, b, v, rho=rho)) for b in grid]
        assert theory.bayes_optimal_bias(m, 1.0, rho) == pytest.approx(grid[np.argmin(errs)],
                                                                       abs=0.011)
        assert theory.bayes_optimal_error(1.0, 1.0, rho) == pytest.approx(min(errs), abs=1e-5)


@pytest.mark.parametrize("alpha, expected", [(0.5, 0.282), (2.0, 0.207), (5.0, 0.181)])
def test_hebbian_reaches_bayes_optimal_as_n_grows(alpha, expected):
    assert theory.bayes_optimal_error(alpha) == pytest.approx(expected, abs=6e-4)
    for dim in (100, 400):
        errors = []
        for seed in range(6):
            data = theory.gaussian_mixture(jax.random.key(seed), dim, alpha)
            w = theory.hebbian(data.x, data.y)
            errors.append(float(theory.generalization_error(w, 0.0, data.v)))
        # Fluctuations and finite-size corrections are O(1/√N).
        assert abs(np.mean(errors) - expected) < 0.25 / math.sqrt(dim), (dim, np.mean(errors))


def test_hebbian_overlap_and_bayes_classifier():
    data = theory.gaussian_mixture(jax.random.key(0), dim=2000, alpha=1.0, rho=0.25)
    w, b = theory.bayes_optimal_classifier(data.x, data.y, rho=0.25)
    m = float(w @ data.v / jnp.linalg.norm(w))
    assert m == pytest.approx(theory.bayes_optimal_overlap(1.0), abs=0.03)
    assert float(theory.generalization_error(w, b, data.v, rho=0.25)) == pytest.approx(
        theory.bayes_optimal_error(1.0, 1.0, 0.25), abs=0.01
    )
    np.testing.assert_allclose(
        theory.hebbian(jnp.array([[1.0, 2.0], [3.0, 1.0]]), jnp.array([1.0, -1.0])), [-1.0, 0.5]
    )


def test_data_are_deterministic_by_key():
    a = theory.gaussian_mixture(jax.random.key(7), dim=10, alpha=0.5, rho=0.3)
    b = theory.gaussian_mixture(jax.random.key(7), dim=10, alpha=0.5, rho=0.3)
    c = theory.gaussian_mixture(jax.random.key(8), dim=10, alpha=0.5, rho=0.3)
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.array_equal(a.x, c.x)
    assert a.x.shape == (5, 10)
    assert float(jnp.linalg.norm(a.v)) == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------- local energy


@pytest.mark.parametrize("energy", ["error", "logistic", "square", "hinge"])
@pytest.mark.parametrize("noise", ["multiplicative", "additive", "relative"])
def test_local_energy_matches_monte_carlo(energy, noise):
    data = theory.gaussian_mixture(jax.random.key(0), dim=10, alpha=3.0, rho=0.4)
    w = theory.hebbian(data.x, data.y)
    b, sigma, draws = 0.3, 0.3, 4_000
    exact = float(theory.classifier_local_energy(
        w, b, data.x, data.y, [sigma], energy=energy, noise=noise)[0])
    kz, kb = jax.random.split(jax.random.key(1))
    zw = jax.random.normal(kz, (draws, w.shape[0]))
    zb = jax.random.normal(kb, (draws,))
    if noise == "multiplicative":
        ws, bs = w * (1 + sigma * zw), b * (1 + sigma * zb)
    elif noise == "relative":  # w + σ‖w‖/√N z, the bias left alone
        ws = w + sigma * jnp.linalg.norm(w) / math.sqrt(w.shape[0]) * zw
        bs = jnp.full(draws, b)
    else:
        ws, bs = w + sigma * zw, b + sigma * zb
    margins = data.y * (ws @ data.x.T + bs[:, None])
    if energy == "error":
        values, base = jnp.mean(margins <= 0, axis=1), theory.training_error(w, b, data.x, data.y)
    else:
        values = jnp.mean(theory.LOSSES[energy](margins), axis=1)
        base = theory.margin_loss({"w": w, "b": jnp.asarray(b)}, data.x, data.y, energy)
    mc = values - base
    assert exact == pytest.approx(float(mc.mean()), abs=4 * float(mc.std()) / math.sqrt(draws))


def test_local_energy_at_zero_noise_is_zero():
    data = theory.gaussian_mixture(jax.random.key(0), dim=10, alpha=3.0)
    w = theory.hebbian(data.x, data.y)
    np.testing.assert_allclose(
        theory.classifier_local_energy(w, 0.0, data.x, data.y, [0.0], energy="logistic"), [0.0]
    )
    assert float(theory.classifier_local_energy(w, 0.0, data.x, data.y, [0.0])[0]) == 0.0


def test_smoothed_error_tends_to_training_error():
    data = theory.gaussian_mixture(jax.random.key(0), dim=10, alpha=3.0)
    w = theory.hebbian(data.x, data.y)
    p = {"w": w, "b": jnp.zeros(())}
    assert float(theory.smoothed_error(p, data.x, data.y, 1e-4)) == pytest.approx(
        float(theory.training_error(w, 0.0, data.x, data.y)), abs=1e-6
    )


# --------------------------------------------------------------------------- estimators


def _separable(seed=0):
    """Well separated clusters (Δ small): linearly separable with a wide margin."""
    return theory.gaussian_mixture(jax.random.key(seed), dim=10, alpha=2.0, delta=0.02)


@pytest.mark.parametrize("bias", [False, True])
def test_erm_square_is_the_ridge_normal_equation(bias):
    data = theory.gaussian_mixture(jax.random.key(0), dim=8, alpha=3.0, rho=0.3)
    x, y = np.asarray(data.x, np.float64), np.asarray(data.y, np.float64)
    w, b = theory.erm(x, y, loss="square", ridge=0.5, bias=bias)
    w, b = np.asarray(w, np.float64), float(b)
    r = y - x @ w - b  # gradient of (1/2P)Σ r² + (λ/2)‖w‖² vanishes
    np.testing.assert_allclose(-x.T @ r / len(y) + 0.5 * w, 0.0, atol=1e-5)
    if bias:
        assert abs(r.mean()) < 1e-5


def test_erm_square_without_ridge_interpolates_below_p_equals_n():
    data = theory.gaussian_mixture(jax.random.key(0), dim=20, alpha=0.5)
    w, b = theory.erm(data.x, data.y, loss="square")
    np.testing.assert_allclose(data.x @ w, data.y, atol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
def test_erm_logistic_with_ridge_is_stationary(bias):
    # The same shape as _separable(): one compilation of the solver.
    data = theory.gaussian_mixture(jax.random.key(0), dim=10, alpha=2.0, rho=0.3)
    w, b = theory.erm(data.x, data.y, loss="logistic", ridge=0.1, bias=bias)
    params = {"w": w, "b": b}

    def objective(p):
        return theory.margin_loss(p, data.x, data.y, "logistic") + 0.05 * p["w"] @ p["w"]

    g = jax.grad(objective)(params)
    assert float(jnp.linalg.norm(g["w"])) < 1e-4
    if bias:
        assert abs(float(g["b"])) < 1e-4


def test_erm_logistic_and_max_margin_separate_separable_data():
    data = _separable()
    w, b = theory.erm(data.x, data.y, loss="logistic")
    assert float(theory.training_error(w, b, data.x, data.y)) == 0.0
    wb, bb = theory.max_margin(data.x, data.y, bias=True)
    assert float(theory.training_error(wb, bb, data.x, data.y)) == 0.0
    # Without bias, the max-margin direction has the largest smallest
    # normalised margin of all separators through the origin.
    wm, bm = theory.max_margin(data.x, data.y)
    kappa = lambda w, b: float(jnp.min(data.y * (data.x @ w + b)) / jnp.linalg.norm(w))
    wh = theory.hebbian(data.x, data.y)
    assert kappa(wm, bm) >= kappa(w, b) - 1e-3
    assert kappa(wm, bm) >= kappa(wh, 0.0) - 1e-3


def test_max_margin_raises_on_non_separable_data():
    x = jnp.array([[1.0], [1.0]])
    with pytest.raises(ValueError, match="not linearly separable"):
        theory.max_margin(x, jnp.array([1.0, -1.0]))


def test_erm_hinge_with_large_ridge_is_hebbian():
    # For λ large every hinge is active: w = (1/λP) Σ y x, the Hebbian direction.
    data = theory.gaussian_mixture(jax.random.key(0), dim=10, alpha=2.0)
    w, _ = theory.erm(data.x, data.y, loss="hinge", ridge=1e3)
    wh = theory.hebbian(data.x, data.y)
    assert float(w @ wh / (jnp.linalg.norm(w) * jnp.linalg.norm(wh))) > 0.999


def test_select_ridge_uses_a_held_out_split():
    data = theory.gaussian_mixture(jax.random.key(0), dim=20, alpha=2.0)
    w, b, lam = theory.select_ridge(jax.random.key(1), data.x, data.y, loss="square",
                                    ridges=[0.01, 10.0])
    assert lam in (0.01, 10.0)
    np.testing.assert_allclose(w, theory.erm(data.x, data.y, loss="square", ridge=lam)[0])
    fit, val = theory.train_validation_split(jax.random.key(1), 40, 0.25)
    assert len(val) == 10 and not set(fit) & set(val) and len(fit) + len(val) == 40


@pytest.mark.parametrize("loss", ["logistic", "error"])
@pytest.mark.parametrize("fit", [theory.replicated_sgd_fit, theory.entropy_sgd_fit])
def test_flat_estimators_learn_a_finite_better_than_chance_classifier(fit, loss):
    data = theory.gaussian_mixture(jax.random.key(0), dim=20, alpha=4.0, rho=0.4)
    lr = {"learning_rate": 0.02} if fit is theory.replicated_sgd_fit and loss == "error" else {}
    w, b = fit(jax.random.key(1), data.x, data.y, loss=loss, temperature=0.5, bias=True,
               num_steps=40, batch_size=16, **lr)
    assert bool(jnp.all(jnp.isfinite(w))) and bool(jnp.isfinite(b))
    assert float(theory.generalization_error(w, b, data.v, rho=0.4)) < 0.3  # chance: 0.4


@pytest.mark.parametrize("fit", [theory.replicated_sgd_fit, theory.entropy_sgd_fit])
def test_flat_estimators_use_only_the_first_num_points_rows_and_vmap(fit):
    data = theory.gaussian_mixture(jax.random.key(0), dim=10, alpha=3.0)
    x2 = data.x.at[20:].set(100.0)  # rows past num_points must not matter
    batched = jax.vmap(lambda x, n: fit(jax.random.key(1), x, data.y, num_steps=10,
                                        batch_size=8, num_points=n))
    ws, _ = batched(jnp.stack([data.x, x2]), jnp.array([20, 20]))
    np.testing.assert_allclose(ws[0], ws[1], atol=1e-6)


# --------------------------------------------------------------------------- errors

KEY = jax.random.key(0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: theory.gaussian_mixture(KEY, 10, 0.0), "alpha"),
        (lambda: theory.gaussian_mixture(KEY, 10, -1.0), "alpha"),
        (lambda: theory.gaussian_mixture(KEY, 10, 1.0, delta=0.0), "delta"),
        (lambda: theory.gaussian_mixture(KEY, 10, 1.0, rho=0.0), "rho"),
        (lambda: theory.gaussian_mixture(KEY, 10, 1.0, rho=1.0), "rho"),
        (lambda: theory.gaussian_mixture(KEY, 0, 1.0), "dim"),
        (lambda: theory.gaussian_mixture(KEY, 2.5, 1.0), "dim"),
        (lambda: theory.teacher_direction(KEY, 0), "dim"),
        (lambda: theory.sample_mixture(KEY, jnp.ones(3), 0), "num_samples"),
        (lambda: theory.sample_mixture(KEY, jnp.ones((3, 3)), 2), "vector"),
        (lambda: theory.bayes_optimal_error(0.0), "alpha"),
        (lambda: theory.bayes_optimal_error(1.0, -1.0), "delta"),
        (lambda: theory.bayes_optimal_error(1.0, 1.0, 1.5), "rho"),
        (lambda: theory.bayes_optimal_bias(0.0), "overlap"),
        (lambda: theory.generalization_error(jnp.ones(3), 0.0, jnp.ones(3), delta=0.0), "delta"),
        (lambda: theory.generalization_error(jnp.ones(3), 0.0, jnp.ones(3), rho=-0.1), "rho"),
        (lambda: theory.generalization_error(jnp.ones(3), 0.0, jnp.ones(4)), "shape"),
        (lambda: theory.hebbian(jnp.ones((3, 2)), jnp.ones(2)), "shape"),
        (lambda: theory.hebbian(jnp.ones((2, 2)), jnp.array([1.0, 0.0])), "labels"),
        (lambda: theory.erm(jnp.ones((2, 2)), jnp.ones(2), loss="cubic"), "loss"),
        (lambda: theory.erm(jnp.ones((2, 2)), jnp.ones(2), loss="square", ridge=-1.0), "ridge"),
        (lambda: theory.select_ridge(KEY, jnp.ones((4, 2)), jnp.ones(4), loss="square",
                                     ridges=[]), "ridges"),
        (lambda: theory.train_validation_split(KEY, 4, 1.0), "validation_fraction"),
        (lambda: theory.train_validation_split(KEY, 1, 0.5), "hold out"),
        (lambda: theory.margin_loss({"w": jnp.ones(1), "b": 0.0}, jnp.ones((1, 1)),
                                    jnp.ones(1), "cubic"), "loss"),
        (lambda: theory.classifier_local_energy(jnp.ones(1), 0.0, jnp.ones((1, 1)),
                                                jnp.ones(1), [0.1], energy="x"), "energy"),
        (lambda: theory.classifier_local_energy(jnp.ones(1), 0.0, jnp.ones((1, 1)),
                                                jnp.ones(1), [0.1], noise="x"), "noise"),
        (lambda: theory.classifier_local_energy(jnp.ones(1), 0.0, jnp.ones((1, 1)),
                                                jnp.ones(1), [-0.1]), "sigmas"),
        (lambda: theory.replicated_sgd_fit(KEY, jnp.ones((4, 2)), jnp.ones(4), loss="x"), "loss"),
        (lambda: theory.replicated_sgd_fit(KEY, jnp.ones((4, 2)), jnp.ones(4), loss="error",
                                           temperature=0.0), "temperature"),
        (lambda: theory.replicated_sgd_fit(KEY, jnp.ones((4, 2)), jnp.ones(3)), "expected"),
        (lambda: theory.replicated_sgd_fit(KEY, jnp.ones((4, 2)), jnp.ones(4), num_steps=0),
         "num_steps"),
        (lambda: theory.entropy_sgd_fit(KEY, jnp.ones((4, 2)), jnp.ones(4), num_points=5),
         "num_points"),
        (lambda: theory.entropy_sgd_fit(KEY, jnp.ones((4, 2)), jnp.ones(4), inner_steps=0),
         "inner_steps"),
    ],
)
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- fixed-norm square loss and the fixed-distance replicated scheme


def _mse(w, b, x, y):
    return float(np.mean((y - x @ np.asarray(w, np.float64) - float(b)) ** 2))


def test_fixed_norm_mse_at_least_squares_norm_is_least_squares():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(70, 12)) * 0.7 + 0.2
    y = np.where(rng.random(70) < 0.3, 1.0, -1.0)
    xc, yc = x - x.mean(0), y - y.mean()
    w_ls = np.linalg.lstsq(xc, yc, rcond=None)[0]
    w, b = theory.fixed_norm_mse(x, y, float(np.linalg.norm(w_ls)))
    np.testing.assert_allclose(np.asarray(w), w_ls, atol=1e-5)
    np.testing.assert_allclose(float(b), y.mean() - x.mean(0) @ w_ls, atol=1e-5)


@pytest.mark.parametrize("shape, factor", [((50, 10), 0.2), ((50, 10), 4.0), ((8, 16), 5.0)])
def test_fixed_norm_mse_is_the_sphere_minimum(shape, factor):
    rng = np.random.default_rng(4)
    x = rng.normal(size=shape)
    y = np.sign(rng.normal(size=shape[0]))
    least_squares = np.linalg.lstsq(x - x.mean(0), y - y.mean(), rcond=None)[0]
    radius = factor * float(np.linalg.norm(least_squares))
    w, b = theory.fixed_norm_mse(x, y, radius)
    assert abs(float(np.linalg.norm(w)) - radius) < 1e-4 * radius
    best = _mse(w, b, x, y)
    # no random point of the sphere (with its optimal bias) does better
    for _ in range(200):
        u = rng.normal(size=shape[1])
        u = np.asarray(w) + 0.3 * radius * u / np.linalg.norm(u)
        u *= radius / np.linalg.norm(u)
        assert _mse(u, y.mean() - x.mean(0) @ u, x, y) >= best - 1e-6
    # and projected gradient descent on the sphere reaches the same loss
    w2, b2 = theory.fixed_distance_replicated_mse(x, y, radius, 1.0, num_steps=5000, seed=1)
    assert abs(_mse(w2, b2, x, y) - best) < 1e-4


def test_replicated_distance_to_zero_reduces_to_fixed_norm():
    data = theory.gaussian_mixture(jax.random.PRNGKey(5), 30, 3.0, delta=0.7, rho=0.4)
    x, y = np.asarray(data.x), np.asarray(data.y)
    w, b = theory.fixed_norm_mse(x, y, 1.5)
    w2, b2 = theory.fixed_distance_replicated_mse(x, y, 1.5, 1.0 - 1e-7, num_steps=3000)
    np.testing.assert_allclose(np.asarray(w2), np.asarray(w), atol=2e-3)
    np.testing.assert_allclose(float(b2), float(b), atol=2e-3)
    # the replicas' constraint is exact at any q
    w3, _ = theory.fixed_distance_replicated_mse(x, y, 1.5, 0.6, num_steps=200)
    assert abs(float(np.linalg.norm(w3)) - 1.5) < 1e-4


def test_fixed_norm_inputs_and_error_checks():
    x = np.ones((3, 2))
    y = np.array([1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="radius"):
        theory.fixed_norm_mse(x, y, 0.0)
    with pytest.raises(ValueError, match="x holds NaN"):
        theory.fixed_norm_mse(np.full((3, 2), np.nan), y, 1.0)
    with pytest.raises(ValueError, match="overlap"):
        theory.fixed_distance_replicated_mse(x, y, 1.0, 1.5)
    with pytest.raises(ValueError, match="zero vector"):
        theory.generalization_error(np.zeros(2), 0.0, np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="w holds NaN"):
        theory.generalization_error(np.array([np.nan, 1.0]), 0.0, np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="w holds NaN"):
        theory.training_error(np.array([np.nan, 1.0]), 0.0, x, y)


# ---- ridge limits, the separately fitted bias, and the flatness of the error count


def test_erm_square_vanishing_ridge_is_least_squares():
    rng = np.random.default_rng(11)
    for p in (30, 6):  # over- and under-determined: least squares, then its minimum norm
        x = rng.normal(size=(p, 12))
        y = np.sign(rng.normal(size=p))
        w, _ = theory.erm(x, y, loss="square", ridge=1e-9)
        np.testing.assert_allclose(np.asarray(w), np.linalg.pinv(x) @ y, rtol=1e-3, atol=1e-4)


def test_erm_logistic_large_ridge_is_the_hebbian_over_two_lambda():
    # (1/P) Σ softplus(−y w·x) + (λ/2)‖w‖²: at m → 0, σ(−m) = 1/2 and w = hebbian / (2λ).
    data = theory.gaussian_mixture(jax.random.key(2), dim=10, alpha=2.0, delta=0.6)
    lam = 300.0
    w, _ = theory.erm(data.x, data.y, loss="logistic", ridge=lam)
    expected = np.asarray(theory.hebbian(data.x, data.y)) / (2 * lam)
    np.testing.assert_allclose(np.asarray(w), expected, rtol=2e-2, atol=1e-6)


def test_fit_bias_is_the_bayes_threshold_on_the_cluster_direction():
    delta, rho = 0.7, 0.2
    v = np.eye(6)[0]
    x, y = theory.sample_mixture(jax.random.key(3), v, 40_000, delta=delta, rho=rho)
    b = float(theory.fit_bias(3.0 * v, x, y))  # ‖w‖ = 3: the bias scales with it
    assert b / 3.0 == pytest.approx(theory.bayes_optimal_bias(1.0, delta, rho), abs=0.03)
    # symmetric balanced data: the midpoint
    x2 = np.concatenate([np.asarray(x[:50]), -np.asarray(x[:50])])
    y2 = np.concatenate([np.asarray(y[:50]), -np.asarray(y[:50])])
    assert float(theory.fit_bias(v, x2, y2)) == pytest.approx(0.0, abs=1e-6)


def test_fixed_distance_local_energy_matches_sampled_shell():
    data = theory.gaussian_mixture(jax.random.key(4), dim=40, alpha=2.0, delta=0.8, rho=0.35)
    x, y = data.x, data.y
    w = theory.hebbian(x, y)
    u = w / jnp.linalg.norm(w)
    q, tau, b, draws = 0.6, 0.3, 0.2, 3_000
    g = jax.random.normal(jax.random.key(5), (draws, 40))
    t = g - (g @ u)[:, None] * u
    t = t / jnp.linalg.norm(t, axis=1, keepdims=True)
    reps = q * u + math.sqrt(1 - q * q) * t  # uniform on the shell of overlap q
    per = jnp.mean(theory.gaussian_tail(y * (reps @ x.T + b) / tau), axis=1)
    exact = float(theory.fixed_distance_local_energy(5.0 * w, b, x, y, q, temperature=tau))
    # Monte Carlo error, plus the Gaussian law of t·x at N = 40
    assert exact == pytest.approx(float(per.mean()), abs=4 * float(per.std()) / math.sqrt(draws)
                                  + 3e-3)


def test_fixed_distance_local_energy_at_overlap_one_is_the_smoothed_error():
    data = theory.gaussian_mixture(jax.random.key(4), dim=15, alpha=2.0, rho=0.35)
    w = theory.hebbian(data.x, data.y)
    b = 0.3
    # the shell's bias belongs to the unit centre; smoothed_error normalises (w, b) by ‖w‖
    shell = theory.fixed_distance_local_energy(w, b, data.x, data.y, 1.0, temperature=0.4)
    p = {"w": w, "b": jnp.asarray(b * jnp.linalg.norm(w))}
    assert float(shell) == pytest.approx(float(theory.smoothed_error(p, data.x, data.y, 0.4)),
                                         abs=1e-6)


def test_far_shell_centre_is_the_hebbian_direction():
    # q → 0: every term is linear in the margins; the minimiser is the Hebbian direction.
    data = theory.gaussian_mixture(jax.random.key(6), dim=25, alpha=3.0, delta=1.3)
    w, b = theory.fixed_distance_error_fit(jax.random.key(7), data.x, data.y, 0.05,
                                           num_steps=400, learning_rate=0.05)
    h = theory.hebbian(data.x, data.y)
    assert float(b) == 0.0 and float(jnp.linalg.norm(w)) == pytest.approx(1.0, abs=1e-5)
    assert float(w @ h / jnp.linalg.norm(h)) > 0.995


def test_replicated_error_at_overlap_one_is_the_shell_fit():
    data = theory.gaussian_mixture(jax.random.key(8), dim=12, alpha=3.0, rho=0.4)
    init = theory.hebbian(data.x, data.y) + 0.3
    kw = {"temperature": 0.25, "bias": True, "num_steps": 120, "init": init}
    w1, b1 = theory.fixed_distance_error_fit(jax.random.key(0), data.x, data.y, 1.0, **kw)
    w2, b2 = theory.fixed_distance_replicated_error(jax.random.key(1), data.x, data.y, 1.0,
                                                    num_replicas=2, **kw)
    np.testing.assert_allclose(np.asarray(w2), np.asarray(w1), atol=1e-5)
    assert float(b2) == pytest.approx(float(b1), abs=1e-5)


def test_one_replica_reaches_the_sphere_minimum_of_the_smoothed_error():
    # y = 1: the centre is free, so the replica alone minimises E_τ on the sphere.
    data = theory.gaussian_mixture(jax.random.key(9), dim=12, alpha=3.0)
    tau = 0.5
    h = theory.hebbian(data.x, data.y)
    _, _, reps = theory.fixed_distance_replicated_error(
        jax.random.key(2), data.x, data.y, 0.5, num_replicas=1, temperature=tau, num_steps=600,
        learning_rate=0.05, init=h, return_replicas=True)
    w_min, _ = theory.fixed_distance_error_fit(jax.random.key(3), data.x, data.y, 1.0,
                                               temperature=tau, num_steps=600, learning_rate=0.05,
                                               init=h)
    e = lambda w: float(theory.smoothed_error({"w": w, "b": jnp.zeros(())}, data.x, data.y, tau))
    assert abs(float(jnp.linalg.norm(reps[0])) - 1.0) < 1e-5
    assert e(reps[0]) == pytest.approx(e(w_min), abs=2e-3)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: theory.fixed_distance_local_energy(jnp.ones(2), 0.0, jnp.ones((3, 2)),
                                                    jnp.ones(3), 0.0), "overlap"),
        (lambda: theory.fixed_distance_local_energy(jnp.ones(2), 0.0, jnp.ones((3, 2)),
                                                    jnp.ones(3), 1.0), "no gradient"),
        (lambda: theory.fixed_distance_local_energy(jnp.zeros(2), 0.0, jnp.ones((3, 2)),
                                                    jnp.ones(3), 0.5), "nonzero"),
        (lambda: theory.fixed_distance_error_fit(KEY, jnp.ones((3, 2)), jnp.ones(3), 0.5,
                                                 temperature=-1.0), "temperature"),
        (lambda: theory.fixed_distance_error_fit(KEY, jnp.ones((3, 2)), jnp.ones(3), 0.5,
                                                 learning_rate=0.0), "learning_rate"),
        (lambda: theory.fixed_distance_replicated_error(KEY, jnp.ones((3, 2)), jnp.ones(3), 0.5,
                                                        temperature=0.0), "temperature"),
        (lambda: theory.fixed_distance_replicated_error(KEY, jnp.ones((3, 2)), jnp.ones(3), 0.5,
                                                        num_replicas=0), "num_replicas"),
        (lambda: theory.fit_bias(jnp.ones(2), jnp.ones((3, 2)), jnp.ones(3)), "both classes"),
        (lambda: theory.fit_bias(jnp.zeros(2), jnp.ones((3, 2)), jnp.array([1.0, -1.0, 1.0])),
         "nonzero"),
    ],
)
def test_flat_error_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("factor", [0.5, 1.5])
def test_replicas_at_fixed_distance_collapse_on_the_sphere_minimum(factor):
    # With y free replicas the optimum puts every replica at the sphere minimum w*,
    # so the centre ends at overlap q with w* (anywhere on that cone).
    rng = np.random.default_rng(12)
    x = rng.normal(size=(60, 10)) + 0.3 * np.sign(rng.normal(size=(60, 1)))
    y = np.sign(x[:, 0] + 0.5 * rng.normal(size=60))
    ls = np.linalg.lstsq(x - x.mean(0), y - y.mean(), rcond=None)[0]
    radius, q = factor * float(np.linalg.norm(ls)), 0.6
    w_star, _ = theory.fixed_norm_mse(x, y, radius)
    c, _ = theory.fixed_distance_replicated_mse(x, y, radius, q, num_replicas=3, num_steps=4000)
    assert float(np.asarray(c) @ np.asarray(w_star)) / radius**2 == pytest.approx(q, abs=0.01)
