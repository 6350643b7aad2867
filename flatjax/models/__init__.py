"""Models: one parametrised Flax definition per family, named variants as partials.

Every model is called as ``model.apply(variables, x, train=bool, rngs=...,
mutable=["batch_stats"] when train)`` on NHWC float32 images (the MLP
flattens any input; the 1-D CNN takes [B, n] or [B, n, C] sequences) and
returns float32 logits [B, num_classes]. BatchNorm statistics live in the
``batch_stats`` collection. Randomness in training mode comes from the rng
streams ``"dropout"`` (WideResNet dropout, EfficientNet dropout and
stochastic depth) and ``"shakedrop"`` (PyramidNet).

``MODELS`` maps names to constructors; ``get_model(name, num_classes)``
builds one.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from flatjax.models.conv1d import MNIST1DCNN, Conv1D, conv_output_length
from flatjax.models.efficientnet import (
    EfficientNet,
    EfficientNetB0,
    EfficientNetTiny,
    MBConv,
    round_filters,
)
from flatjax.models.lenet import LeNet5
from flatjax.models.mlp import MLP, MLP300100, MLPTiny, MLPWide
from flatjax.models.pyramidnet import (
    PyramidBottleneck,
    PyramidNet,
    PyramidNet272,
    PyramidNetTiny,
    ShakeDrop,
    pyramid_widths,
    shake_drop,
)
from flatjax.models.resnet import BasicBlock, ResNet, ResNet18, ResNet110, ResNetTiny
from flatjax.models.wide_resnet import WideBlock, WideResNet, WideResNet28_10, WideResNetTiny

MODELS = {
    "mlp": MLP300100,
    "mlp_wide": MLPWide,
    "mlp_tiny": MLPTiny,
    "lenet5": LeNet5,
    "cnn1d": MNIST1DCNN,
    "resnet18": ResNet18,
    "resnet110": ResNet110,
    "resnet_tiny": ResNetTiny,
    "wrn28_10": WideResNet28_10,
    "wrn_tiny": WideResNetTiny,
    "pyramidnet272": PyramidNet272,
    "pyramidnet_tiny": PyramidNetTiny,
    "efficientnet_b0": EfficientNetB0,
    "efficientnet_tiny": EfficientNetTiny,
}


def get_model(name: str, num_classes: int, **kwargs):
    """Build the model called ``name`` with ``num_classes`` outputs.

    Args:
      name: a key of ``MODELS``: "mlp", "mlp_wide", "mlp_tiny", "lenet5",
        "cnn1d", "resnet18", "resnet110", "resnet_tiny", "wrn28_10", "wrn_tiny",
        "pyramidnet272", "pyramidnet_tiny", "efficientnet_b0",
        "efficientnet_tiny".
      num_classes: number of output logits, a positive integer.
      **kwargs: further fields of the model (e.g. ``dtype``,
        ``final_survival_prob``, ``dropout_rate``).

    Returns:
      An unbound ``flax.linen.Module``.

    Example:
      >>> model = get_model("resnet18", num_classes=100)
      >>> model.stage_sizes, model.num_classes
      ((2, 2, 2, 2), 100)
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names are {sorted(MODELS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return MODELS[name](num_classes=num_classes, **kwargs)


def num_params(model, input_shape) -> int:
    """Number of trainable parameters (the ``params`` collection) of ``model``.

    Counts Σ_leaves size over ``params`` only: BatchNorm's scale and bias
    count (as PyTorch's weight and bias do), its running statistics do not.
    Nothing is computed: shapes come from ``jax.eval_shape`` of ``init``.

    Args:
      model: a Flax module following the flatjax call convention.
      input_shape: shape of one input batch, e.g. ``(1, 32, 32, 3)``.

    Returns:
      The parameter count, a Python int.

    Example:
      >>> num_params(get_model("lenet5", num_classes=10), (1, 28, 28, 1))
      61706
    """
    shapes = jax.eval_shape(
        model.init, jax.random.PRNGKey(0), jnp.zeros(input_shape, jnp.float32)
    )
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))


__all__ = [
    "MODELS",
    "MLP",
    "MLP300100",
    "MLPTiny",
    "MLPWide",
    "LeNet5",
    "Conv1D",
    "MNIST1DCNN",
    "conv_output_length",
    "BasicBlock",
    "ResNet",
    "ResNet18",
    "ResNet110",
    "ResNetTiny",
    "WideBlock",
    "WideResNet",
    "WideResNet28_10",
    "WideResNetTiny",
    "PyramidBottleneck",
    "PyramidNet",
    "PyramidNet272",
    "PyramidNetTiny",
    "ShakeDrop",
    "shake_drop",
    "pyramid_widths",
    "MBConv",
    "EfficientNet",
    "EfficientNetB0",
    "EfficientNetTiny",
    "round_filters",
    "get_model",
    "num_params",
]
