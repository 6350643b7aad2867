"""Optional dependencies: imported where they are used, with a one-line hint.

The core library (the optimizers, the flatness measures, the theory, the
training loop) needs only jax, flax, optax, chex, orbax-checkpoint, numpy,
ml_collections and tensorflow-datasets with grain and array_record. Datasets
that ship inside other packages, plots and TensorBoard event files are
extras::

    pip install -e '.[data]'          # digits, 5,000 MNIST images, MNIST-1D
    pip install -e '.[plots]'         # figures of `flatjax results`
    pip install -e '.[tensorboard]'   # TensorBoard event files
    pip install -e '.[all]'           # all of the above

(run from the flatjax checkout; ``make demo`` and ``make test`` install them).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Which extra provides each optional top-level module.
EXTRAS = {
    "sklearn": ("data", "scikit-learn"),
    "mlxtend": ("data", "mlxtend"),
    "mnist1d": ("data", "mnist1d"),
    "matplotlib": ("plots", "matplotlib"),
    "tensorboardX": ("tensorboard", "tensorboardX"),
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which extra to install."""


def require(module: str, purpose: str) -> ModuleType:
    """Imports ``module`` (e.g. ``"sklearn.datasets"``) or raises :class:`MissingExtraError`.

    Args:
      module: the dotted module name; its top-level package must be in ``EXTRAS``.
      purpose: what needs it, for the message (e.g. ``"the digits dataset"``).

    Returns:
      The imported module.

    Example:
      >>> from flatjax._extras import require
      >>> require("sklearn.datasets", "the digits dataset").__name__
      'sklearn.datasets'
    """
    top = module.split(".")[0]
    extra, package = EXTRAS[top]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != top:
            raise  # something the package itself imports is missing: not ours to explain
        raise MissingExtraError(
            f"{purpose} needs {package}, which is not installed: from the flatjax checkout run "
            f"pip install -e '.[{extra}]' (or '.[all]')."
        ) from None
