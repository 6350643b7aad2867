"""Tests for flatjax.models: published parameter counts, shapes, one SGD step
per family, BatchNorm bookkeeping and ShakeDrop's randomness."""

import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flatjax.models import (
    MODELS,
    Conv1D,
    EfficientNet,
    MLPTiny,
    PyramidNet,
    PyramidNetTiny,
    ResNet,
    ResNet110,
    ResNetTiny,
    ShakeDrop,
    WideResNet,
    conv_output_length,
    get_model,
    num_params,
    pyramid_widths,
    round_filters,
    shake_drop,
)

KEY = jax.random.PRNGKey(0)

# These runs are tiny: XLA's backend optimisations cost far more CPU at compile
# time than they save at run time, so tests compile without them.
fast_jit = partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def random_variables(model, x, seed=0):
    """He-normal kernels, unit BN scales, zero biases, from ``init``'s shapes.

    Compiling ``model.init`` (one threefry per parameter) costs more CPU than
    everything else these tests do with a tiny model, so the values are
    drawn with NumPy into the tree that ``jax.eval_shape(model.init)`` gives.
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean"):
            return jnp.zeros(leaf.shape, leaf.dtype)
        std = math.sqrt(2.0 / math.prod(leaf.shape[:-1]))
        return jnp.asarray(rng.normal(scale=std, size=leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(model.init, KEY, x))


def dense_count(sizes):
    """Parameters of a chain of dense layers with biases: Σ (n_{k−1} + 1) n_k."""
    return sum((a + 1) * b for a, b in zip(sizes[:-1], sizes[1:], strict=True))


def count(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


# --- published parameter counts and output shapes of the full models -----------------

# (model, input batch shape, num_classes, parameter count, source)
FULL_MODELS = [
    # LeCun et al. 1998, the 784-300-100-10 network.
    (get_model("mlp", 10), (2, 28, 28, 1), 10, 266_610),
    (get_model("mlp_wide", 10), (2, 28, 28, 1), 10, dense_count([784, 1024, 1024, 10])),
    # d2l.ai LeNet (first conv padded by 2 on 28×28), the classic 61,706.
    (get_model("lenet5", 10), (2, 28, 28, 1), 10, 61_706),
    # Greydanus 2020 MNIST-1D ConvBase: (5·1 + 1)·25 + 2·(3·25 + 1)·25 + (125 + 1)·10.
    (get_model("cnn1d", 10), (2, 40), 10, 5_210),
    # kuangliu/pytorch-cifar ResNet18.
    (get_model("resnet18", 10), (2, 32, 32, 3), 10, 11_173_962),
    # He et al. 2016, option-A shortcuts. The often-quoted 1,730,714 is the
    # option-B (projection) count, pinned below; the difference is the two
    # stage-entry 1×1 convs + BN: (16·32 + 64) + (32·64 + 128) = 2,752.
    (get_model("resnet110", 10), (2, 32, 32, 3), 10, 1_727_962),
    (ResNet110(num_classes=10, shortcut="projection"), (2, 32, 32, 3), 10, 1_730_714),
    # szagoruyko/wide-residual-networks WRN-28-10 on CIFAR-10.
    (get_model("wrn28_10", 10), (2, 32, 32, 3), 10, 36_479_194),
    # dyhan0920/PyramidNet-PyTorch bottleneck, depth 272, α = 200, CIFAR-100
    # (published "26.0M"; for CIFAR-10 the count is 26,288,692 − 864·90 − 90
    # = 26,210,842).
    (get_model("pyramidnet272", 100), (2, 32, 32, 3), 100, 26_288_692),
    # Tan & Le 2019 / torchvision EfficientNet-B0 at 1000 classes; the input
    # is CIFAR-sized to show that any size works.
    (get_model("efficientnet_b0", 1000), (2, 32, 32, 3), 1000, 5_288_548),
]


@pytest.mark.parametrize(
    "model, shape, num_classes, expected",
    FULL_MODELS,
    ids=["mlp", "mlp_wide", "lenet5", "cnn1d", "resnet18", "resnet110_A", "resnet110_B", "wrn28_10",
         "pyramidnet272", "efficientnet_b0"],
)
def test_full_model_parameter_count_and_logit_shape(model, shape, num_classes, expected):
    logits, variables = jax.eval_shape(model.init_with_output, KEY, jnp.zeros(shape))
    assert count(variables["params"]) == expected
    assert logits.shape == (shape[0], num_classes)
    assert logits.dtype == jnp.float32


def test_num_params_counts_params_but_not_batch_stats():
    model = ResNetTiny(num_classes=3)
    variables = jax.eval_shape(model.init, KEY, jnp.zeros((1, 8, 8, 3)))
    assert num_params(model, (1, 8, 8, 3)) == count(variables["params"])
    # Stem conv 3·3·3·4, BN 2·4; block 1: two 3·3·4·4 convs, two BNs; block 2:
    # 3·3·4·8 + 3·3·8·8 convs, 1×1 projection 4·8, three BNs of 8; dense 8·3 + 3.
    expected = 108 + 8 + 2 * 144 + 16 + 288 + 576 + 32 + 48 + 27
    assert num_params(model, (1, 8, 8, 3)) == expected


def test_mlp_matches_a_closed_form_forward_pass():
    model = MLPTiny(num_classes=3)
    x = jax.random.normal(KEY, (5, 2, 3))
    params = model.init(KEY, x)["params"]
    w1, b1 = params["Dense_0"]["kernel"], params["Dense_0"]["bias"]
    w2, b2 = params["Dense_1"]["kernel"], params["Dense_1"]["bias"]
    flat = np.asarray(x).reshape(5, 6)
    expected = np.maximum(flat @ w1 + b1, 0.0) @ w2 + b2
    np.testing.assert_allclose(model.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-6)


def test_conv1d_matches_a_closed_form_forward_pass():
    # One convolution (kernel 3, stride 2, zero padding 1) then the linear layer:
    # h[t, c] = relu(b_c + Σ_j Σ_i x_pad[2t + j, i] K[j, i, c]), length ⌊(7 + 2 − 3) / 2⌋ + 1 = 4.
    model = Conv1D(channels=2, kernel_sizes=(3,), strides=2, padding=1, num_classes=3)
    x = jax.random.normal(KEY, (5, 7, 2))
    params = model.init(KEY, x)["params"]
    k, b = np.asarray(params["Conv_0"]["kernel"]), np.asarray(params["Conv_0"]["bias"])
    w, c = np.asarray(params["Dense_0"]["kernel"]), np.asarray(params["Dense_0"]["bias"])
    xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (0, 0)))
    h = np.stack([np.einsum("bji,jic->bc", xp[:, 2 * t:2 * t + 3], k) for t in range(4)], 1)
    h = np.maximum(h + b, 0.0)
    expected = h.reshape(5, -1) @ w + c
    assert conv_output_length(7, 3, 2, 1) == 4
    np.testing.assert_allclose(model.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-5)
    # A [B, n] input is one channel.
    one = Conv1D(channels=2, kernel_sizes=(3,), num_classes=3)
    v = one.init(KEY, jnp.zeros((1, 7)))
    np.testing.assert_array_equal(one.apply(v, x[..., 0]), one.apply(v, x[..., :1]))


def test_conv1d_rejects_images_and_too_short_signals():
    model = get_model("cnn1d", 3)
    with pytest.raises(ValueError, match="sequences"):
        jax.eval_shape(model.init, KEY, jnp.zeros((2, 8, 8, 1)))
    with pytest.raises(ValueError, match="too short"):
        jax.eval_shape(model.init, KEY, jnp.zeros((2, 2)))


def test_compute_dtype_keeps_float32_params_and_logits():
    model = ResNetTiny(num_classes=3, dtype=jnp.bfloat16)
    logits, variables = jax.eval_shape(model.init_with_output, KEY, jnp.zeros((2, 8, 8, 3)))
    assert logits.dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(variables["params"])} == {jnp.dtype("float32")}


# --- one SGD step of every family (tiny variants) -------------------------------------

# (name, input shape, extra kwargs, whether the step follows the true gradient)
TRAIN_CASES = [
    ("mlp_tiny", (4, 8, 8, 1), {}, True),
    ("lenet5", (4, 12, 12, 1), {}, True),
    ("cnn1d", (4, 40), {}, True),
    ("resnet_tiny", (4, 8, 8, 3), {}, True),
    ("resnet_tiny", (4, 8, 8, 3), {"shortcut": "zero_pad"}, True),
    ("wrn_tiny", (4, 8, 8, 3), {"dropout_rate": 0.3}, True),
    # ShakeDrop's backward pass uses β ≠ α: the step is not a gradient step of
    # the forward loss, so only finiteness and movement are checked.
    ("pyramidnet_tiny", (4, 8, 8, 3), {}, False),
    ("efficientnet_tiny", (4, 8, 8, 3), {"dropout_rate": 0.2, "stochastic_depth_rate": 0.5}, True),
]


def make_sgd_step(model, learning_rate):
    @fast_jit
    def step(params, batch_stats, x, y, key):
        def loss_fn(p):
            logits, updates = model.apply(
                {"params": p, **batch_stats},
                x,
                train=True,
                rngs={"dropout": key, "shakedrop": key},
                mutable=["batch_stats"],
            )
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1)), updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        params = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
        return loss, params, dict(updates)

    return step


@pytest.mark.parametrize(
    "name, shape, kwargs, true_gradient",
    TRAIN_CASES,
    ids=[f"{c[0]}{'-' + '-'.join(c[2]) if c[2] else ''}" for c in TRAIN_CASES],
)
def test_one_sgd_step_trains(name, shape, kwargs, true_gradient):
    model = get_model(name, num_classes=3, **kwargs)
    x = jax.random.normal(jax.random.PRNGKey(1), shape)
    y = jnp.arange(shape[0]) % 3
    variables = random_variables(model, x)
    params = variables["params"]
    batch_stats = {k: v for k, v in variables.items() if k == "batch_stats"}
    step = make_sgd_step(model, learning_rate=1e-3)
    key = jax.random.PRNGKey(2)

    loss0, params1, stats1 = step(params, batch_stats, x, y, key)
    # Same key, same batch: the training-mode loss is a deterministic function
    # of the params, so a small gradient step must lower it.
    loss1, _, _ = step(params1, batch_stats, x, y, key)

    assert np.isfinite(loss0) and np.isfinite(loss1)
    if true_gradient:
        assert loss1 < loss0
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), params, params1)
    assert all(jax.tree.leaves(moved)), moved
    if batch_stats:
        changed = jax.tree.map(
            lambda a, b: bool(jnp.any(a != b)), batch_stats["batch_stats"], stats1["batch_stats"]
        )
        assert all(jax.tree.leaves(changed))
    else:
        assert name in ("mlp_tiny", "lenet5", "cnn1d") and not stats1


# --- BatchNorm bookkeeping ------------------------------------------------------------


def test_batchnorm_running_stats_update_in_train_mode_only():
    model = ResNetTiny(num_classes=3)
    x = jax.random.normal(KEY, (4, 6, 6, 3)) + 0.5
    variables = random_variables(model, x)
    stats = variables["batch_stats"]
    apply = fast_jit(model.apply, static_argnames=("train", "mutable"))
    _, updates = apply(variables, x, train=True, mutable=("batch_stats",))

    # Stem BatchNorm, momentum 0.9 from (mean 0, var 1): new = 0.9·old + 0.1·batch
    # statistic of the stem convolution's output (biased variance over B, H, W).
    kernel = variables["params"]["Conv_0"]["kernel"]
    z = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    z = np.asarray(z, np.float64)
    new = updates["batch_stats"]["BatchNorm_0"]
    np.testing.assert_allclose(new["mean"], 0.1 * z.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new["var"], 0.9 + 0.1 * z.var(axis=(0, 1, 2)), rtol=1e-4)

    _, eval_updates = apply(variables, x, train=False, mutable=("batch_stats",))
    jax.tree.map(np.testing.assert_array_equal, eval_updates["batch_stats"], stats)


def test_eval_mode_output_does_not_depend_on_the_rest_of_the_batch():
    model = ResNetTiny(num_classes=3)
    x = jax.random.normal(KEY, (3, 6, 6, 3))
    variables = random_variables(model, x)
    apply = fast_jit(partial(model.apply, train=False))
    together = apply(variables, x)
    alone = apply(variables, x[:1])
    np.testing.assert_allclose(together[:1], alone, rtol=1e-5, atol=1e-6)


# --- ShakeDrop ------------------------------------------------------------------------


def shakedrop_train(x, key, p):
    return ShakeDrop(p).apply({}, x, train=True, rngs={"shakedrop": key})


def test_shakedrop_eval_mode_is_the_deterministic_expectation_scale():
    x = jax.random.normal(KEY, (4, 3, 3, 2))
    out = ShakeDrop(0.7).apply({}, x, train=False)  # no rng needed
    np.testing.assert_allclose(out, 0.7 * x, rtol=1e-6)
    np.testing.assert_array_equal(out, ShakeDrop(0.7).apply({}, x, train=False))


def test_shakedrop_with_survival_one_is_the_identity_in_both_modes():
    x = jax.random.normal(KEY, (4, 3))
    np.testing.assert_array_equal(ShakeDrop(1.0).apply({}, x, train=True), x)
    np.testing.assert_array_equal(ShakeDrop(1.0).apply({}, x, train=False), x)


def test_shakedrop_randomness_is_a_function_of_the_key():
    x = jax.random.normal(KEY, (8, 2, 2, 3))
    key_a, key_b = jax.random.split(jax.random.PRNGKey(5))
    np.testing.assert_array_equal(shakedrop_train(x, key_a, 0.2), shakedrop_train(x, key_a, 0.2))
    outputs = [shakedrop_train(x, k, 0.2) for k in jax.random.split(key_b, 4)]
    assert any(not np.array_equal(outputs[0], o) for o in outputs[1:])


def test_shakedrop_training_gates_have_the_published_laws():
    # With x = 1 the forward output is the gate b + α − bα and the gradient of
    # Σ y is the backward gate b + β − bβ, one value per example.
    p, num_keys, batch = 0.3, 4000, 4
    x = jnp.ones((batch, 2))

    def gates(key):
        forward, vjp = jax.vjp(lambda v: shake_drop(v, key, p), x)
        (backward,) = vjp(jnp.ones_like(x))
        return forward[:, 0], backward[:, 0]

    forward, backward = jax.vmap(gates)(jax.random.split(KEY, num_keys))
    forward, backward = np.asarray(forward), np.asarray(backward)
    kept = np.all(forward == 1.0, axis=1)  # b = 1 for the whole batch
    assert np.all(np.all(forward == 1.0, axis=1) == np.all(backward == 1.0, axis=1))
    # b ~ Bernoulli(p), one draw per call.
    assert abs(kept.mean() - p) < 4 * math.sqrt(p * (1 - p) / num_keys)
    # Dropped calls: α ~ U[−1, 1], β ~ U[0, 1], independent and per example.
    alpha, beta = forward[~kept].ravel(), backward[~kept].ravel()
    assert alpha.min() >= -1.0 and alpha.max() <= 1.0 and alpha.min() < -0.95
    assert beta.min() >= 0.0 and beta.max() <= 1.0
    assert abs(alpha.mean()) < 4 * math.sqrt(1 / 3 / alpha.size)
    assert abs(beta.mean() - 0.5) < 4 * math.sqrt(1 / 12 / beta.size)
    assert abs(np.corrcoef(alpha, beta)[0, 1]) < 0.05
    assert np.all(np.std(forward[~kept], axis=1) > 0)  # α varies across the batch
    # E[b + α − bα] = p: the eval-mode scale.
    assert abs(forward.mean() - p) < 4 * math.sqrt(0.25 / forward.size)


def test_pyramidnet_shakedrop_survival_decays_linearly_to_the_final_value():
    probs = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, ShakeDrop) and context.method_name == "__call__":
            probs.append(context.module.survival_prob)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(PyramidNetTiny(num_classes=3).init, KEY, jnp.zeros((1, 8, 8, 3)))
    np.testing.assert_allclose(probs, [1 - 0.5 / 3, 1 - 1.0 / 3, 0.5])


def test_pyramid_widths_grow_linearly_to_16_plus_alpha():
    assert pyramid_widths(11, 6.0) == [18, 20, 22]
    widths = pyramid_widths(272, 200.0)
    assert len(widths) == 90 and widths[-1] == 216
    np.testing.assert_allclose(widths, 16 + 200 / 90 * np.arange(1, 91), atol=0.5)


def test_round_filters_gives_the_published_efficientnet_widths():
    # Head widths of B0..B7 (w = 1.0, 1.0, 1.1, 1.2, 1.4, 1.6, 1.8, 2.0) and stems.
    widths = [1.0, 1.0, 1.1, 1.2, 1.4, 1.6, 1.8, 2.0]
    assert [round_filters(1280, w) for w in widths] == [
        1280, 1280, 1408, 1536, 1792, 2048, 2304, 2560,
    ]
    assert [round_filters(32, w) for w in widths] == [32, 32, 32, 40, 48, 48, 56, 64]


# --- get_model and validation ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_get_model_builds_every_name_with_its_class_count(name):
    assert get_model(name, num_classes=7).num_classes == 7


def test_get_model_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="resnet18.*") as info:
        get_model("resnet19", 10)
    assert all(name in str(info.value) for name in MODELS)


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True, "10"])
def test_get_model_rejects_bad_class_counts(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        get_model("mlp", num_classes)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: ResNet(shortcut="C"), "shortcut"),
        (lambda: ResNet(stage_sizes=()), "stage_sizes"),
        (lambda: ResNet(stage_sizes=(2, 0)), "stage_sizes"),
        (lambda: WideResNet(depth=27), "depth"),
        (lambda: WideResNet(depth=4), "depth"),
        (lambda: WideResNet(widen_factor=0), "widen_factor"),
        (lambda: WideResNet(dropout_rate=1.0), "dropout_rate"),
        (lambda: PyramidNet(depth=12), "depth"),
        (lambda: PyramidNet(alpha=-1.0), "alpha"),
        (lambda: PyramidNet(final_survival_prob=0.0), "final_survival_prob"),
        (lambda: PyramidNet(final_survival_prob=1.5), "final_survival_prob"),
        (lambda: EfficientNet(width_multiplier=0.0), "width_multiplier"),
        (lambda: EfficientNet(depth_multiplier=-1.0), "depth_multiplier"),
        (lambda: EfficientNet(dropout_rate=1.0), "dropout_rate"),
        (lambda: EfficientNet(stochastic_depth_rate=-0.1), "stochastic_depth_rate"),
        (lambda: MLPTiny(hidden_sizes=(8, 0)), "hidden_sizes"),
        (lambda: Conv1D(channels=0), "channels"),
        (lambda: Conv1D(kernel_sizes=()), "kernel_sizes"),
        (lambda: Conv1D(strides=0), "strides"),
        (lambda: Conv1D(padding=-1), "padding"),
        (lambda: ShakeDrop(0.0), "survival_prob"),
        (lambda: shake_drop(jnp.ones((2, 2)), KEY, 1.5), "survival_prob"),
    ],
)
def test_bad_hyperparameters_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    "name", ["lenet5", "resnet_tiny", "wrn_tiny", "pyramidnet_tiny", "efficientnet_tiny"]
)
def test_conv_models_reject_non_image_inputs(name):
    model = get_model(name, num_classes=3)
    with pytest.raises(ValueError, match="NHWC"):
        jax.eval_shape(model.init, KEY, jnp.zeros((2, 64)))


# --- block max pooling --------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 8, 6, 3), (1, 7, 9, 2), (3, 28, 28, 6), (2, 10, 10, 16)])
def test_block_max_pool_is_nn_max_pool_with_a_reduction_gradient(shape):
    # Values: those of flax's max_pool (2×2 windows, stride 2, 'VALID': odd
    # trailing rows/columns dropped). Gradient on tie-free inputs: the
    # incoming gradient lands on each block's argmax, as select_and_scatter
    # puts it, so the two gradients agree exactly.
    from flatjax.models._layers import block_max_pool

    x = jax.random.normal(jax.random.key(0), shape)
    ref = lambda v: nn.max_pool(v, (2, 2), strides=(2, 2))
    np.testing.assert_array_equal(block_max_pool(x), ref(x))
    w = jax.random.normal(jax.random.key(1), ref(x).shape)
    g_new = jax.grad(lambda v: jnp.sum(w * block_max_pool(v)))(x)
    g_ref = jax.grad(lambda v: jnp.sum(w * ref(v)))(x)
    np.testing.assert_array_equal(g_new, g_ref)


def test_block_max_pool_splits_an_exact_tie():
    # A reduction's gradient shares a tie equally among the tied entries.
    from flatjax.models._layers import block_max_pool

    x = jnp.array([3.0, 3.0, 1.0, 0.0]).reshape(1, 2, 2, 1)
    g = jax.grad(lambda v: block_max_pool(v).sum())(x)
    np.testing.assert_allclose(g.ravel(), [0.5, 0.5, 0.0, 0.0])


def test_lenet5_gradient_matches_the_flax_max_pool_network():
    # The whole network: the same logits and parameter gradients as LeNet-5
    # written with nn.max_pool (ReLU'd ties carry no gradient either way).
    class FlaxPoolLeNet(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.relu(nn.Conv(6, (5, 5), padding="SAME")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = nn.relu(nn.Conv(16, (5, 5), padding="VALID")(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = x.reshape(x.shape[0], -1)
            x = nn.relu(nn.Dense(120)(x))
            x = nn.relu(nn.Dense(84)(x))
            return nn.Dense(10)(x)

    model, ref = get_model("lenet5", 10), FlaxPoolLeNet()
    x = jax.random.normal(jax.random.key(2), (4, 28, 28, 1))
    variables = model.init(jax.random.key(3), x)
    assert jax.tree.structure(variables) == jax.tree.structure(ref.init(jax.random.key(3), x))
    loss = lambda m: lambda v: jnp.sum(jnp.sin(m.apply(v, x)))
    np.testing.assert_allclose(model.apply(variables, x), ref.apply(variables, x), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(jax.grad(loss(model))(variables)),
                    jax.tree.leaves(jax.grad(loss(ref))(variables)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
