r"""Entropy-SGD as Optax gradient transformations.

Entropy-SGD climbs the local entropy F(x; γ) = log ∫ dx′ exp(−L(x′) − γ/2 ‖x′ − x‖²)
of the anchor x. Its gradient, γ(⟨x′⟩ − x), is estimated with a short SGLD
chain of L steps (the walker x′) started at x and pulled back towards it.
One outer step, with γ_t the coupling at outer step t:

.. code-block:: text

    x′ ← x ;  μ ← x
    for l = 0 .. L−1:                          # one fresh minibatch per step
        d  ← ∇L_l(x′) + γ_t (x′ − x)            # data gradient + elastic pull
        x′ ← x′ + inner_optimizer(d) + ε √(2η′) ξ,   ξ: i.i.d., mean 0, cov I
        μ  ← α μ + (1 − α) x′                  # α weighs the OLD average
    x ← x + γ_t · outer_optimizer(x − μ)       # γ(x − μ) is the gradient of −F

The default inner optimizer is ``chain(add_decayed_weights(λ′), sgd(η′, β′,
nesterov=True))``; the default outer optimizer is SGD with Nesterov momentum
0.9 (and weight decay λ inside the γ-scaled step, as in the authors' code).
Both are ordinary Optax transforms and can be replaced. These are the rules
of Pittorino et al.'s code; :func:`entropy_sgd` maps its names (and
Chaudhari et al.'s) onto flatjax's.

Two drivers share ONE Langevin-step function and ONE outer-step function, so
they compute the same thing:

* :func:`entropy_sgd` (scan mode): one ``update`` call is one outer step; the
  L inner steps run as a ``jax.lax.scan`` calling ``grad_fn(walker, i)``.
* :func:`entropy_sgd_stepwise`: one ``update`` call is one Langevin step
  (``updates`` = gradient at the walker, ``params`` = walker); every L-th call
  lands the outer step. An unmodified ``TrainState.apply_gradients`` loop runs
  it; :func:`entropy_sgd_eval_params` returns x for evaluation and checkpoints.

Cost: one outer step costs L gradient evaluations; the state's ``count``
counts outer steps, not gradient evaluations.

References:
  Chaudhari et al., Entropy-SGD: biasing gradient descent into wide valleys,
  ICLR 2017, arXiv:1611.01838.
  Pittorino et al., Entropic gradient descent algorithms and wide flat minima,
  ICLR 2021, arXiv:2006.07897.
"""

from flatjax._esgd._state import (
    EntropySGDState,
    entropy_sgd_aux,
    entropy_sgd_coupling,
    entropy_sgd_eval_params,
)
from flatjax._esgd._stepwise import entropy_sgd_stepwise
from flatjax._esgd._transform import entropy_sgd, scale_by_entropy_sgd

__all__ = [
    "EntropySGDState",
    "entropy_sgd",
    "entropy_sgd_stepwise",
    "scale_by_entropy_sgd",
    "entropy_sgd_eval_params",
    "entropy_sgd_coupling",
    "entropy_sgd_aux",
]
