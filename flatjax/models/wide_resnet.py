"""Wide residual networks (Zagoruyko & Komodakis 2016) for CIFAR."""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from flatjax.models._layers import conv_and_norm, conv_init


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3×3-BN-ReLU-dropout-conv3×3 plus shortcut.

    When the shape changes, the shortcut is a 1×1 convolution (no
    BatchNorm) applied to the pre-activated input, as in the reference
    implementation.

    Attributes:
      filters: output channels.
      strides: stride of the first convolution and of the shortcut.
      dropout_rate: dropout between the two convolutions (rng ``"dropout"``).
      dtype: computation dtype.
    """

    filters: int
    strides: int = 1
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        conv, norm = conv_and_norm(train, self.dtype)
        pre = nn.relu(norm()(x))
        y = conv(self.filters, (3, 3), strides=self.strides, padding=1)(pre)
        y = nn.relu(norm()(y))
        y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
        y = conv(self.filters, (3, 3), padding=1)(y)
        if x.shape[-1] != self.filters or self.strides != 1:
            x = conv(self.filters, (1, 1), strides=self.strides)(pre)
        return x + y


class WideResNet(nn.Module):
    """WRN-d-k: a 3×3 stem with 16 channels and three stages of (d − 4)/6
    pre-activation blocks with 16k, 32k, 64k channels (strides 1, 2, 2), then
    BN-ReLU, global average pooling and a dense layer.

    ``WideResNet28_10`` has 36,479,194 parameters for 10 classes, the count
    of the standard implementation (szagoruyko/wide-residual-networks,
    xternalz/WideResNet-pytorch); ``WideResNetTiny`` is WRN-10-1 for tests.

    Attributes:
      depth: d, with (d − 4) divisible by 6.
      widen_factor: k.
      num_classes: number of output logits.
      dropout_rate: dropout inside each block (needs rng ``"dropout"`` when
        positive and ``train=True``).
      dtype: computation dtype (parameters and logits are float32).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = WideResNetTiny(num_classes=10)
      >>> x = jnp.zeros((2, 8, 8, 3))
      >>> logits, variables = jax.eval_shape(model.init_with_output, jax.random.PRNGKey(0), x)
      >>> logits.shape
      (2, 10)

    References:
      Zagoruyko, Komodakis (2016), "Wide residual networks", arXiv 1605.07146.
    """

    depth: int = 28
    widen_factor: int = 10
    num_classes: int = 10
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    def __post_init__(self):
        if not isinstance(self.depth, int) or self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(
                f"depth must be an integer ≥ 10 with (depth - 4) divisible by 6, got {self.depth!r}"
            )
        if not isinstance(self.widen_factor, int) or self.widen_factor < 1:
            raise ValueError(f"widen_factor must be a positive integer, got {self.widen_factor!r}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = False):
        if x.ndim != 4:
            raise ValueError(f"WideResNet expects NHWC images [B, H, W, C], got shape {x.shape}")
        blocks_per_stage = (self.depth - 4) // 6
        x = jnp.asarray(x, self.dtype)
        x = nn.Conv(16, (3, 3), padding=1, use_bias=False, kernel_init=conv_init, dtype=self.dtype)(
            x
        )
        for i, width in enumerate((16, 32, 64)):
            for j in range(blocks_per_stage):
                x = WideBlock(
                    width * self.widen_factor,
                    strides=2 if i > 0 and j == 0 else 1,
                    dropout_rate=self.dropout_rate,
                    dtype=self.dtype,
                )(x, train)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype
        )(x)
        x = jnp.mean(nn.relu(x), axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        return jnp.asarray(x, jnp.float32)


WideResNet28_10 = partial(WideResNet, depth=28, widen_factor=10)
WideResNetTiny = partial(WideResNet, depth=10, widen_factor=1)
