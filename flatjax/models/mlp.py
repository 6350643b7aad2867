"""Multilayer perceptron: the small fully connected networks of the MNIST runs."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
    """ReLU multilayer perceptron on flattened inputs.

    f(x) = W_{D+1} relu(W_D ⋯ relu(W_1 vec(x) + b_1) ⋯ + b_D) + b_{D+1}, with
    hidden widths ``hidden_sizes`` = (n_1, …, n_D). Any input [B, ...] is
    flattened to [B, d]; with input size d the model has
    Σ_k (n_{k−1} + 1) n_k parameters (n_0 = d, n_{D+1} = ``num_classes``).
    It has no BatchNorm; ``train`` is accepted for the shared call convention
    and ignored.

    Attributes:
      hidden_sizes: widths of the hidden layers, in order.
      num_classes: number of output logits.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = MLPTiny(num_classes=3)
      >>> variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 1)))
      >>> model.apply(variables, jnp.ones((2, 4, 4, 1)), train=False).shape
      (2, 3)

    References:
      LeCun, Bottou, Bengio, Haffner (1998), "Gradient-based learning applied
      to document recognition" (the 784-300-100-10 network, ``MLP300100``).
    """

    hidden_sizes: Sequence[int] = (300, 100)
    num_classes: int = 10

    def __post_init__(self):
        if not all(isinstance(h, int) and h > 0 for h in self.hidden_sizes):
            raise ValueError(
                f"hidden_sizes must be positive integers, got {tuple(self.hidden_sizes)!r}"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no train-dependent layers
        x = jnp.reshape(x, (x.shape[0], -1))
        for width in self.hidden_sizes:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


MLP300100 = partial(MLP, hidden_sizes=(300, 100))
MLPWide = partial(MLP, hidden_sizes=(1024, 1024))
MLPTiny = partial(MLP, hidden_sizes=(16,))
