"""EfficientNet (Tan & Le 2019) with width and depth multipliers."""

from __future__ import annotations

import math
from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from flatjax.models._layers import conv_and_norm


class StageConfig(NamedTuple):
    """One stage of MBConv blocks in the B0 baseline.

    Attributes:
      expand_ratio: channel expansion of the inverted bottleneck.
      kernel_size: depthwise kernel size.
      strides: stride of the stage's first block.
      filters: output channels (before the width multiplier).
      repeats: number of blocks (before the depth multiplier).
    """

    expand_ratio: int
    kernel_size: int
    strides: int
    filters: int
    repeats: int


B0_STAGES = (
    StageConfig(1, 3, 1, 16, 1),
    StageConfig(6, 3, 2, 24, 2),
    StageConfig(6, 5, 2, 40, 2),
    StageConfig(6, 3, 2, 80, 3),
    StageConfig(6, 5, 1, 112, 3),
    StageConfig(6, 5, 2, 192, 4),
    StageConfig(6, 3, 1, 320, 1),
)


def round_filters(filters: int, width_multiplier: float, divisor: int = 8) -> int:
    """Channels after the width multiplier, rounded to a multiple of ``divisor``.

    c′ = max(d, ⌊(c·w + d/2)/d⌋·d), plus d if that drops below 0.9·c·w
    (the rule of the reference implementation).

    Args:
      filters: c, baseline channels.
      width_multiplier: w.
      divisor: d.

    Returns:
      The scaled channel count.

    Example:
      >>> round_filters(32, 1.0), round_filters(40, 1.1), round_filters(16, 0.25)
      (32, 48, 8)
    """
    scaled = filters * width_multiplier
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


class MBConv(nn.Module):
    """Inverted residual block with squeeze-and-excitation.

    1×1 expansion (if ``expand_ratio`` > 1) → depthwise k×k → SE → 1×1
    projection, BatchNorm after each convolution and swish after all but the
    projection. SE: s = σ(W₂ swish(W₁ mean_hw(h) + b₁) + b₂), h ← s ⊙ h, with
    max(1, ⌊c_in/4⌋) squeeze channels (c_in = block input channels). When the
    block keeps its shape, the residual branch is dropped per example with
    probability ``drop_rate`` in training (stochastic depth, rng
    ``"dropout"``) and rescaled by 1/(1 − ``drop_rate``).

    Attributes:
      filters: output channels.
      expand_ratio: expansion factor.
      kernel_size: depthwise kernel size.
      strides: depthwise stride.
      drop_rate: stochastic-depth drop probability of this block.
      dtype: computation dtype.
    """

    filters: int
    expand_ratio: int
    kernel_size: int
    strides: int = 1
    drop_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        conv, norm = conv_and_norm(train, self.dtype, momentum=0.99, epsilon=1e-3)
        in_channels = x.shape[-1]
        hidden = in_channels * self.expand_ratio
        h = x
        if self.expand_ratio != 1:
            h = nn.swish(norm()(conv(hidden, (1, 1))(h)))
        h = conv(
            hidden,
            (self.kernel_size, self.kernel_size),
            strides=self.strides,
            padding=(self.kernel_size - 1) // 2,
            feature_group_count=hidden,
        )(h)
        h = nn.swish(norm()(h))
        s = jnp.mean(h, axis=(1, 2))
        s = nn.swish(nn.Dense(max(1, in_channels // 4), dtype=self.dtype)(s))
        s = nn.sigmoid(nn.Dense(hidden, dtype=self.dtype)(s))
        h = h * s[:, None, None, :]
        h = norm()(conv(self.filters, (1, 1))(h))
        if self.strides == 1 and in_channels == self.filters:
            if train and self.drop_rate > 0:
                keep = 1.0 - self.drop_rate
                mask = jax.random.bernoulli(
                    self.make_rng("dropout"), keep, (h.shape[0], 1, 1, 1)
                ).astype(h.dtype)
                h = h * mask / keep
            h = h + x
        return h


class EfficientNet(nn.Module):
    """EfficientNet: stem conv 3×3/2, seven stages of MBConv blocks, 1×1 head conv.

    Channels are scaled by ``width_multiplier`` (``round_filters``) and
    block counts by ``depth_multiplier`` (⌈d·r⌉). Block i of n has
    stochastic-depth rate ``stochastic_depth_rate``·i/n; the classifier has
    dropout ``dropout_rate``. Both use the rng stream ``"dropout"`` in
    training mode. Global average pooling makes any input size ≥ 1 pixel
    work: for CIFAR the 32×32 input ends at 1×1 after the five stride-2
    stages, with ``num_classes`` set to 10 or 100.

    ``EfficientNetB0`` (w = d = 1) has 5,288,548 parameters at 1000 classes,
    the count of the TF reference and torchvision. ``EfficientNetTiny``
    (w = 0.25, d = 0.25: one block per stage, no dropout) is for tests.

    Attributes:
      num_classes: number of output logits.
      width_multiplier: w, channel scale.
      depth_multiplier: d, block-count scale.
      dropout_rate: dropout before the classifier.
      stochastic_depth_rate: drop probability of the last block.
      dtype: computation dtype (parameters and logits are float32).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = EfficientNetTiny(num_classes=10)
      >>> x = jnp.zeros((2, 8, 8, 3))
      >>> logits, variables = jax.eval_shape(model.init_with_output, jax.random.PRNGKey(0), x)
      >>> logits.shape
      (2, 10)

    References:
      Tan, Le (2019), "EfficientNet: rethinking model scaling for
      convolutional neural networks", arXiv 1905.11946.
    """

    num_classes: int = 1000
    width_multiplier: float = 1.0
    depth_multiplier: float = 1.0
    dropout_rate: float = 0.2
    stochastic_depth_rate: float = 0.2
    dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("width_multiplier", "depth_multiplier"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in ("dropout_rate", "stochastic_depth_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim != 4:
            raise ValueError(f"EfficientNet expects NHWC images [B, H, W, C], got shape {x.shape}")
        conv, norm = conv_and_norm(train, self.dtype, momentum=0.99, epsilon=1e-3)
        x = jnp.asarray(x, self.dtype)
        x = conv(round_filters(32, self.width_multiplier), (3, 3), strides=2, padding=1)(x)
        x = nn.swish(norm()(x))
        repeats = [math.ceil(self.depth_multiplier * s.repeats) for s in B0_STAGES]
        num_blocks, block = sum(repeats), 0
        for stage, stage_repeats in zip(B0_STAGES, repeats, strict=True):
            for j in range(stage_repeats):
                x = MBConv(
                    round_filters(stage.filters, self.width_multiplier),
                    expand_ratio=stage.expand_ratio,
                    kernel_size=stage.kernel_size,
                    strides=stage.strides if j == 0 else 1,
                    drop_rate=self.stochastic_depth_rate * block / num_blocks,
                    dtype=self.dtype,
                )(x, train)
                block += 1
        x = conv(round_filters(1280, self.width_multiplier), (1, 1))(x)
        x = jnp.mean(nn.swish(norm()(x)), axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        return jnp.asarray(x, jnp.float32)


EfficientNetB0 = partial(EfficientNet, width_multiplier=1.0, depth_multiplier=1.0)
EfficientNetTiny = partial(
    EfficientNet,
    width_multiplier=0.25,
    depth_multiplier=0.25,
    dropout_rate=0.0,
    stochastic_depth_rate=0.0,
)
