"""LeNet-5 for 28×28 (MNIST-like) or 32×32 images."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from flatjax.models._layers import block_max_pool

# ⌊(⌊H/2⌋ − 4) / 2⌋ ≥ 1, the spatial size left before the dense layers, needs H ≥ 12.
MIN_IMAGE_SIZE = 12


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max pooling.

    conv 6@5×5 ('SAME') → relu → maxpool 2 → conv 16@5×5 ('VALID') → relu →
    maxpool 2 → dense 120 → relu → dense 84 → relu → dense ``num_classes``.
    'SAME' padding on the first convolution gives 28×28 inputs the geometry
    of the original 32×32 network (a 5×5×16 map before the dense layers), so
    on MNIST it has the classic 61,706 parameters (d2l.ai, "Convolutional
    Neural Networks (LeNet)", which pads the first convolution by 2 in the
    same way). A 32×32 input gives a 6×6×16 map instead; images smaller than
    12×12 (``MIN_IMAGE_SIZE``) leave no pixels and raise ``ValueError``.
    ``train`` is accepted for the shared call convention and ignored. The
    pooling is a reshape and a ``max`` over 2×2 blocks (the values of
    ``nn.max_pool`` with 2×2 windows and stride 2, a cheaper gradient on CPU).

    Attributes:
      num_classes: number of output logits.
      dtype: computation dtype (parameters stay float32, logits are float32).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = LeNet5(num_classes=10)
      >>> x = jnp.zeros((2, 28, 28, 1))
      >>> logits, variables = jax.eval_shape(model.init_with_output, jax.random.PRNGKey(0), x)
      >>> logits.shape
      (2, 10)

    References:
      LeCun, Bottou, Bengio, Haffner (1998), "Gradient-based learning applied
      to document recognition", Proc. IEEE 86(11).
    """

    num_classes: int = 10
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no train-dependent layers
        if x.ndim != 4:
            raise ValueError(f"LeNet5 expects NHWC images [B, H, W, C], got shape {x.shape}")
        if min(x.shape[1:3]) < MIN_IMAGE_SIZE:
            raise ValueError(
                f"LeNet5 needs images of at least {MIN_IMAGE_SIZE}×{MIN_IMAGE_SIZE} pixels (after "
                "the first 2×2 pooling, the 'VALID' 5×5 convolution and the second pooling "
                f"must leave one pixel), got shape {x.shape}; for smaller inputs (e.g. the 8×8 "
                "'digits') use an MLP such as get_model('mlp_tiny', ...)."
            )
        x = jnp.asarray(x, self.dtype)
        x = nn.relu(nn.Conv(6, (5, 5), padding="SAME", dtype=self.dtype)(x))
        x = block_max_pool(x, 2)
        x = nn.relu(nn.Conv(16, (5, 5), padding="VALID", dtype=self.dtype)(x))
        x = block_max_pool(x, 2)
        x = jnp.reshape(x, (x.shape[0], -1))
        x = nn.relu(nn.Dense(120, dtype=self.dtype)(x))
        x = nn.relu(nn.Dense(84, dtype=self.dtype)(x))
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        return jnp.asarray(x, jnp.float32)
