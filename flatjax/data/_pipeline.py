"""The catalogue and the ``tfds.data_source`` + grain input pipelines.

References:
  Pittorino et al., "Entropic gradient descent algorithms and wide flat
  minima", ICLR 2021, arXiv 2006.07897.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import grain
import numpy as np
import tensorflow_datasets as tfds

from flatjax.data import _augment
from flatjax.data._catalogue import _Spec, _spec, prepare


def _check_fraction(validation_fraction) -> float:
    if not isinstance(validation_fraction, (int, float)) or not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1); got {validation_fraction!r}.")
    return float(validation_fraction)


def _split_records(name, split, data_dir, validation_fraction):
    """``(source, start, stop)``: the tfds data source of ``split`` and its record range.

    ``"train"`` is the head ``1 − f`` of tfds's train split and
    ``"validation"`` its tail ``f`` (``f = validation_fraction``); other
    strings (``"test"``, ``"train[:50%]"``) are passed to tfds unchanged.
    """
    f = _check_fraction(validation_fraction)
    if not isinstance(split, str) or not (split in ("train", "validation", "test") or "[" in split):
        raise ValueError(
            f"split must be 'train', 'validation', 'test' or a tfds slice such as "
            f"'train[:90%]'; got {split!r}."
        )
    if split == "validation" and f == 0:
        raise ValueError("split='validation' needs validation_fraction > 0 (the tail of train).")
    if "[" in split and f > 0:
        raise ValueError(f"Give either a sliced split or validation_fraction, not both: {split!r}.")
    spec = _spec(name)
    data_dir = prepare(name, data_dir)
    tfds_split = "train" if split == "validation" else split
    try:
        src = tfds.data_source(spec.tfds_name, split=tfds_split, data_dir=data_dir,
                               download=False)
    except ValueError as error:
        if "[" not in split:
            raise
        raise ValueError(
            f"The slice {split!r} of {name!r} selects no examples or cannot be read by tfds "
            f"({error}); choose a wider slice, e.g. 'train[:50%]'."
        ) from error
    n = len(src)
    if split in ("train", "validation") and f > 0:
        num_val = int(round(f * n))
        if not 0 < num_val < n:
            raise ValueError(
                f"validation_fraction={f} of {n} examples leaves {num_val} for validation."
            )
        return (src, 0, n - num_val) if split == "train" else (src, n - num_val, n)
    return src, 0, n


def _source(name, split, data_dir, validation_fraction) -> grain.MapDataset:
    """The records of ``split`` (:func:`_split_records`) as a random-access grain ``MapDataset``."""
    src, start, stop = _split_records(name, split, data_dir, validation_fraction)
    ds = grain.MapDataset.source(src)
    return ds if (start, stop) == (0, len(src)) else ds[start:stop]


class _Preprocess(grain.transforms.Map):
    """Record → ``{"image": float32, "label": int32}``, normalised or scaled to [0, 1]."""

    def __init__(self, spec: _Spec, normalize: bool):
        mean = np.asarray(spec.mean if normalize else 0.0, np.float32)
        std = np.asarray(spec.std if normalize else 1.0, np.float32)
        # (x / scale − mean) / std = x · a − b, computed once.
        self._a = (1.0 / (spec.scale * std)).astype(np.float32)
        self._b = (mean / std).astype(np.float32)

    def map(self, record):
        image = np.asarray(record["image"], np.float32) * self._a - self._b
        return {"image": image, "label": np.int32(record["label"])}

    def map_stacked(self, images, labels):
        """:meth:`map` of a stack of records at once (the channel axis is last)."""
        return np.asarray(images, np.float32) * self._a - self._b, np.asarray(labels, np.int32)


class _Augment(grain.transforms.RandomMap):
    """Random crop → flip → normalise → Cutout, with the example's own generator."""

    def __init__(self, spec: _Spec, normalize: bool, cutout: int):
        self._pre = _Preprocess(spec, normalize)
        self._padding, self._flip, self._cutout = spec.crop_padding, spec.flip, cutout

    def random_map(self, record, rng: np.random.Generator):
        image = record["image"]
        if self._padding:
            image = _augment.random_crop(image, rng, self._padding)
        if self._flip:
            image = _augment.random_flip(image, rng)
        out = self._pre.map({"image": image, "label": record["label"]})
        if self._cutout:
            out["image"] = _augment.cutout(out["image"], rng, self._cutout)
        return out


def _stack(elements):
    return {k: np.stack([e[k] for e in elements]) for k in elements[0]}


def _check_int(value, what: str, minimum: int):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}; got {value!r}.")
    return int(value)


