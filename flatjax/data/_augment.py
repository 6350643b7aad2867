"""Per-example image transforms in pure NumPy (the paper's CIFAR augmentation).

Each transform takes one image ``[H, W, C]`` and, when random, a
``np.random.Generator``; the pipeline hands every example its own generator,
seeded by (seed, example position), so augmentation is deterministic by seed.

References:
  Pittorino et al., "Entropic gradient descent algorithms and wide flat
  minima", ICLR 2021, arXiv 2006.07897 (random crop with padding 4, flip,
  normalisation); DeVries & Taylor, "Improved regularization of convolutional
  neural networks with Cutout", arXiv 1708.04552.
"""

from __future__ import annotations

import numpy as np


def _check_image(image: np.ndarray, fn: str) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3:
        raise ValueError(
            f"{fn} expects one image as a numpy array [H, W, C]; "
            f"got {type(image).__name__} with shape {getattr(image, 'shape', None)}."
        )


def random_crop(image: np.ndarray, rng: np.random.Generator, padding: int = 4) -> np.ndarray:
    """Random crop of the zero-padded image back to its own size.

    The image is padded with ``p`` zeros on each side of both spatial axes
    (``p = padding``) and a window of the original size ``H × W`` is cut at a
    uniformly random offset ``(i, j) ∈ {0..2p}²``:
    ``out[h, w] = pad(x)[i + h, j + w]``.

    Args:
      image: ``[H, W, C]`` array (raw pixels: padding is black, as in the
        reference PyTorch ``RandomCrop(32, padding=4)`` before ``Normalize``).
      rng: the example's generator.
      padding: ``p ≥ 0``.

    Returns:
      An array of the same shape and dtype.

    Example:
      >>> x = np.arange(2 * 2 * 1, dtype=np.uint8).reshape(2, 2, 1) + 1
      >>> random_crop(x, np.random.default_rng(0), padding=1).shape
      (2, 2, 1)
    """
    _check_image(image, "random_crop")
    if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
        raise ValueError(f"padding must be an integer >= 0; got {padding!r}.")
    if padding == 0:
        return image
    h, w = image.shape[:2]
    # out[r, c] = pad(x)[i + r, j + c] = x[r + di, c + dj] with (di, dj) = (i − p, j − p):
    # a shifted copy into a zero canvas, without materialising pad(x).
    di, dj = (int(k) for k in rng.integers(-padding, padding + 1, size=2))
    out = np.zeros_like(image)
    r0, r1 = max(-di, 0), min(h, h - di)
    c0, c1 = max(-dj, 0), min(w, w - dj)
    if r1 > r0 and c1 > c0:
        out[r0:r1, c0:c1] = image[r0 + di : r1 + di, c0 + dj : c1 + dj]
    return out


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirror the image left–right with probability ½: ``out[h, w] = x[h, W − 1 − w]``.

    Args:
      image: ``[H, W, C]`` array.
      rng: the example's generator.

    Returns:
      The image or its mirror image (same shape and dtype).

    Example:
      >>> x = np.arange(3).reshape(1, 3, 1)
      >>> outs = {random_flip(x, np.random.default_rng(s))[0, :, 0].tolist()[0] for s in range(20)}
      >>> sorted(outs)
      [0, 2]
    """
    _check_image(image, "random_flip")
    if rng.random() < 0.5:
        return image[:, ::-1]
    return image


def normalize(image: np.ndarray, mean, std, scale: float = 255.0) -> np.ndarray:
    """Per-channel standardisation ``out[..., c] = (x[..., c] / scale − mean[c]) / std[c]``.

    Args:
      image: array whose last axis is the channel axis (or a vector of
        features when ``mean``/``std`` are scalars).
      mean: per-channel means of ``x / scale`` (sequence or scalar).
      std: per-channel standard deviations of ``x / scale``; all > 0.
      scale: the raw value of a full-intensity pixel (255 for uint8 images).

    Returns:
      A float32 array of the same shape.

    Example:
      >>> normalize(np.full((1, 1, 3), 255, np.uint8), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
      array([[[1., 1., 1.]]], dtype=float32)
    """
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    if not np.all(std > 0) or not np.all(np.isfinite(std)):
        raise ValueError(f"std must be > 0 and finite everywhere; got {std.tolist()}.")
    if not np.all(np.isfinite(mean)):
        raise ValueError(f"mean must be finite everywhere; got {mean.tolist()}.")
    if not (isinstance(scale, (int, float, np.number)) and np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0; got {scale!r}.")
    channels = np.shape(image)[-1] if np.ndim(image) else None
    for name, stat in (("mean", mean), ("std", std)):
        if stat.ndim > 1 or (stat.size > 1 and stat.size != channels):
            raise ValueError(
                f"{name} must be a scalar or one value per channel; got {stat.size} values "
                f"for an image of shape {np.shape(image)} ({channels} channels)."
            )
    x = np.asarray(image, np.float32) / np.float32(scale)
    return (x - mean) / std


def cutout(image: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Cutout: zero a ``size × size`` square centred at a uniformly random pixel.

    The centre ``(cy, cx)`` is uniform over the image and the square is
    clipped at the borders (DeVries & Taylor, arXiv 1708.04552), so near an
    edge fewer than ``size²`` pixels are zeroed. Applied after normalisation,
    zero is the dataset's mean colour.

    Args:
      image: ``[H, W, C]`` array.
      rng: the example's generator.
      size: side of the square, ``≥ 1`` (16 for CIFAR-10, 8 for CIFAR-100 in
        the Cutout paper).

    Returns:
      A copy of the image with the square set to zero.

    Example:
      >>> out = cutout(np.ones((8, 8, 1), np.float32), np.random.default_rng(0), size=2)
      >>> int((out == 0).sum()) in (1, 2, 4)
      True
    """
    _check_image(image, "cutout")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"cutout size must be an integer >= 1; got {size!r}.")
    h, w = image.shape[:2]
    cy, cx = rng.integers(0, h), rng.integers(0, w)
    y0, y1 = max(cy - size // 2, 0), min(cy - size // 2 + size, h)
    x0, x1 = max(cx - size // 2, 0), min(cx - size // 2 + size, w)
    out = np.array(image, copy=True)
    out[y0:y1, x0:x1] = 0
    return out
