r"""Replicated-SGD as an Optax transform: y replicas, one base optimizer each, one centre.

Each replica a minimises L_{batch a}(wᵃ) + (γ/2)‖wᵃ − c‖² with the centre
c = mean_b wᵇ (or an explicit centre of its own); the coupling's gradient
γ(wᵃ − c) enters the base optimizer (explicit rule) or is applied as its
exact proximal step after it. The base optimizer is vmapped over the replica
axis, so each replica keeps its own optimizer state; the applied γ is
clamped where the coupling step would be unstable (:mod:`flatjax._stability`).

References:
  Pittorino et al., Entropic gradient descent algorithms and wide flat minima,
  ICLR 2021, arXiv:2006.07897.
  Baldassi et al., Shaping the learning landscape in neural networks around
  wide flat minima, PNAS 117(1):161, 2020, arXiv:1905.07833.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import jax
import jax.numpy as jnp
import optax

from flatjax import _stability
from flatjax._rsgd import _axis
from flatjax._rsgd._state import ReplicateState
from flatjax._validation import (
    check_choice,
    check_float_leaves,
    check_int,
    check_interval,
    check_nonnegative_or_schedule,
    check_optimizer,
    check_replica_axis,
    check_same_tree,
    checkable,
    is_traced,
)

__all__ = ["replicate", "replicated_sgd"]

_COUPLING_STEPS = ("proximal", "explicit")


def _value_at(hparam, count):
    """A float or schedule hyperparameter at step ``count``, float32."""
    value = hparam(count) if callable(hparam) else hparam
    return jnp.asarray(value, jnp.float32)


def replicate(
    base_optimizer: optax.GradientTransformation,
    num_replicas: int,
    coupling: float | optax.Schedule,
    *,
    axis_name: Hashable | None = None,
    coupling_step: str = "explicit",
    max_coupling: float | None = None,
    clamp_fraction: float = 0.5,
    center_optimizer: optax.GradientTransformation | None = None,
    learning_rate: float | optax.Schedule | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Replicated-SGD: run ``base_optimizer`` on y elastically coupled replicas.

    Each replica a minimises L_{batch a}(wᵃ) + (γ/2)‖wᵃ − c‖², c the centre.
    ``update(grads, state, params)`` takes ``grads`` = ∇L_{batch a}(wᵃ) and
    ``params`` = wᵃ stacked on a leading axis of size y (``num_replicas``),
    and returns stacked updates. Two rules, two different algorithms:

    - ``coupling_step="explicit"`` (default; the rule of Pittorino et al.'s
      code): the base optimizer steps on gᵃ + γ(wᵃ − c), c = mean_b wᵇ. The
      coupling enters the momentum, so Nesterov 0.9 amplifies the pull about
      10× over plain SGD; γ values from the authors carry over (γ = 2g, below).
    - ``coupling_step="proximal"``: the base optimizer steps on the data
      gradient alone, vᵃ = wᵃ + u_base(gᵃ), then the coupling is applied as
      its exact proximal (implicit Euler) step wᵃ ← c̄ + (vᵃ − c̄)/(1 + ηγ),
      c̄ = mean_b vᵇ: a contraction for every γ ≥ 0, but outside the
      momentum, so at the same γ the replicas are coupled about 10× more
      weakly than by the explicit rule under Nesterov 0.9; its γ has a scale
      of its own.

    Stability (never silent): on the coupling alone, wᵃ − c follows a linear
    recurrence that is stable only while ηγ < 2 (SGD), 2(1 + β) (heavy ball)
    or 2(1 + β)/(1 + 2β) (Nesterov; 1.357 for β = 0.9). η, β and the kind of
    momentum are read from ``base_optimizer`` itself (``flatjax`` probes it
    on a scalar; schedules are read at every step), and the applied γ is

        γ = min(γ(t), max_coupling, clamp_fraction · γ_stable(t))

    with γ_stable = bound/η (explicit rule). With an explicit centre moved by
    ``center_optimizer`` (rate η_c, bound b_c) the centre's own step η_c γ y
    must be stable too: γ_stable = 1/(η/b + η_c y/b_c), exact for plain SGD.
    The default ``clamp_fraction`` 0.5 makes plain SGD land each step on the
    centre. ``state.coupling`` is the applied γ and ``state.requested_coupling``
    the schedule's, so a clamp shows in the logs (``flatjax.training`` logs
    both and warns). A base optimizer that is not SGD-type (Adam: its steps
    are bounded by its learning rate) is clamped only at ``max_coupling``.

    Centre: by default c is the mean of the replicas (a constant in the
    gradient; Σ_a (wᵃ − c) = 0 makes that exact). With ``center_optimizer``
    the centre is a variable of its own kept in ``state.center`` (initialised
    at the mean), moved by the coupling gradient γ Σ_a (c − wᵃ) through that
    optimizer (the authors' ``use_center``, whose SGD is the replicas' own),
    and the replicas are pulled towards it. Evaluate
    ``replicate_eval_params(state, params)``.

    The authors' names (SacredDNN ``robust_dnn.py``, ``RobustNet``): their loss
    is (1/y) Σ_a L_a + g · mean_a ‖wᵃ − c‖² (no ½) with the learning rate
    multiplied by y, so per replica it is this rule with γ = 2g, the same η,
    and weight decay y·wd (PyTorch's decay is scaled by the lr, hence by y):
    build ``base_optimizer`` as ``chain(add_decayed_weights(y * wd), sgd(lr,
    0.9, nesterov=True))``. Their balanced g₀ gives γ₀ = 2g₀
    (:func:`balanced_coupling` returns γ₀); ``grate``/``gmax`` (total growth
    factor) are ``flatjax.exponential_coupling(γ₀, steps, factor=gmax,
    steps_per_update=steps_per_epoch)``.

    Devices: with ``axis_name`` the function must run where that axis is
    bound (``shard_map``/``pmap``); each device holds y / n replicas on the
    leading axis and c is a ``pmean``; the state's ``base_state`` is sharded
    like the params and its other fields are replicated (shard_map spec
    ``ReplicateState(P(), P(), P(), P(), P(axis), P(), P())``). Where the axis
    is not bound (e.g. ``init`` outside ``shard_map``) all y replicas must be
    present. Under a sharded ``jit`` use ``axis_name=None``.

    Cost: one update costs y gradient evaluations (one per replica, each on
    its own minibatch), so one epoch of every replica is y SGD epochs.

    Args:
      base_optimizer: Optax transform run independently on each replica
        (e.g. ``optax.sgd(0.1, momentum=0.9, nesterov=True)`` chained with
        weight decay). Extra keyword arguments of ``update`` are forwarded to
        it unmapped.
      num_replicas: y >= 1.
      coupling: γ >= 0, a float or an Optax schedule ``step -> γ`` evaluated
        at ``state.count``. Coupling values from the authors' code are g = γ/2:
        pass γ = 2g.
      axis_name: named mesh/pmap axis the replicas are spread over, or None.
      coupling_step: ``"explicit"`` (default) or ``"proximal"``, see above.
      max_coupling: optional absolute bound on the applied γ (> 0).
      clamp_fraction: in (0, 1], the fraction of the stability bound γ may
        reach.
      center_optimizer: optimizer of an explicit centre, or None for the mean.
      learning_rate: not needed for SGD-type base optimizers (η is read from
        them; a value given here must agree with it, else ``ValueError``).
        Required only by the proximal step of a base optimizer that is not
        SGD-type.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state
      `ReplicateState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax, flatjax
      >>> params = jnp.array([[0.0, 2.0], [2.0, 0.0]])  # y = 2 replicas, c = (1, 1)
      >>> opt = flatjax.replicate(optax.sgd(0.25), 2, coupling=1.0)
      >>> state = opt.init(params)
      >>> updates, state = opt.update(jnp.zeros_like(params), state, params)
      >>> optax.apply_updates(params, updates)  # w − c shrinks by 1 − ηγ = 0.75
      Array([[0.25, 1.75],
             [1.75, 0.25]], dtype=float32)

    References:
      Pittorino et al., ICLR 2021, arXiv:2006.07897; Baldassi et al., PNAS
      2020, arXiv:1905.07833.
    """
    check_optimizer("base_optimizer", base_optimizer)
    check_int("num_replicas", num_replicas, minimum=1, static=True)
    num_replicas = int(num_replicas)
    check_nonnegative_or_schedule("coupling", coupling)
    if learning_rate is not None:
        check_nonnegative_or_schedule("learning_rate", learning_rate)
    check_choice("coupling_step", coupling_step, _COUPLING_STEPS)
    if max_coupling is not None:
        check_nonnegative_or_schedule("max_coupling", max_coupling, positive=True)
    check_interval("clamp_fraction", checkable(clamp_fraction, 0.5), "(0, 1]")
    check_optimizer("center_optimizer", center_optimizer, optional=True)
    base = optax.with_extra_args_support(base_optimizer)
    base_usable = _stability.can_measure(base_optimizer)
    probe = _stability.probe_sgd(base_optimizer)
    if learning_rate is not None and probe is not None and not is_traced(learning_rate):
        given = float(_value_at(learning_rate, probe.count))
        if not math.isclose(given, probe.learning_rate, rel_tol=1e-4):
            raise ValueError(
                f"learning_rate={given!r} (at step {probe.count}) does not match the base "
                f"optimizer's own learning rate {probe.learning_rate:.6g}; drop learning_rate=, "
                "replicate reads it from base_optimizer."
            )
    if (
        coupling_step == "proximal"
        and learning_rate is None
        and _stability.sgd_type(base_optimizer) is False
    ):
        raise ValueError(
            'coupling_step="proximal" needs the base optimizer\'s learning rate, and this '
            "base optimizer is not SGD-type (its rate cannot be read from it); pass "
            'learning_rate=..., or use coupling_step="explicit".'
        )
    center_usable = center_optimizer is not None and _stability.can_measure(center_optimizer)

    def eta_at(count):
        if learning_rate is not None:
            return _value_at(learning_rate, count)
        return _stability.learning_rate_at(base_optimizer, count)

    def stable_gamma(count):
        """clamp_fraction × the largest stable γ at step ``count`` (∞ when unbounded).

        The rates add: 1/γ_stable = η/b + η_c y/b_c (exact for plain SGD).
        """
        slowness = jnp.zeros((), jnp.float32)
        if coupling_step == "explicit":
            gamma_r = _stability.stable_coupling(base_optimizer, count, usable=base_usable)
            slowness = slowness + 1.0 / gamma_r
        if center_optimizer is not None:
            gamma_c = _stability.stable_coupling(center_optimizer, count, usable=center_usable)
            slowness = slowness + num_replicas / gamma_c
        return jnp.where(
            slowness > 0, clamp_fraction / jnp.where(slowness > 0, slowness, 1.0), jnp.inf
        )

    def couplings(count):
        requested = _value_at(coupling, count)
        return requested, _stability.clamp_coupling(requested, stable_gamma(count), max_coupling)

    def init_fn(params):
        if not jax.tree.leaves(params):
            # A tree without arrays (optax.tree.map_params' placeholder): the
            # state's structure, with every params-shaped field that tree.
            count = jnp.zeros([], jnp.int32)
            requested, applied = couplings(count)
            with_center = center_optimizer is not None
            return ReplicateState(
                count=count, coupling=applied, requested_coupling=requested,
                center_distance=jnp.zeros((), jnp.float32), base_state=base.init(params),
                center=params if with_center else optax.EmptyState(),
                center_state=center_optimizer.init(params) if with_center else optax.EmptyState(),
            )
        check_replica_axis(params, _axis._local_size(num_replicas, axis_name), "params")
        check_float_leaves(params, "replicate")
        mean = _axis._tree_mean(params, axis_name)
        if center_optimizer is None:
            center, center_state = optax.EmptyState(), optax.EmptyState()
            reference = mean
        else:
            center, center_state = mean, center_optimizer.init(mean)
            reference = center
        diff = jax.tree.map(lambda w, c: w - c, params, reference)
        count = jnp.zeros([], jnp.int32)
        requested, applied = couplings(count)
        return ReplicateState(
            count=count,
            coupling=applied,
            requested_coupling=requested,
            center_distance=_axis._mean_sq_distance(diff, axis_name),
            base_state=jax.vmap(base.init)(params),
            center=center,
            center_state=center_state,
        )

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("replicate needs params: call update(grads, state, params).")
        local = _axis._local_size(num_replicas, axis_name)
        check_replica_axis(params, local, "params")
        check_replica_axis(updates, local, "updates")
        check_same_tree(updates, params, "updates")
        requested, gamma = couplings(state.count)
        center = _axis._tree_mean(params, axis_name) if center_optimizer is None else state.center
        diff = jax.tree.map(lambda w, c: w - c, params, center)

        def base_update(g, s, p):
            return base.update(g, s, p, **extra_args)

        if coupling_step == "explicit":
            grads = jax.tree.map(lambda g, d: g + (gamma * d).astype(g.dtype), updates, diff)
            new_updates, base_state = jax.vmap(base_update)(grads, state.base_state, params)
        else:
            data_updates, base_state = jax.vmap(base_update)(updates, state.base_state, params)
            moved = optax.apply_updates(params, data_updates)
            anchor = _axis._tree_mean(moved, axis_name) if center_optimizer is None else center
            shrink = 1.0 / (1.0 + eta_at(state.count) * gamma)
            new_updates = jax.tree.map(
                lambda v, a, w: (a + (v - a) * shrink - w).astype(w.dtype), moved, anchor, params
            )

        new_center, center_state = state.center, state.center_state
        if center_optimizer is not None:
            # γ Σ_a (c − wᵃ) = γ y (c − mean_a wᵃ), the sum running over all devices.
            replica_mean = _axis._tree_mean(params, axis_name)
            center_grad = jax.tree.map(
                lambda c, m: (gamma * num_replicas * (c - m)).astype(c.dtype), center, replica_mean
            )
            center_updates, center_state = center_optimizer.update(
                center_grad, state.center_state, center
            )
            new_center = optax.apply_updates(center, center_updates)

        new_state = ReplicateState(
            count=optax.safe_int32_increment(state.count),
            coupling=gamma,
            requested_coupling=requested,
            center_distance=_axis._mean_sq_distance(diff, axis_name),
            base_state=base_state,
            center=new_center,
            center_state=center_state,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def replicated_sgd(
    learning_rate: float | optax.Schedule,
    num_replicas: int,
    coupling: float | optax.Schedule,
    *,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    axis_name: Hashable | None = None,
    coupling_step: str = "explicit",
    max_coupling: float | None = None,
    clamp_fraction: float = 0.5,
    explicit_center: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Replicated-SGD with SGD replicas, from one learning rate: the authors' optimizer.

    ``replicate(chain(add_decayed_weights(λ), sgd(η, β, nesterov)), y, γ)``:
    each replica steps on ∇L_{batch a}(wᵃ) + γ (wᵃ − c) + λ wᵃ with SGD of rate
    η and momentum β (Nesterov by default), the coupling inside the momentum.
    To reproduce the authors' runs (SacredDNN ``robust_dnn.py``, lr × y and
    PyTorch weight decay wd) pass their lr, ``weight_decay = y · wd`` and
    γ = 2g. With ``explicit_center`` the centre is a variable moved by the
    same SGD (their ``use_center``). See :func:`replicate` for the coupling,
    the stability clamp and the devices.

    Args:
      learning_rate: η, a float or an Optax schedule.
      num_replicas: y >= 1.
      coupling: γ >= 0, a float or an Optax schedule.
      momentum: β in [0, 1).
      nesterov: Nesterov momentum (the authors' choice).
      weight_decay: λ >= 0, each replica's weight decay.
      axis_name, coupling_step, max_coupling, clamp_fraction: as in
        :func:`replicate`.
      explicit_center: make the centre a variable moved by the same SGD.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state `ReplicateState`.

    Example:
      >>> import jax.numpy as jnp, optax, flatjax
      >>> opt = flatjax.replicated_sgd(0.1, 2, coupling=1.0, weight_decay=1e-3)
      >>> params = jnp.array([[0.0, 2.0], [2.0, 0.0]])
      >>> updates, state = opt.update(jnp.zeros_like(params), opt.init(params), params)
      >>> float(state.coupling)
      1.0
    """
    check_interval("momentum", checkable(momentum, 0.0))
    check_nonnegative_or_schedule("weight_decay", weight_decay)
    check_nonnegative_or_schedule(
        "learning_rate", learning_rate, positive=not callable(learning_rate)
    )

    def sgd():
        return optax.chain(
            optax.add_decayed_weights(weight_decay),
            optax.sgd(learning_rate, momentum=momentum, nesterov=bool(nesterov)),
        )

    return replicate(
        sgd(), num_replicas, coupling, axis_name=axis_name, coupling_step=coupling_step,
        max_coupling=max_coupling, clamp_fraction=clamp_fraction,
        center_optimizer=sgd() if explicit_center else None,
    )
