"""PyramidNet (bottleneck) with ShakeDrop regularisation, for CIFAR."""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flatjax.models._layers import conv_and_norm, conv_init


@jax.custom_vjp
def _scale(x, forward_gate, backward_gate):
    return forward_gate * x


def _scale_fwd(x, forward_gate, backward_gate):
    return forward_gate * x, (forward_gate, backward_gate)


def _scale_bwd(gates, cotangent):
    forward_gate, backward_gate = gates
    return backward_gate * cotangent, jnp.zeros_like(forward_gate), jnp.zeros_like(backward_gate)


_scale.defvjp(_scale_fwd, _scale_bwd)


def shake_drop(x, key, survival_prob: float):
    """ShakeDrop in training mode: a random forward scale, another backward.

    Forward:  y = (b + α − bα) x,      backward:  ∂L/∂x = (b + β − bβ) ∂L/∂y,

    with b ~ Bernoulli(p) drawn once per call (per mini-batch, as in the
    reference implementation), and α ~ U[−1, 1], β ~ U[0, 1] drawn per
    example (one value for all of an example's features). When b = 1 the
    branch passes unchanged both ways; when b = 0 it is scaled by α forward
    and by an independent β backward. E[b + α − bα] = p, the scale used at
    evaluation time (``ShakeDrop`` with ``train=False``).

    Args:
      x: residual-branch output, [B, ...].
      key: PRNG key; b, α and β are functions of it alone.
      survival_prob: p ∈ (0, 1], the probability that b = 1.

    Returns:
      An array like ``x``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> y = shake_drop(jnp.ones((4, 3)), jax.random.PRNGKey(0), survival_prob=0.5)
      >>> bool(jnp.all(jnp.abs(y) <= 1.0))
      True

    References:
      Yamada, Iwamura, Akiba, Kise (2018), "ShakeDrop regularization for deep
      residual learning", arXiv 1802.02375.
    """
    if not 0.0 < survival_prob <= 1.0:
        raise ValueError(f"survival_prob must be in (0, 1], got {survival_prob!r}")
    key_b, key_alpha, key_beta = jax.random.split(key, 3)
    b = jax.random.bernoulli(key_b, survival_prob).astype(x.dtype)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    alpha = jax.random.uniform(key_alpha, shape, x.dtype, -1.0, 1.0)
    beta = jax.random.uniform(key_beta, shape, x.dtype, 0.0, 1.0)
    return _scale(x, b + alpha - b * alpha, b + beta - b * beta)


