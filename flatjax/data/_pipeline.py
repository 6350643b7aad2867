"""The catalogue and the ``tfds.data_source`` + grain input pipelines.

References:
  Pittorino et al., "Entropic gradient descent algorithms and wide flat
  minima", ICLR 2021, arXiv 2006.07897.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import sys
from collections.abc import Iterator
from typing import NamedTuple

import grain
import numpy as np
import tensorflow_datasets as tfds

from flatjax.data import _augment, _builders

DEFAULT_DATA_DIR = os.path.join("~", ".cache", "flatjax", "tensorflow_datasets")


class DatasetInfo(NamedTuple):
    """What a model and a training loop need to know about a dataset.

    Attributes:
      name: the flatjax name (a key of the catalogue).
      num_classes: number of classes K; labels are in ``{0, …, K − 1}``.
      input_shape: shape of one example, ``(H, W, C)`` for images, ``(D,)``
        for vectors.
      num_train: examples in the full ``train`` split (before any
        validation hold-out).
      num_test: examples in the ``test`` split.
      mean: per-channel mean used by normalisation (of ``x / scale``).
      std: per-channel standard deviation used by normalisation.
    """

    name: str
    num_classes: int
    input_shape: tuple
    num_train: int
    num_test: int
    mean: tuple
    std: tuple


class _Spec(NamedTuple):
    tfds_name: str
    num_classes: int
    input_shape: tuple
    num_train: int
    num_test: int
    mean: tuple
    std: tuple
    scale: float  # raw value of a full-intensity pixel
    crop_padding: int  # random-crop padding of the default augmentation (0: no crop)
    flip: bool  # horizontal flips in the default augmentation
    augment: bool  # augmentation on by default
    kind: str  # "official" (tfds catalogue), "offline" (flatjax builder), "local"


_CIFAR10_MEAN, _CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)

CATALOGUE: dict[str, _Spec] = {
    # The CIFAR-10 std is the paper's (and the common PyTorch recipe's) value,
    # not the exact pixel std (0.247, 0.243, 0.261); kept for fidelity.
    "cifar10": _Spec("cifar10", 10, (32, 32, 3), 50000, 10000,
                     _CIFAR10_MEAN, _CIFAR10_STD, 255.0, 4, True, True, "official"),
    "cifar100": _Spec("cifar100", 100, (32, 32, 3), 50000, 10000,
                      (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                      255.0, 4, True, True, "official"),
    "mnist": _Spec("mnist", 10, (28, 28, 1), 60000, 10000,
                   (0.1307,), (0.3081,), 255.0, 0, False, False, "official"),
    "fashion_mnist": _Spec("fashion_mnist", 10, (28, 28, 1), 60000, 10000,
                           (0.2860,), (0.3530,), 255.0, 0, False, False, "official"),
    # Digits are not mirror-symmetric: SVHN's default augmentation crops only.
    "svhn_cropped": _Spec("svhn_cropped", 10, (32, 32, 3), 73257, 26032,
                          (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                          255.0, 4, False, True, "official"),
    "tiny_imagenet": _Spec("flatjax_tiny_imagenet", 200, (64, 64, 3), 100000, 10000,
                           (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821),
                           255.0, 4, True, True, "local"),
    # Offline sets: mean/std are the statistics of their own training split.
    "digits": _Spec("flatjax_digits", 10, (8, 8, 1), 1437, 360,
                    (0.30538,), (0.37612,), 16.0, 0, False, False, "offline"),
    "mnist5k": _Spec("flatjax_mnist5k", 10, (28, 28, 1), 4000, 1000,
                     (0.13114,), (0.30832,), 255.0, 0, False, False, "offline"),
    "mnist1d": _Spec("flatjax_mnist1d", 10, (40,), 4000, 1000,
                     (-0.00032,), (0.99765,), 1.0, 0, False, False, "offline"),
    "mnist1d_10k": _Spec("flatjax_mnist1d_10k", 10, (40,), 10000, 2500,
                         (0.00041,), (0.99959,), 1.0, 0, False, False, "offline"),
    # Synthetic CIFAR look-alike (smoke tests, benchmarks): CIFAR-10's recipe.
    "fake_cifar10": _Spec("flatjax_fake_cifar10", 10, (32, 32, 3), 5000, 1000,
                          _CIFAR10_MEAN, _CIFAR10_STD, 255.0, 4, True, True, "offline"),
    # The theory's inputs are used as generated (no normalisation).
    "gaussian_mixture": _Spec("flatjax_gaussian_mixture", 2, (_builders.GM_DIM,),
                              int(round(_builders.GM_ALPHA * _builders.GM_DIM)),
                              _builders.GM_NUM_TEST, (0.0,), (1.0,), 1.0, 0, False, False,
                              "offline"),
}  # fmt: skip
_ALIASES = {"svhn": "svhn_cropped"}


class DatasetNotPreparedError(FileNotFoundError):
    """An official (or local-folder) dataset is not in ``data_dir``; flatjax never downloads."""


def _spec(name: str) -> _Spec:
    if not isinstance(name, str) or _ALIASES.get(name, name) not in CATALOGUE:
        raise ValueError(
            f"Unknown dataset {name!r}; known datasets: {sorted(CATALOGUE)} "
            f"(aliases: {sorted(_ALIASES)})."
        )
    return CATALOGUE[_ALIASES.get(name, name)]


def default_data_dir(data_dir: str | os.PathLike | None = None) -> str:
    """The tfds data dir: ``data_dir``, else ``$FLATJAX_DATA_DIR``, else the default.

    The default is ``~/.cache/flatjax/tensorflow_datasets``.

    Example:
      >>> default_data_dir("/data/tfds")
      '/data/tfds'
    """
    if data_dir is None:
        data_dir = os.environ.get("FLATJAX_DATA_DIR") or DEFAULT_DATA_DIR
    return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


@contextlib.contextmanager
def _file_lock(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _download_and_prepare(builder, **kwargs) -> None:
    """tfds prints its progress lines to stdout; send them to the log instead."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        builder.download_and_prepare(file_format="array_record", **kwargs)
    logging.getLogger(__name__).info(out.getvalue().strip())


