"""SGD: the baseline, one minibatch and one gradient per step.

The optimizer is ``chain(add_decayed_weights(λ), sgd(η_t, momentum,
nesterov))``, the paper's baseline (Nesterov 0.9, weight decay 5e-4).
"""

from __future__ import annotations

import optax

from flatjax.training.algorithms import _common
from flatjax.training.algorithms.base import Algorithm

__all__ = ["SGD", "sgd_optimizer"]


def sgd_optimizer(config, total_steps: int):
    """``chain(add_decayed_weights(λ), sgd(η_t, momentum, nesterov))`` of ``config``."""
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.sgd(_common.lr_schedule(config, total_steps), config.momentum, config.nesterov),
    )


class SGD(Algorithm):
    """Plain SGD with momentum and weight decay."""

    name = "sgd"
    label = "SGD"

    def make_optimizer(self, config, plan, hparams):
        return sgd_optimizer(config, plan.total_steps)

    def make_step(self, config):
        return _common.minibatch_step(config.nan_policy)
