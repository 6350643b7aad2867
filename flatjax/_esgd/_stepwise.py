"""Entropy-SGD in stepwise mode: one ``update`` call is one Langevin step.

``updates`` is the minibatch gradient at the walker x′ and ``params`` the
walker; every L-th call also lands the outer step and moves the params to
the new anchor x. So an unmodified ``TrainState.apply_gradients`` loop runs
Entropy-SGD, with the anchor and the running average in the state; the
steps are those of scan mode (:mod:`flatjax._esgd._core`).

References:
  Chaudhari et al., Entropy-SGD: biasing gradient descent into wide valleys,
  ICLR 2017, arXiv:1611.01838.
  Pittorino et al., Entropic gradient descent algorithms and wide flat minima,
  ICLR 2021, arXiv:2006.07897.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import optax

from flatjax._esgd._core import EntropySGDCore
from flatjax._esgd._hparams import bind, derived_signature, make_core
from flatjax._esgd._precision import where, widen
from flatjax._esgd._state import EntropySGDState
from flatjax._esgd._transform import entropy_sgd
from flatjax._validation import check_same_tree

__all__ = ["entropy_sgd_stepwise", "stepwise_transform"]

# The hyperparameters and defaults of entropy_sgd, without those of its scan.
_SCAN_ONLY = ("unroll", "has_aux", "aux_init")
_SIGNATURE = derived_signature(inspect.signature(entropy_sgd), without=_SCAN_ONLY)


def entropy_sgd_stepwise(*args, **kwargs) -> optax.GradientTransformationExtraArgs:
    """Entropy-SGD, one Langevin step per ``update`` call.

    The same algorithm, hyperparameters and defaults as :func:`entropy_sgd`,
    driven differently. Call: ``update(grads, state, params, *,
    value=None)``, where ``params`` is the walker x′ the loop holds and
    ``grads`` the minibatch gradient at it. Calls 1..L−1 of each outer step
    move the walker by one Langevin step; the L-th call also lands the outer
    step and moves ``params`` to the new anchor x. So an unmodified
    ``flax.training.train_state.TrainState.apply_gradients`` loop runs
    Entropy-SGD, and the update is a pure function of ``(grads, state,
    params)`` that runs inside a ``jax.lax.scan`` (how ``flatjax.training``
    carries BatchNorm statistics in 'walker' mode). Evaluate and checkpoint
    :func:`entropy_sgd_eval_params`, not the params the loop holds. ``value`` (the
    minibatch loss at the walker) is needed only with
    ``calibrate_coupling=True``. The anchor and the average live in the state
    in float32 (or wider), and so does the walker when the params are in a
    lower precision (the params then hold it rounded).

    Args:
      learning_rate, inner_steps, coupling, ...: the arguments of
        :func:`entropy_sgd`, with its defaults, except those of its scan
        (``unroll``, ``has_aux``, ``aux_init``); ``inner_steps`` is the number
        of ``update`` calls per outer step.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is an
      :class:`EntropySGDState` (it holds x, μ and the inner optimizer state).

    Example:
      >>> import jax.numpy as jnp, optax, flatjax
      >>> opt = flatjax.entropy_sgd_stepwise(1.0, inner_steps=2, coupling=1.0)
      >>> walker = jnp.ones(2)
      >>> state = opt.init(walker)
      >>> for _ in range(2):                      # L = 2 calls: one outer step
      ...     updates, state = opt.update(2.0 * walker, state, walker)
      ...     walker = optax.apply_updates(walker, updates)
      >>> int(state.count), bool(jnp.all(flatjax.entropy_sgd_eval_params(state, walker) < 1.0))
      (1, True)

    References:
      Chaudhari et al., ICLR 2017, arXiv:1611.01838;
      Pittorino et al., ICLR 2021, arXiv:2006.07897.
    """
    return stepwise_transform(make_core(bind(_SIGNATURE, "entropy_sgd_stepwise", args, kwargs)))


entropy_sgd_stepwise.__signature__ = _SIGNATURE


def stepwise_transform(core: EntropySGDCore) -> optax.GradientTransformationExtraArgs:
    def init_fn(params):
        return core.init_state(params, stepwise=True)

    def update_fn(updates, state, params=None, *, value=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("entropy_sgd_stepwise's update needs params (the walker x′).")
        if core.calibrate and value is None:
            raise ValueError(
                "calibrate_coupling=True needs the minibatch loss: "
                "update(grads, state, params, value=loss)."
            )
        check_same_tree(updates, params, "updates")
        # The first inner step starts exactly at the anchor; later ones at the
        # float32 walker (kept in the state for low-precision params).
        current = widen(params) if state.walker is None else state.walker
        walker = where(state.inner_count == 0, state.anchor, current)
        walker, average, inner_state, key = core.langevin_step(
            updates, walker, state.anchor, state.average, state.inner_state, state.key,
            state.coupling,
        )
        loss = jnp.asarray(value, jnp.float32) if core.calibrate else state.loss

        landing = state.inner_count == core.inner_steps - 1

        def land(_):
            # The L-th call: the outer step moves x; walker, average and the
            # inner optimizer restart at the new anchor.
            anchor_updates, outer_state, scale, (requested, applied) = core.outer_step(
                state, state.anchor, state.anchor, average, walker, loss
            )
            new_anchor = optax.apply_updates(state.anchor, anchor_updates)
            return (state.count + 1, jnp.zeros((), jnp.int32), applied, requested, scale,
                    new_anchor, new_anchor, new_anchor,
                    core.inner_optimizer.init(new_anchor), outer_state)

        def stay(_):
            return (state.count, state.inner_count + 1, state.coupling,
                    state.requested_coupling, state.coupling_scale, state.anchor, average,
                    walker, inner_state, state.outer_state)

        # Only the landing call pays for the outer step (a cond, not a select).
        (count, inner_count, coupling, requested, scale, anchor, average, new_walker,
         inner_state, outer_state) = jax.lax.cond(landing, land, stay, None)
        new_state = EntropySGDState(
            count=count.astype(jnp.int32),
            inner_count=inner_count.astype(jnp.int32),
            key=key,
            coupling=coupling,
            requested_coupling=requested,
            coupling_scale=scale,
            loss=loss,
            anchor=anchor,
            average=average,
            walker=None if state.walker is None else new_walker,
            inner_state=inner_state,
            outer_state=outer_state,
        )
        step = jax.tree.map(lambda n, p: (n - p).astype(p.dtype), new_walker, params)
        return step, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