def _not_prepared_message(name: str, spec: _Spec, data_dir: str, reason: str) -> str:
    if spec.kind == "local":
        return (
            f"Dataset {name!r} is not prepared in data_dir {data_dir!r} ({reason}).\n"
            f"{_builders.TINY_IMAGENET_INSTRUCTIONS}"
        )
    return (
        f"Dataset {name!r} (tfds {spec.tfds_name!r}) is not prepared in data_dir "
        f"{data_dir!r} ({reason}). flatjax never downloads. Prepare it once, as "
        f"array_record, on a machine with internet access (TensorFlow is needed only "
        f"for this step):\n"
        f"  pip install -e '<flatjax checkout>[prepare]'   (or: pip install tensorflow-cpu)\n"
        f"  tfds build {spec.tfds_name} --file_format=array_record --data_dir {data_dir}\n"
        f"then copy {os.path.join(data_dir, spec.tfds_name)} to this machine, or pass "
        f"data_dir=... (or set $FLATJAX_DATA_DIR) to the directory that holds it."
    )


def prepare(name: str, data_dir: str | os.PathLike | None = None) -> str:
    """Make ``name`` readable by ``tfds.data_source`` and return the data dir used.

    Offline datasets are written into array_record the first time (a few
    seconds), under a file lock; tfds writes into ``incomplete.*`` and renames
    on success, so a crash mid-write leaves nothing that looks prepared and
    the next call starts over. Official datasets are only checked, never
    downloaded: a missing one raises :class:`DatasetNotPreparedError` with
    instructions, before tfds can touch the network.

    Args:
      name: a catalogue name (see ``flatjax.data.CATALOGUE``).
      data_dir: tfds data dir (default :func:`default_data_dir`).

    Returns:
      The absolute data dir.

    Example:
      >>> import os, tempfile
      >>> d = os.path.join(tempfile.gettempdir(), "flatjax-doctest-data")
      >>> prepare("digits", d) == d
      True
    """
    spec = _spec(name)
    data_dir = default_data_dir(data_dir)
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    if builder.is_prepared():
        fmt = builder.info.file_format
        if fmt is not None and fmt != tfds.core.FileFormat.ARRAY_RECORD:
            raise DatasetNotPreparedError(
                _not_prepared_message(
                    name, spec, data_dir,
                    f"found as {fmt.value}, not array_record; convert it with `tfds "
                    f"convert_format --dataset_version_dir {builder.data_path} "
                    f"--out_file_format array_record --out_dir DIR`",
                )
            )  # fmt: skip
        return data_dir
    if spec.kind != "offline":
        raise DatasetNotPreparedError(
            _not_prepared_message(name, spec, data_dir, f"{builder.data_path} missing")
        )
    with _file_lock(os.path.join(data_dir, f".{spec.tfds_name}.lock")):
        builder = tfds.builder(spec.tfds_name, data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            _download_and_prepare(builder)
    return data_dir


def prepare_tiny_imagenet(source_dir: str | os.PathLike, data_dir=None) -> str:
    """Write a local ``tiny-imagenet-200/`` folder into array_record (once).

    Args:
      source_dir: the directory that CONTAINS ``tiny-imagenet-200/``.
      data_dir: tfds data dir (default :func:`default_data_dir`).

    Returns:
      The absolute data dir; afterwards ``train_batches("tiny_imagenet",
      data_dir=...)`` works offline.

    Example:
      >>> prepare_tiny_imagenet("/nonexistent/raw", "/nonexistent/tfds")
      Traceback (most recent call last):
      ...
      FileNotFoundError: '/nonexistent/raw' does not contain tiny-imagenet-200/wnids.txt...
    """
    source_dir = os.path.abspath(os.path.expanduser(os.fspath(source_dir)))
    if not os.path.isfile(os.path.join(source_dir, "tiny-imagenet-200", "wnids.txt")):
        raise FileNotFoundError(
            f"{source_dir!r} does not contain tiny-imagenet-200/wnids.txt.\n"
            f"{_builders.TINY_IMAGENET_INSTRUCTIONS}"
        )
    data_dir = default_data_dir(data_dir)
    tfds_name = CATALOGUE["tiny_imagenet"].tfds_name
    with _file_lock(os.path.join(data_dir, f".{tfds_name}.lock")):
        builder = tfds.builder(tfds_name, data_dir=data_dir, file_format="array_record")
        if not builder.is_prepared():
            _download_and_prepare(
                builder, download_config=tfds.download.DownloadConfig(manual_dir=source_dir)
            )
    return data_dir


def get_info(name: str, data_dir: str | os.PathLike | None = None) -> DatasetInfo:
    """Static facts about a dataset; split sizes from its tfds metadata when prepared.

    Example:
      >>> get_info("cifar10", data_dir="/nonexistent").input_shape
      (32, 32, 3)
    """
    spec = _spec(name)
    num_train, num_test = spec.num_train, spec.num_test
    builder = tfds.builder(spec.tfds_name, data_dir=default_data_dir(data_dir))
    if builder.is_prepared():
        splits = builder.info.splits
        num_train, num_test = splits["train"].num_examples, splits["test"].num_examples
    return DatasetInfo(
        _ALIASES.get(name, name), spec.num_classes, spec.input_shape,
        num_train, num_test, spec.mean, spec.std,
    )  # fmt: skip


def _check_fraction(validation_fraction) -> float:
    if not isinstance(validation_fraction, (int, float)) or not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1); got {validation_fraction!r}.")
    return float(validation_fraction)


def _source(name, split, data_dir, validation_fraction) -> grain.MapDataset:
    """The records of ``split`` as a random-access grain ``MapDataset``.

    ``"train"`` is the head ``1 − f`` of tfds's train split and
    ``"validation"`` its tail ``f`` (``f = validation_fraction``); other
    strings (``"test"``, ``"train[:50%]"``) are passed to tfds unchanged.
    """
    spec = _spec(name)
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
    data_dir = prepare(name, data_dir)
    tfds_split = "train" if split == "validation" else split
    src = tfds.data_source(spec.tfds_name, split=tfds_split, data_dir=data_dir, download=False)
    ds = grain.MapDataset.source(src)
    if split in ("train", "validation") and f > 0:
        n = len(ds)
        num_val = int(round(f * n))
        if not 0 < num_val < n:
            raise ValueError(
                f"validation_fraction={f} of {n} examples leaves {num_val} for validation."
            )
        ds = ds[: n - num_val] if split == "train" else ds[n - num_val :]
    return ds


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
    spec = _spec(name)
    ds = _source(name, split, data_dir, validation_fraction).map(_Preprocess(spec, normalize))
    batch = _stack([ds[i] for i in range(len(ds))])
    return batch["image"], batch["label"]


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
