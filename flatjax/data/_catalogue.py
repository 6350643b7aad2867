"""The catalogue of datasets: names, facts, and preparing them in the data dir.

Every dataset is a tfds dataset stored as array_record; offline ones are
written by flatjax's own builders (:mod:`flatjax.data._builders`), official
ones must be prepared once with TensorFlow on a machine with internet access
(:class:`DatasetNotPreparedError` says how). Nothing here downloads.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
from typing import NamedTuple

import tensorflow_datasets as tfds

from flatjax.data import _builders

__all__ = ["CATALOGUE", "DatasetInfo", "DatasetNotPreparedError", "DEFAULT_DATA_DIR",
           "default_data_dir", "get_info", "prepare", "prepare_tiny_imagenet"]

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
