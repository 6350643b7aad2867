"""Flatness measures: local energy, local entropy, Hessian spectra, sharpness.

All measures are pure functions of a loss (or of a model's apply function,
its variables and a dataset) and of the parameters; none of them changes the
network. The local energy is the measure of Pittorino et al. (ICLR 2021,
arXiv 2006.07897) that correlates with test error; the local entropy is the
quantity Entropy-SGD and Replicated-SGD maximise (Chaudhari et al. 2017,
arXiv 1611.01838; Baldassi et al. 2020, PNAS 117(1):161); Hessian quantities
and SAM sharpness (Foret et al. 2021, arXiv 2010.01412) are the usual
companions.

Conventions:

- A model is evaluated through ``apply_fn(variables, x) -> logits`` in EVAL
  mode, BatchNorm statistics frozen: pass e.g.
  ``lambda v, x: model.apply(v, x, train=False)``. Only
  ``variables["params"]`` is ever perturbed; ``batch_stats`` and any other
  collection are passed through untouched.
- A dataset is ``(x, y)`` (or ``{"image": x, "label": y}``) with integer
  class labels ``y`` of shape ``[n]``. It is streamed through the network in
  equal batches (``lax.scan``), the last one padded with masked examples, so
  every example is counted exactly once.

Modules: ``_data`` (:func:`dataset_loss`), ``_local_energy``, ``_hessian``
(:func:`hvp`, top eigenvalue, trace), ``_sharpness``, ``_local_entropy``;
``_checks``, ``_progress`` and ``_chunks`` hold what they share. The names
are re-exported by :mod:`flatjax`.
"""

from flatjax.flatness._data import dataset_loss
from flatjax.flatness._hessian import (
    HessianEigen,
    HessianTrace,
    hessian_top_eigenvalue,
    hessian_trace,
    hvp,
)
from flatjax.flatness._local_energy import LocalEnergy, local_energy, local_energy_fn
from flatjax.flatness._local_entropy import LocalEntropy, local_entropy
from flatjax.flatness._sharpness import sam_sharpness

__all__ = [
    "LocalEnergy",
    "LocalEntropy",
    "HessianEigen",
    "HessianTrace",
    "dataset_loss",
    "local_energy",
    "local_energy_fn",
    "local_entropy",
    "hvp",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "sam_sharpness",
]
