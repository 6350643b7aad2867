"""CIFAR ResNets: ResNet-18 with the CIFAR stem, and He et al.'s ResNet-110."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from flatjax.models._layers import conv_and_norm, conv_init

SHORTCUTS = ("projection", "zero_pad")


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with BatchNorm and a residual connection.

    y = relu(BN(conv(relu(BN(conv(x))))) + s(x)), where the shortcut s is the
    identity when shapes agree and otherwise either a 1×1 convolution with
    BatchNorm (``"projection"``, option B of He et al.) or spatial
    subsampling plus zero channels (``"zero_pad"``, option A, parameter-free).

    Attributes:
      filters: output channels.
      strides: stride of the first convolution (and of the shortcut).
      shortcut: ``"projection"`` or ``"zero_pad"``.
      dtype: computation dtype.
    """

    filters: int
    strides: int = 1
    shortcut: str = "projection"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        conv, norm = conv_and_norm(train, self.dtype)
        y = conv(self.filters, (3, 3), strides=self.strides, padding=1)(x)
        y = nn.relu(norm()(y))
        y = conv(self.filters, (3, 3), padding=1)(y)
        y = norm()(y)
        if self.strides != 1 or x.shape[-1] != self.filters:
            if self.shortcut == "projection":
                x = norm()(conv(self.filters, (1, 1), strides=self.strides)(x))
            else:
                x = x[:, :: self.strides, :: self.strides, :]
                extra = self.filters - x.shape[-1]
                x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """Residual network for small (CIFAR-sized) images.

    Stem: 3×3 convolution with stride 1, BatchNorm, ReLU, no max pooling.
    Then ``len(stage_sizes)`` stages of basic blocks with
    ``num_filters · 2^i`` channels; every stage after the first halves the
    resolution in its first block. Global average pooling and a dense layer
    give the logits. Any input size works (the pooling is global).

    Variants (parameters for 10 classes):

    - ``ResNet18``: stages (2, 2, 2, 2), 64 filters, projection shortcuts —
      11,173,962 parameters, the count of kuangliu/pytorch-cifar.
    - ``ResNet110``: stages (18, 18, 18), 16 filters, zero-padding (option A)
      shortcuts as in He et al. (2016), Sec. 4.2 — 1,727,962 parameters.
      With ``shortcut="projection"`` (option B) it has 1,730,714: the two
      stage-entry 1×1 convolutions and their BatchNorms add
      (16·32 + 2·32) + (32·64 + 2·64) = 2,752.
    - ``ResNetTiny``: stages (1, 1), 4 filters, for tests.

    Attributes:
      stage_sizes: number of blocks in each stage.
      num_classes: number of output logits.
      num_filters: channels of the stem and the first stage.
      shortcut: ``"projection"`` (1×1 conv + BN) or ``"zero_pad"`` (option A)
        for blocks that change shape.
      dtype: computation dtype (parameters and logits are float32).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = ResNetTiny(num_classes=10)
      >>> x = jnp.zeros((2, 8, 8, 3))
      >>> logits, variables = jax.eval_shape(model.init_with_output, jax.random.PRNGKey(0), x)
      >>> logits.shape, sorted(variables)
      ((2, 10), ['batch_stats', 'params'])

    References:
      He, Zhang, Ren, Sun (2016), "Deep residual learning for image
      recognition", arXiv 1512.03385.
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    num_classes: int = 10
    num_filters: int = 64
    shortcut: str = "projection"
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {self.shortcut!r}")
        if not self.stage_sizes or not all(
            isinstance(s, int) and s > 0 for s in self.stage_sizes
        ):
            raise ValueError(
                f"stage_sizes must be a non-empty sequence of positive integers, "
                f"got {self.stage_sizes!r}"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim != 4:
            raise ValueError(f"ResNet expects NHWC images [B, H, W, C], got shape {x.shape}")
        x = jnp.asarray(x, self.dtype)
        x = nn.Conv(
            self.num_filters,
            (3, 3),
            padding=1,
            use_bias=False,
            kernel_init=conv_init,
            dtype=self.dtype,
        )(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype
        )(x)
        x = nn.relu(x)
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                x = BasicBlock(
                    self.num_filters * 2**i,
                    strides=2 if i > 0 and j == 0 else 1,
                    shortcut=self.shortcut,
                    dtype=self.dtype,
                )(x, train)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        return jnp.asarray(x, jnp.float32)


ResNet18 = partial(ResNet, stage_sizes=(2, 2, 2, 2), num_filters=64, shortcut="projection")
ResNet110 = partial(ResNet, stage_sizes=(18, 18, 18), num_filters=16, shortcut="zero_pad")
ResNetTiny = partial(ResNet, stage_sizes=(1, 1), num_filters=4, shortcut="projection")