class ShakeDrop(nn.Module):
    """ShakeDrop as a layer; its randomness comes from the rng stream ``"shakedrop"``.

    With ``train=True`` it applies ``shake_drop`` with a key from
    ``self.make_rng("shakedrop")`` (pass ``rngs={"shakedrop": key}`` to
    ``apply``). With ``train=False`` it is deterministic and returns p·x,
    the expectation E[b + α − bα] x = p x of the training-mode forward pass;
    this is what the reference implementation (and the paper's Eq. 8) uses at
    test time, so "identity in eval mode" holds only in the sense of no
    randomness with a fixed per-layer scale p (exactly the identity when
    p = 1, where no rng is needed in either mode).

    Attributes:
      survival_prob: p ∈ (0, 1].

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = ShakeDrop(survival_prob=0.75)
      >>> layer.apply({}, jnp.ones((2, 2)), train=False)
      Array([[0.75, 0.75],
             [0.75, 0.75]], dtype=float32)
    """

    survival_prob: float

    def __post_init__(self):
        if not 0.0 < self.survival_prob <= 1.0:
            raise ValueError(f"survival_prob must be in (0, 1], got {self.survival_prob!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool):
        if self.survival_prob == 1.0:
            return x
        if not train:
            return self.survival_prob * x
        return shake_drop(x, self.make_rng("shakedrop"), self.survival_prob)


class PyramidBottleneck(nn.Module):
    """BN-conv1×1-BN-ReLU-conv3×3-BN-ReLU-conv1×1(4·planes)-BN, ShakeDrop, plus shortcut.

    The shortcut is parameter-free: 2×2 average pooling when strided, then
    zero channels appended up to 4·planes.

    Attributes:
      planes: bottleneck width; the block outputs 4·planes channels.
      strides: stride of the 3×3 convolution.
      survival_prob: ShakeDrop's p for this block.
      dtype: computation dtype.
    """

    planes: int
    strides: int = 1
    survival_prob: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        conv, norm = conv_and_norm(train, self.dtype)
        y = conv(self.planes, (1, 1))(norm()(x))
        y = nn.relu(norm()(y))
        y = conv(self.planes, (3, 3), strides=self.strides, padding=1)(y)
        y = nn.relu(norm()(y))
        y = norm()(conv(4 * self.planes, (1, 1))(y))
        y = ShakeDrop(self.survival_prob)(y, train)
        if self.strides != 1:
            # ceil_mode pooling of the reference: odd edges average their valid pixels only.
            x = nn.avg_pool(
                x,
                (self.strides, self.strides),
                strides=(self.strides, self.strides),
                padding="SAME",
                count_include_pad=False,
            )
        extra = y.shape[-1] - x.shape[-1]
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
        return x + y


def pyramid_widths(depth: int, alpha: float) -> list[int]:
    """Bottleneck widths of PyramidNet's blocks: round(16 + l·α/N), l = 1..N, N = 3(depth − 2)/9.

    The widths grow by α/N per block and are rounded (Python's round, as
    the reference implementation) after accumulating in floating point.

    Args:
      depth: network depth, with (depth − 2) divisible by 9.
      alpha: α, the total width increase.

    Returns:
      N integers, the ``planes`` of each block in order.

    Example:
      >>> pyramid_widths(11, 6.0)
      [18, 20, 22]
    """
    num_blocks = 3 * ((depth - 2) // 9)
    rate = alpha / num_blocks
    width, widths = 16.0, []
    for _ in range(num_blocks):
        width += rate
        widths.append(int(round(width)))
    return widths


class PyramidNet(nn.Module):
    """Bottleneck PyramidNet with ShakeDrop for CIFAR-sized images.

    Stem: 3×3 conv with 16 channels and BatchNorm. Three stages of
    N/3 = (depth − 2)/9 bottleneck blocks whose widths grow linearly by α/N
    per block (``pyramid_widths``); the second and third stages start with
    stride 2. Block l's ShakeDrop survival probability decays linearly,
    p_l = 1 − (l/N)(1 − p_N), to ``final_survival_prob`` = p_N at the last
    block. Final BN-ReLU, global average pooling and a dense layer.

    ``PyramidNet272`` (depth 272, α = 200) has 26,210,842 parameters for
    10 classes and 26,288,692 for 100, the counts of the standard
    implementation (dyhan0920/PyramidNet-PyTorch, also used with ShakeDrop
    by kakaobrain/fast-autoaugment); the papers quote 26.0M.
    ``PyramidNetTiny`` (depth 11, α = 6) is for tests.

    Training mode needs ``rngs={"shakedrop": key}`` unless
    ``final_survival_prob`` = 1, which turns ShakeDrop off.

    Attributes:
      depth: network depth, (depth − 2) divisible by 9.
      alpha: α, the total widening.
      num_classes: number of output logits.
      final_survival_prob: p_N ∈ (0, 1], ShakeDrop's p at the last block.
      dtype: computation dtype (parameters and logits are float32).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = PyramidNetTiny(num_classes=10)
      >>> x = jnp.zeros((2, 8, 8, 3))
      >>> variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
      >>> train_step_logits, _ = jax.eval_shape(
      ...     lambda v, key: model.apply(v, x, train=True, rngs={"shakedrop": key},
      ...                                mutable=["batch_stats"]),
      ...     variables, jax.random.PRNGKey(1))
      >>> train_step_logits.shape
      (2, 10)

    References:
      Han, Kim, Kim (2017), "Deep pyramidal residual networks",
      arXiv 1610.02915. Yamada et al. (2018), "ShakeDrop regularization for
      deep residual learning", arXiv 1802.02375.
    """

    depth: int = 272
    alpha: float = 200.0
    num_classes: int = 10
    final_survival_prob: float = 0.5
    dtype: Any = jnp.float32

    def __post_init__(self):
        if not isinstance(self.depth, int) or self.depth < 11 or (self.depth - 2) % 9:
            raise ValueError(
                f"depth must be an integer ≥ 11 with (depth - 2) divisible by 9, got {self.depth!r}"
            )
        if self.alpha < 0:
            raise ValueError(f"alpha must be non-negative, got {self.alpha!r}")
        if not 0.0 < self.final_survival_prob <= 1.0:
            raise ValueError(
                f"final_survival_prob must be in (0, 1], got {self.final_survival_prob!r}"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim != 4:
            raise ValueError(f"PyramidNet expects NHWC images [B, H, W, C], got shape {x.shape}")
        _, norm = conv_and_norm(train, self.dtype)
        widths = pyramid_widths(self.depth, self.alpha)
        num_blocks, per_stage = len(widths), len(widths) // 3
        x = jnp.asarray(x, self.dtype)
        x = nn.Conv(16, (3, 3), padding=1, use_bias=False, kernel_init=conv_init, dtype=self.dtype)(
            x
        )
        x = norm()(x)
        for l, planes in enumerate(widths, start=1):
            x = PyramidBottleneck(
                planes,
                strides=2 if l in (per_stage + 1, 2 * per_stage + 1) else 1,
                survival_prob=1.0 - (l / num_blocks) * (1.0 - self.final_survival_prob),
                dtype=self.dtype,
            )(x, train)
        x = jnp.mean(nn.relu(norm()(x)), axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        return jnp.asarray(x, jnp.float32)


PyramidNet272 = partial(PyramidNet, depth=272, alpha=200.0)
PyramidNetTiny = partial(PyramidNet, depth=11, alpha=6.0)
