"""Small 1-D convolutional network for sequence inputs such as MNIST-1D."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax.numpy as jnp


def conv_output_length(length: int, kernel_size: int, stride: int, padding: int) -> int:
    """Output length of a 1-D convolution: ⌊(n + 2p − k) / s⌋ + 1.

    Example:
      >>> conv_output_length(40, kernel_size=5, stride=2, padding=1)
      19
    """
    return (length + 2 * padding - kernel_size) // stride + 1


class Conv1D(nn.Module):
    """1-D CNN: ReLU convolutions, then one linear layer on the flattened features.

    h_0 = x ∈ ℝ^{n×c_0}; h_k = relu(conv1d(h_{k−1}; kernel k_k, stride s,
    zero padding p, ``channels`` filters)) for k = 1 … K; logits = W vec(h_K)
    + b. Each convolution has (k_k c_{k−1} + 1) c_k parameters and maps length
    n to ⌊(n + 2p − k_k) / s⌋ + 1 (:func:`conv_output_length`). The input is
    [B, n] (one channel) or [B, n, c_0]. ``train`` is accepted for the shared
    call convention and ignored (no BatchNorm, no dropout).

    ``MNIST1DCNN`` is the convolutional baseline of the MNIST-1D paper: three
    convolutions of 25 channels with kernels (5, 3, 3), stride 2, padding 1,
    so a 40-long signal becomes 19 → 10 → 5 positions and the linear layer
    reads 25 · 5 = 125 features: 150 + 1,900 + 1,900 + 1,260 = 5,210
    parameters at 10 classes.

    Attributes:
      channels: filters of every convolution.
      kernel_sizes: kernel length of each convolution, in order.
      strides: stride of every convolution.
      padding: zero padding on both ends of every convolution.
      num_classes: number of output logits.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = MNIST1DCNN(num_classes=10)
      >>> variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 40)))
      >>> model.apply(variables, jnp.ones((2, 40)), train=False).shape
      (2, 10)

    References:
      Greydanus (2020), "Scaling down deep learning", arXiv 2011.14439
      (MNIST-1D and its ``ConvBase`` network).
    """

    channels: int = 25
    kernel_sizes: Sequence[int] = (5, 3, 3)
    strides: int = 2
    padding: int = 1
    num_classes: int = 10

    def __post_init__(self):
        if not (isinstance(self.channels, int) and self.channels > 0):
            raise ValueError(f"channels must be a positive integer, got {self.channels!r}")
        if not self.kernel_sizes or not all(
            isinstance(k, int) and k > 0 for k in self.kernel_sizes
        ):
            raise ValueError(
                f"kernel_sizes must be positive integers, got {tuple(self.kernel_sizes)!r}"
            )
        if not (isinstance(self.strides, int) and self.strides > 0):
            raise ValueError(f"strides must be a positive integer, got {self.strides!r}")
        if not (isinstance(self.padding, int) and self.padding >= 0):
            raise ValueError(f"padding must be a non-negative integer, got {self.padding!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no train-dependent layers
        if x.ndim == 2:
            x = x[..., None]
        if x.ndim != 3:
            raise ValueError(f"Conv1D expects [B, n] or [B, n, C] sequences, got shape {x.shape}")
        length = x.shape[1]
        for k in self.kernel_sizes:
            length = conv_output_length(length, k, self.strides, self.padding)
            if length < 1:
                raise ValueError(
                    f"input length {x.shape[1]} is too short for kernels "
                    f"{tuple(self.kernel_sizes)} at stride {self.strides}"
                )
        for k in self.kernel_sizes:
            x = nn.Conv(self.channels, (k,), strides=(self.strides,),
                        padding=((self.padding, self.padding),))(x)
            x = nn.relu(x)
        x = jnp.reshape(x, (x.shape[0], -1))
        return nn.Dense(self.num_classes)(x)


MNIST1DCNN = partial(Conv1D, channels=25, kernel_sizes=(5, 3, 3), strides=2, padding=1)

__all__ = ["Conv1D", "MNIST1DCNN", "conv_output_length"]
