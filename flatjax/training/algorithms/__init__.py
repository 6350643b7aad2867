"""The algorithms of the training library, one module each, looked up by name.

``config.algorithm`` names one of :data:`ALGORITHMS`; :func:`get` returns
its :class:`~flatjax.training.algorithms.base.Algorithm`, which provides
everything the loop, the evaluation and the results need (the step plan,
the batch layout, the optimizer, the training step, the network to evaluate
and save). Nothing outside this package branches on the algorithm's name.

Example:
  >>> from flatjax.training import algorithms, base_config
  >>> config = base_config()
  >>> config.algorithm = "replicated_sgd"
  >>> algorithms.get(config.algorithm).batch_shape(config)
  {'num_replicas': 3}
"""

from __future__ import annotations

from flatjax.training.algorithms.base import LAYOUTS, Algorithm, StepCost
from flatjax.training.algorithms.entropy_sgd import EntropySGD
from flatjax.training.algorithms.replicated_sgd import ReplicatedSGD
from flatjax.training.algorithms.sgd import SGD

__all__ = ["ALGORITHMS", "Algorithm", "StepCost", "LAYOUTS", "get", "names"]

ALGORITHMS: dict[str, Algorithm] = {
    algorithm.name: algorithm for algorithm in (SGD(), EntropySGD(), ReplicatedSGD())
}


def names() -> tuple[str, ...]:
    """The valid values of ``config.algorithm``."""
    return tuple(ALGORITHMS)


def get(name: str) -> Algorithm:
    """The :class:`Algorithm` called ``name`` (``'sgd'``, ``'entropy_sgd'``, ``'replicated_sgd'``).

    Raises:
      ValueError: an unknown name, listing the valid ones.
    """
    try:
        return ALGORITHMS[name]
    except (KeyError, TypeError):
        raise ValueError(
            "config.algorithm must be one of "
            + ", ".join(repr(n) for n in ALGORITHMS) + f", got {name!r}."
        ) from None
