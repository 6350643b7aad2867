"""Where training batches come from: :class:`DataSource`.

:func:`dataset_source` wraps ``flatjax.data`` (the catalogue of offline
datasets); :func:`array_source` wraps arrays in memory with the same
resumable batching rule: the minibatches of step t depend only on the seed
and t, so a resumed run draws exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
import numpy as np

__all__ = ["DataSource", "array_source", "dataset_source"]


@dataclasses.dataclass(frozen=True)
class DataSource:
    """The data a run needs, independent of where it comes from.

    Attributes:
      info: object or mapping with ``num_classes`` and ``input_shape``.
      data_steps_per_epoch: minibatches per pass over the training set (N/B).
      train_batches: ``train_batches(start_step, num_replicas, stack)`` → an
        endless iterator of ``{'image', 'label'}`` numpy batches with leading
        axes ``[y, L, B]`` (each only when given); step k must be a pure
        function of the seed and k, so a resumed stream is bitwise the same.
      eval_split: name of the evaluation split ('test' or 'val').
      eval_arrays: ``(x, y)`` of the evaluation split.
      stats_batches: ``stats_batches()`` → a few training batches ``[B, ...]``
        for recomputing BatchNorm statistics of the centre.
    """

    info: Any
    data_steps_per_epoch: int
    train_batches: Callable[..., Iterator[dict]]
    eval_split: str
    eval_arrays: tuple
    stats_batches: Callable[[], list]


def array_source(
    train: tuple,
    evaluation: tuple,
    *,
    num_classes: int,
    batch_size: int,
    seed: int = 0,
    eval_split: str = "test",
) -> DataSource:
    """A :class:`DataSource` over arrays in memory.

    Batch j of replica r holds examples π_{r,e}(jB − eN/B·B …) of the
    permutation π_{r,e} = ``default_rng([seed, r, e]).permutation(N)`` of
    epoch e = ⌊j / (N/B)⌋ (the last partial batch of each epoch is dropped),
    so every step is a pure function of ``(seed, step)`` and streams resume
    exactly.

    Args:
      train: ``(x [N, ...], y [N])`` training arrays.
      evaluation: ``(x, y)`` of the evaluation split.
      num_classes: number of classes.
      batch_size: B.
      seed: shuffling seed.
      eval_split: name for the evaluation split in metrics.

    Returns:
      A :class:`DataSource`.

    Example:
      >>> import numpy as np
      >>> from flatjax.training import array_source
      >>> x, y = np.zeros((10, 3), np.float32), np.arange(10) % 2
      >>> data = array_source((x, y), (x, y), num_classes=2, batch_size=4)
      >>> data.data_steps_per_epoch, next(data.train_batches(0, 3, 2))["image"].shape
      (2, (3, 2, 4, 3))
    """
    for name, value in (("batch_size", batch_size), ("num_classes", num_classes)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    for name, (xs, ys) in (("train", train), ("evaluation", evaluation)):
        if len(xs) != len(ys):
            raise ValueError(
                f"{name} inputs and labels must have the same length, got x with {len(xs)} "
                f"rows and y with {len(ys)} labels."
            )
    x, y = np.asarray(train[0], np.float32), np.asarray(train[1], np.int32)
    n = len(y)
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size={batch_size} exceeds the {n} training examples.")

    def batch(replica, j):
        epoch, pos = divmod(j, per_epoch)
        order = np.random.default_rng([seed, replica, epoch]).permutation(n)
        idx = order[pos * batch_size : (pos + 1) * batch_size]
        return {"image": x[idx], "label": y[idx]}

    def train_batches(start_step=0, num_replicas=None, stack=None):
        step = start_step
        while True:
            replicas = []
            for r in range(num_replicas or 1):
                if stack:
                    parts = [batch(r, step * stack + i) for i in range(stack)]
                    replicas.append({k: np.stack([p[k] for p in parts]) for k in parts[0]})
                else:
                    replicas.append(batch(r, step))
            if num_replicas is None:
                yield replicas[0]
            else:
                yield {k: np.stack([b[k] for b in replicas]) for k in replicas[0]}
            step += 1

    def stats_batches():
        return [batch(0, j) for j in range(min(per_epoch, 10))]

    info = {"num_classes": num_classes, "input_shape": tuple(x.shape[1:]), "num_train": n}
    evaluation = (np.asarray(evaluation[0], np.float32), np.asarray(evaluation[1], np.int32))
    return DataSource(info, per_epoch, train_batches, eval_split, evaluation, stats_batches)


def dataset_source(config: ml_collections.ConfigDict) -> DataSource:
    """A :class:`DataSource` over ``flatjax.data``'s catalogue dataset ``config.dataset``.

    Evaluation uses the ``test`` split, or the ``validation`` hold-out (the
    tail ``config.validation_fraction`` of train) when that is > 0.

    Example:
      >>> from flatjax.training import base_config, dataset_source
      >>> config = base_config()
      >>> config.dataset = "digits"
      >>> dataset_source(config).data_steps_per_epoch  # doctest: +SKIP
      11
    """
    from flatjax import data

    name, data_dir = config.dataset, config.data_dir
    fraction = config.validation_fraction
    info = data.get_info(name, data_dir=data_dir)
    per_epoch = data.steps_per_epoch(
        name, config.batch_size, validation_fraction=fraction, data_dir=data_dir
    )

    def train_batches(start_step=0, num_replicas=None, stack=None):
        return data.train_batches(
            name, batch_size=config.batch_size, seed=config.seed, num_replicas=num_replicas,
            stack=stack, augment=config.augment, start_step=start_step, data_dir=data_dir,
            validation_fraction=fraction,
        )

    split = "validation" if fraction > 0 else "test"
    arrays = data.load_arrays(name, split, data_dir=data_dir, validation_fraction=fraction)

    def stats_batches():
        it = data.eval_batches(
            name, "train", config.batch_size, data_dir=data_dir, validation_fraction=fraction
        )
        return [b for _, b in zip(range(10), it, strict=False)]

    return DataSource(info, per_epoch, train_batches, "val" if fraction > 0 else "test",
                      arrays, stats_batches)
