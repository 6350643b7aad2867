r"""Gaussian mixture classification: the analytic part of Pittorino et al.

The data model (the normalisation is ours; the paper's is unconfirmed):
P = αN points in dimension N, labels y = ±1 with P(y = +1) = ρ, inputs

.. math::

  x = y\,v + \sqrt{Δ}\,z, \qquad z \sim N(0, I_N), \qquad ‖v‖ = 1,

with v drawn uniformly on the unit sphere. A linear classifier
ŷ = sign(w·x + b) has an exact test error (``generalization_error``)

.. math::

  ε_g(w, b) = ρ\,H\Big(\frac{w·v + b}{\sqrt{Δ}\,‖w‖}\Big)
            + (1 − ρ)\,H\Big(\frac{w·v − b}{\sqrt{Δ}\,‖w‖}\Big),
  \qquad H(u) = \tfrac12 \operatorname{erfc}(u / \sqrt2),

so no test set is ever sampled: the "test error" of every estimator is this
formula. It depends on (w, b) only up to a positive rescaling.

Bayes-optimal reference (``bayes_optimal_error``). The labels being known,
the likelihood of v is ∝ exp(v·Σ_μ y^μ x^μ / Δ) on the sphere, so the
posterior depends on the data only through the Hebbian vector
S = Σ_μ y^μ x^μ, and the Bayes predictor is a threshold on x·S. As N → ∞ at
fixed α the overlap of the Hebbian direction with v concentrates on
m = √(α / (α + Δ)); the best threshold for a unit direction of overlap m is

.. math::

  b^* = \frac{Δ}{2m} \log\frac{ρ}{1 − ρ},

and ε_BO(α, Δ, ρ) = ρ H((m + b*)/√Δ) + (1 − ρ) H((m − b*)/√Δ), which for
ρ = ½ is the closed form ε_BO = H(√(α / (Δ(α + Δ)))). ``bayes_optimal_classifier``
is its finite-N, data-only version (Hebbian direction, plug-in threshold with
the asymptotic overlap); it knows Δ and ρ, as a Bayes-optimal estimator does.

Estimators. ``erm`` minimises (1/P) Σ_μ ℓ(y^μ(w·x^μ + b)) + (λ/2)‖w‖² for
the square, logistic and hinge losses (the bias is never penalised);
``select_ridge`` chooses λ on a held-out split of the training data;
``max_margin`` is the hard-margin SVM. The flatness-maximising estimators
train the same linear model with flatjax's optimizers: ``replicated_sgd_fit``
(coupled replicas, the centre is returned) and ``entropy_sgd_fit``, either on
a differentiable loss or on the smoothed error-counting loss
``smoothed_error``, which is the training error averaged over Gaussian noise
on the normalised classifier, i.e. a local energy of the classifier itself.
``fit_bias`` fits the bias of a given direction apart (two-Gaussian threshold),
``held_out_bias`` measures it on a held-out split.

Fixed norm and fixed distance (Baldassi et al. 2020). ``fixed_norm_mse`` is
the square-loss minimiser on the sphere ‖w‖ = R and
``fixed_distance_replicated_mse`` its replicas held at overlap q with a
centre. On the classifier itself (norm-free), ``fixed_distance_local_energy``
is the mean training error of the shell of unit classifiers at overlap q
with a centre, ``fixed_distance_error_fit`` the centre that minimises it
(the flattest at that distance) and ``fixed_distance_replicated_error`` the
replicated scheme with y optimised replicas on the smoothed error count.
``classifier_local_energy`` measures flatness under weight noise.
``mixture_demo`` pairs the Bayes plug-in, validated ridge ERM and the shell
centre on a few training sets and writes a table and a figure.

Randomness: every function that samples takes a ``jax.random`` key.

References:
  Baldassi, Malatesta, Negri, Zecchina, Wide flat minima and optimal
  generalization in classifying high-dimensional Gaussian mixtures, J. Stat.
  Mech. 2020, arXiv:2010.14761.
  Pittorino, Lucibello, Feinauer, Perugini, Baldassi, Demyanenko, Zecchina,
  Entropic gradient descent algorithms and wide flat minima, ICLR 2021,
  arXiv:2006.07897.
  Mignacco, Krzakala, Lu, Urbani, Zdeborová, The role of regularization in
  classification of high-dimensional noisy Gaussian mixture, ICML 2020,
  arXiv:2002.11544.
"""

from flatjax.theory._demo import mixture_demo
from flatjax.theory._erm import (
    LOSSES,
    erm,
    fit_bias,
    held_out_bias,
    margin_loss,
    max_margin,
    select_ridge,
    smoothed_error,
    train_validation_split,
)
from flatjax.theory._error_counting import (
    fixed_distance_error_fit,
    fixed_distance_local_energy,
    fixed_distance_replicated_error,
)
from flatjax.theory._fixed_norm import fixed_distance_replicated_mse, fixed_norm_mse
from flatjax.theory._flat import entropy_sgd_fit, replicated_sgd_fit
from flatjax.theory._local_energy import classifier_local_energy
from flatjax.theory._mixture import (
    Mixture,
    bayes_optimal_bias,
    bayes_optimal_classifier,
    bayes_optimal_error,
    bayes_optimal_overlap,
    gaussian_mixture,
    gaussian_tail,
    generalization_error,
    hebbian,
    sample_mixture,
    teacher_direction,
    training_error,
)

__all__ = [
    "Mixture",
    "gaussian_tail",
    "teacher_direction",
    "sample_mixture",
    "gaussian_mixture",
    "generalization_error",
    "training_error",
    "bayes_optimal_overlap",
    "bayes_optimal_bias",
    "bayes_optimal_error",
    "hebbian",
    "bayes_optimal_classifier",
    "LOSSES",
    "margin_loss",
    "smoothed_error",
    "erm",
    "max_margin",
    "train_validation_split",
    "select_ridge",
    "fit_bias",
    "held_out_bias",
    "classifier_local_energy",
    "replicated_sgd_fit",
    "entropy_sgd_fit",
    "fixed_norm_mse",
    "fixed_distance_replicated_mse",
    "fixed_distance_local_energy",
    "fixed_distance_error_fit",
    "fixed_distance_replicated_error",
    "mixture_demo",
]