def steps_per_epoch(
    name: str,
    batch_size: int,
    split: str = "train",
    validation_fraction: float = 0.0,
    data_dir: str | os.PathLike | None = None,
) -> int:
    """Full batches per epoch, ``⌊n / B⌋`` (``B = batch_size``, ``n`` = examples in ``split``).

    With ``stack=L`` one step of :func:`train_batches` consumes ``L`` of them.

    Example:
      >>> import os, tempfile
      >>> d = os.path.join(tempfile.gettempdir(), "flatjax-doctest-data")
      >>> steps_per_epoch("digits", 100, data_dir=d)
      14
    """
    batch_size = _check_int(batch_size, "batch_size", 1)
    return len(_source(name, split, data_dir, validation_fraction)) // batch_size


def load_arrays(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    normalize: bool = True,
    *,
    validation_fraction: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A whole split in memory, in stored order: ``(x float32 [n, ...], y int32 [n])``.

    ``x = (raw / scale − mean) / std`` per channel when ``normalize`` (the
    :class:`DatasetInfo` statistics), else ``raw / scale`` (pixels in [0, 1]).

    Args:
      name: catalogue name.
      split: ``"train"``, ``"validation"``, ``"test"`` or a tfds slice.
      data_dir: tfds data dir (default :func:`default_data_dir`).
      normalize: standardise per channel.
      validation_fraction: ``f``; ``"train"`` is then the head ``1 − f`` of
        the train split and ``"validation"`` its tail.

    Returns:
      ``(x, y)``.

    Example:
      >>> import os, tempfile
      >>> d = os.path.join(tempfile.gettempdir(), "flatjax-doctest-data")
      >>> x, y = load_arrays("digits", "test", data_dir=d)
      >>> x.shape, y.dtype
      ((360, 8, 8, 1), dtype('int32'))
    """
    src, start, stop = _split_records(name, split, data_dir, validation_fraction)
    if stop <= start:
        raise ValueError(f"The split {split!r} of {name!r} has no examples; choose a wider one.")
    # One batched read of the record range (the data source decodes them in
    # bulk), then the preprocessing as one array operation.
    records = src.__getitems__(list(range(start, stop)))
    images = np.stack([r["image"] for r in records])
    labels = np.array([r["label"] for r in records])
    return _Preprocess(_spec(name), normalize).map_stacked(images, labels)


def _iterate(
    ds: grain.MapDataset, num_threads: int, prefetch: int, num_workers: int = 0
) -> Iterator[dict]:
    read = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    it = ds.to_iter_dataset(read)
    if num_workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (their defaults here)
            flags.FLAGS.mark_as_parsed()
        options = grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=max(1, prefetch // num_workers)
        )
        it = it.mp_prefetch(options)
    return iter(it)


def train_batches(
    name: str,
    *,
    batch_size: int,
    seed: int,
    split: str = "train",
    num_replicas: int | None = None,
    stack: int | None = None,
    augment: bool | None = None,
    cutout: int = 0,
    normalize: bool = True,
    start_step: int = 0,
    num_steps: int | None = None,
    data_dir: str | os.PathLike | None = None,
    validation_fraction: float = 0.0,
    drop_remainder: bool = True,
    prefetch: int = 8,
    num_threads: int = 4,
    num_workers: int = 0,
) -> Iterator[dict]:
    """Shuffled, augmented training batches, endless over epochs and resumable at any step.

    Built from grain ``MapDataset``s, so step ``k`` is a pure function of
    ``(seed, k)`` computed by random access: for replica ``r`` the pipeline
    is ``source → shuffle(s_r) → random_map(augment, a_r) → batch(B) →
    repeat()`` with ``(s_r, a_r)`` drawn from ``SeedSequence([seed, r])``
    (``r = 0`` without replicas). Batch ``j`` of epoch ``e`` holds examples
    ``π_e(jB), …, π_e(jB + B − 1)`` of the permutation ``π_e`` that grain's
    shuffle seeds with ``(s_r + e)``; each example gets its own generator
    from ``(a_r, e n + position)``, so augmentation differs across epochs.
    Background threads assemble the next ``prefetch`` steps.

    Output per step: ``{"image": float32, "label": int32}`` with leading axes
    ``[y, L, B, ...]`` (``y = num_replicas`` axis only when given, ``L =
    stack`` axis only when given). The ``y`` replica streams are
    independent shuffles of the same set; ``stack=L`` yields ``L``
    consecutive batches (one step = ``L`` batches of
    :func:`steps_per_epoch`).

    Args:
      name: catalogue name.
      batch_size: ``B``.
      seed: non-negative integer; same seed → identical batches.
      split: usually ``"train"`` (see :func:`load_arrays`).
      num_replicas: ``y`` independent streams stacked on a leading axis.
      stack: ``L`` consecutive batches stacked (Entropy-SGD's scan mode).
      augment: default augmentation (crop with padding 4, flip where the
        dataset allows); ``None`` → on for CIFAR/SVHN/Tiny ImageNet only.
      cutout: Cutout square side (0: off); needs image data.
      normalize: per-channel standardisation (see :func:`load_arrays`).
      start_step: first step to yield; step ``k`` of a resumed iterator is
        bitwise step ``start_step + k`` of a fresh one.
      num_steps: stop after this many steps (``None``: endless).
      data_dir: tfds data dir (default :func:`default_data_dir`).
      validation_fraction: hold out the tail of train (see :func:`load_arrays`).
      drop_remainder: drop each epoch's last partial batch (needed with
        ``stack``).
      prefetch: steps buffered ahead by the reading threads.
      num_threads: threads assembling steps (0: synchronous).
      num_workers: worker processes assembling steps (0: none). tfds's
        record parsing holds the GIL, so on a many-core host processes, not
        threads, scale the input rate; the output is the same for any value.

    Returns:
      An iterator of dicts of numpy arrays.

    Example:
      >>> import os, tempfile
      >>> d = os.path.join(tempfile.gettempdir(), "flatjax-doctest-data")
      >>> it = train_batches("digits", batch_size=32, seed=0, num_replicas=3, data_dir=d)
      >>> next(it)["image"].shape
      (3, 32, 8, 8, 1)
    """
    spec = _spec(name)
    batch_size = _check_int(batch_size, "batch_size", 1)
    seed = _check_int(seed, "seed", 0)
    start_step = _check_int(start_step, "start_step", 0)
    prefetch = _check_int(prefetch, "prefetch", 0)
    num_threads = _check_int(num_threads, "num_threads", 0)
    num_workers = _check_int(num_workers, "num_workers", 0)
    cutout = _check_int(cutout, "cutout", 0)
    if num_replicas is not None:
        num_replicas = _check_int(num_replicas, "num_replicas", 1)
    if stack is not None:
        stack = _check_int(stack, "stack", 1)
        if not drop_remainder:
            raise ValueError("stack=L needs drop_remainder=True (equal batch sizes to stack).")
    if num_steps is not None:
        num_steps = _check_int(num_steps, "num_steps", 0)
    augment = spec.augment if augment is None else bool(augment)
    if (augment or cutout) and len(spec.input_shape) != 3:
        raise ValueError(
            f"augment/cutout need image data [H, W, C]; {name!r} has input shape "
            f"{spec.input_shape}."
        )
    source = _source(name, split, data_dir, validation_fraction)
    if len(source) < batch_size and drop_remainder:
        raise ValueError(
            f"batch_size={batch_size} exceeds the {len(source)} examples of {split!r}."
        )

    def stream(replica: int) -> grain.MapDataset:
        shuffle_seed, aug_seed = np.random.SeedSequence([seed, replica]).generate_state(2)
        ds = source.shuffle(seed=int(shuffle_seed))
        if augment or cutout:
            aug_spec = spec if augment else spec._replace(crop_padding=0, flip=False)
            ds = ds.random_map(_Augment(aug_spec, normalize, cutout), seed=int(aug_seed))
        else:
            ds = ds.map(_Preprocess(spec, normalize))
        ds = ds.batch(batch_size, drop_remainder=drop_remainder).repeat()
        return ds.batch(stack) if stack else ds

    if num_replicas is None:
        ds = stream(0)
    else:
        ds = grain.experimental.ZipMapDataset([stream(r) for r in range(num_replicas)])
        ds = ds.map(_stack)
    stop = sys.maxsize if num_steps is None else start_step + num_steps
    return _iterate(ds[start_step:stop], num_threads, prefetch, num_workers)


def eval_batches(
    name: str,
    split: str = "test",
    batch_size: int = 1000,
    *,
    data_dir: str | os.PathLike | None = None,
    validation_fraction: float = 0.0,
    normalize: bool = True,
    prefetch: int = 4,
    num_threads: int = 2,
) -> Iterator[dict]:
    """One ordered pass over ``split``: no shuffle, no augmentation, last partial batch kept.

    Example:
      >>> import os, tempfile
      >>> d = os.path.join(tempfile.gettempdir(), "flatjax-doctest-data")
      >>> [b["label"].shape[0] for b in eval_batches("digits", batch_size=100, data_dir=d)]
      [100, 100, 100, 60]
    """
    spec = _spec(name)
    batch_size = _check_int(batch_size, "batch_size", 1)
    ds = _source(name, split, data_dir, validation_fraction).map(_Preprocess(spec, normalize))
    ds = ds.batch(batch_size, drop_remainder=False)
    num_threads = _check_int(num_threads, "num_threads", 0)
    return _iterate(ds, num_threads, _check_int(prefetch, "prefetch", 0))
