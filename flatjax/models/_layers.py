"""The convolution and BatchNorm constructors the convolutional models share."""

from functools import partial

import flax.linen as nn

# He initialisation (fan-out), as in torchvision and the CIFAR reference code.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv_and_norm(train: bool, dtype, *, momentum: float = 0.9, epsilon: float = 1e-5):
    """``(conv, norm)``: bias-free He-initialised ``nn.Conv`` and ``nn.BatchNorm`` partials.

    BatchNorm uses batch statistics when ``train`` and its running averages
    otherwise; ``momentum``/``epsilon`` default to PyTorch's 0.1/1e-5 (flax's
    momentum is the weight of the old average).
    """
    conv = partial(nn.Conv, use_bias=False, kernel_init=conv_init, dtype=dtype)
    norm = partial(
        nn.BatchNorm, use_running_average=not train, momentum=momentum, epsilon=epsilon,
        dtype=dtype,
    )
    return conv, norm
