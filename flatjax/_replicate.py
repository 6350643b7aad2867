"""Replicated-SGD: an ensemble of replicas coupled elastically through a centre.

y replicas w¹..wʸ of a network are trained side by side. Each minimises its
own minibatch loss plus an elastic coupling to the centre c:

    L_a(wᵃ) = L_{batch a}(wᵃ) + (γ/2) ‖wᵃ − c‖²,      c = (1/y) Σ_b wᵇ

so each replica's gradient is ∇L_{batch a}(wᵃ) + γ (wᵃ − c). The centre is
what gets evaluated: one network, with the inference cost of one network.
Raising γ during training ("scoping") pulls the replicas together, so the
centre ends as a minimiser that sits inside a wide flat region.

Replicas live on a leading axis of size y of every parameter leaf. The base
optimizer is vmapped over that axis, so each replica has its own optimizer
state and a transform that looks at the whole tree (a global-norm clip)
never mixes replicas. On one device the centre is a mean over the axis; with
the replicas spread over devices it is the same mean taken as a collective
(``jax.lax.pmean`` over a named axis under ``shard_map``/``pmap``, or the
all-reduce XLA inserts under a sharded ``jit``).

References:
  Pittorino et al., Entropic gradient descent algorithms and wide flat minima,
  ICLR 2021, arXiv:2006.07897.
  Baldassi et al., Shaping the learning landscape in neural networks around
  wide flat minima, PNAS 117(1):161, 2020, arXiv:1905.07833.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from flatjax import _stability
from flatjax._schedules import checkable, is_traced, value_at_zero

__all__ = [
    "ReplicateState",
    "replicate",
    "replicated_sgd",
    "replicate_coupling",
    "init_replicas",
    "replica_center",
    "replicate_eval_params",
    "replica_map",
    "average_batch_stats",
    "recompute_batch_stats",
    "balanced_coupling",
]

_COUPLING_STEPS = ("proximal", "explicit")
_STRATEGIES = ("auto", "vmap", "unroll")


class ReplicateState(NamedTuple):
    """State of the `GradientTransformation` returned by `replicate`.

    Attributes:
      count: int32 scalar, number of updates applied so far (the step t at
        which the coupling and learning-rate schedules are evaluated).
      coupling: float32 scalar, the coupling γ applied by the latest update
        (before the first update: the γ the first update will apply), after
        the stability clamp and ``max_coupling``.
      requested_coupling: float32 scalar, the schedule's γ at the same step;
        larger than ``coupling`` exactly when the clamp engaged.
      center_distance: float32 scalar, mean_a ‖wᵃ − c‖² (summed over all
        leaves) at the parameters the latest update received: a diagnostic
        for logging; growth over steps signals a coupling that overshoots.
      base_state: the base optimizer's state, every leaf with a leading
        replica axis (local size under a named axis).
      center: the explicit centre c (parameters without replica axis) when
        ``center_optimizer`` is given; ``optax.EmptyState()`` when the centre
        is the mean of the replicas.
      center_state: the centre optimizer's state, or ``optax.EmptyState()``.
    """

    count: jax.Array
    coupling: jax.Array
    requested_coupling: jax.Array
    center_distance: jax.Array
    base_state: optax.OptState
    center: Any
    center_state: optax.OptState


# --------------------------------------------------------------------------- helpers


def _is_schedule(x) -> bool:
    return callable(x)


def _check_nonnegative_hparam(name: str, value, *, positive: bool = False) -> None:
    """Checks a float or schedule hyperparameter eagerly (a schedule at step 0).

    Traced values (``optax.inject_hyperparams`` under ``jit``) are left to run.
    """
    at_zero = value_at_zero(value) if _is_schedule(value) else checkable(value, None)
    if at_zero is None:  # traced, or a schedule closing over traced values
        return
    # Strings and bools would pass float(); only numbers (or 0-d arrays) are accepted.
    if isinstance(at_zero, (str, bytes, bool)):
        at_zero = None
    try:
        v = float(at_zero)
    except (TypeError, ValueError):
        raise TypeError(
            f"{name} must be a non-negative float or an Optax schedule step -> float, "
            f"got {value!r}."
        ) from None
    bad = not v > 0 if positive else not v >= 0
    where = " (the schedule's value at step 0)" if _is_schedule(value) else ""
    if bad:
        what = "positive" if positive else ">= 0"
        raise ValueError(f"{name} must be {what}; got {v!r}{where}.")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite; got {v!r}{where}.")


def _bound_axis_size(axis_name) -> int | None:
    """Size of a named axis if it is bound here (inside shard_map/pmap), else None."""
    if axis_name is None:
        return None
    try:
        return int(jax.lax.axis_size(axis_name))
    except NameError:
        return None


def _local_size(num_replicas: int, axis_name) -> int:
    """Leading-axis size of each leaf: y, or y / (size of the named axis)."""
    n = _bound_axis_size(axis_name)
    if n is None:
        return num_replicas
    if num_replicas % n:
        raise ValueError(
            f"num_replicas={num_replicas} is not divisible by the size {n} of the "
            f"named axis {axis_name!r}; each device must hold the same number of replicas."
        )
    return num_replicas // n


def _check_replica_axis(tree, expected: int, what: str) -> None:
    """Raises ValueError naming the leaf whose leading axis is not ``expected``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not leaves:
        raise ValueError(f"{what} has no array leaves.")
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        if not shape or shape[0] != expected:
            found = "a scalar" if not shape else f"leading axis {shape[0]} (shape {shape})"
            raise ValueError(
                f"{what}{jax.tree_util.keystr(path)} has {found}; every leaf needs a "
                f"leading replica axis of size {expected}."
            )


def _check_float_leaves(tree, what: str) -> None:
    """Elastic pulls towards a mean are meaningless on integer leaves: reject them."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(
                f"replicate needs floating-point params; {what}{jax.tree_util.keystr(path)} "
                f"has dtype {jnp.result_type(leaf)}."
            )


def _check_same_tree(updates, params) -> None:
    """updates must match params leaf by leaf: a mismatch would broadcast silently."""
    u_def, p_def = jax.tree.structure(updates), jax.tree.structure(params)
    if u_def != p_def:
        raise ValueError(
            f"updates must have the tree structure of params; got {u_def}, expected {p_def}."
        )
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for path, u, p in zip(paths, jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        if jnp.shape(u) != jnp.shape(p):
            raise ValueError(
                f"updates{jax.tree_util.keystr(path)} has shape {jnp.shape(u)}; the params "
                f"leaf has shape {jnp.shape(p)}."
            )


def _leading_mean(x):
    """Mean over the leading (replica) axis.

    XLA:CPU reduces over a leading axis poorly: for a (3, 784, 300) array
    ``jnp.mean(x, 0)`` took 14–19 ms on this project's 2-core CPU against
    0.3–0.4 ms for the sum of the three slices, with identical results. Other
    backends keep ``jnp.mean``, which also stays a single collective when the
    axis is sharded.
    """
    y = x.shape[0]
    if jax.default_backend() == "cpu" and y <= 16 and not _sharded_leading_axis(x):
        return sum(x[a] for a in range(y)) / y
    return jnp.mean(x, axis=0)


def _sharded_leading_axis(x) -> bool:
    """Whether ``x``'s leading axis is sharded over an Explicit mesh axis.

    Slicing one replica out of such an axis is not defined (a ShardingTypeError);
    the mean is then one collective, ``jnp.mean``.
    """
    try:
        spec = jax.typeof(x).sharding.spec
    except (AttributeError, TypeError):
        return False
    return len(spec) > 0 and spec[0] is not None


def _tree_mean(tree, axis_name):
    """Mean over the leading replica axis, and over ``axis_name`` if bound."""
    mean = jax.tree.map(_leading_mean, tree)
    if _bound_axis_size(axis_name) is not None:
        mean = jax.lax.pmean(mean, axis_name)
    return mean


def _mean_sq_distance(diff, axis_name):
    """mean_a ‖wᵃ − c‖² with ``diff`` = w − c stacked on the replica axis."""
    per_replica = sum(
        jnp.sum(jnp.square(d.astype(jnp.float32)).reshape(d.shape[0], -1), axis=1)
        for d in jax.tree.leaves(diff)
    )
    out = jnp.mean(per_replica)
    if _bound_axis_size(axis_name) is not None:
        out = jax.lax.pmean(out, axis_name)
    return out


def _value_at(hparam, count):
    value = hparam(count) if _is_schedule(hparam) else hparam
    return jnp.asarray(value, jnp.float32)


# --------------------------------------------------------------------------- optimizer


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
    if not isinstance(base_optimizer, optax.GradientTransformation):
        raise TypeError(
            f"base_optimizer must be an optax.GradientTransformation, got {base_optimizer!r}."
        )
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, numbers.Integral):
        raise TypeError(
            f"num_replicas must be an int, got {num_replicas!r} (with "
            "optax.inject_hyperparams, list it in static_args)."
        )
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}.")
    num_replicas = int(num_replicas)
    _check_nonnegative_hparam("coupling", coupling)
    if learning_rate is not None:
        _check_nonnegative_hparam("learning_rate", learning_rate)
    if coupling_step not in _COUPLING_STEPS:
        raise ValueError(f"coupling_step must be one of {_COUPLING_STEPS}, got {coupling_step!r}.")
    if max_coupling is not None:
        _check_nonnegative_hparam("max_coupling", max_coupling, positive=True)
    fraction = checkable(clamp_fraction, 0.5)
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not (
        0 < fraction <= 1
    ):
        raise ValueError(f"clamp_fraction must be a number in (0, 1], got {clamp_fraction!r}.")
    if center_optimizer is not None and not isinstance(
        center_optimizer, optax.GradientTransformation
    ):
        raise TypeError(
            "center_optimizer must be None or an optax.GradientTransformation, "
            f"got {center_optimizer!r}."
        )
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
        _check_replica_axis(params, _local_size(num_replicas, axis_name), "params")
        _check_float_leaves(params, "params")
        mean = _tree_mean(params, axis_name)
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
            center_distance=_mean_sq_distance(diff, axis_name),
            base_state=jax.vmap(base.init)(params),
            center=center,
            center_state=center_state,
        )

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("replicate needs params: call update(grads, state, params).")
        local = _local_size(num_replicas, axis_name)
        _check_replica_axis(params, local, "params")
        _check_replica_axis(updates, local, "updates")
        _check_same_tree(updates, params)
        requested, gamma = couplings(state.count)
        center = _tree_mean(params, axis_name) if center_optimizer is None else state.center
        diff = jax.tree.map(lambda w, c: w - c, params, center)

        def base_update(g, s, p):
            return base.update(g, s, p, **extra_args)

        if coupling_step == "explicit":
            grads = jax.tree.map(lambda g, d: g + (gamma * d).astype(g.dtype), updates, diff)
            new_updates, base_state = jax.vmap(base_update)(grads, state.base_state, params)
        else:
            data_updates, base_state = jax.vmap(base_update)(updates, state.base_state, params)
            moved = optax.apply_updates(params, data_updates)
            anchor = _tree_mean(moved, axis_name) if center_optimizer is None else center
            shrink = 1.0 / (1.0 + eta_at(state.count) * gamma)
            new_updates = jax.tree.map(
                lambda v, a, w: (a + (v - a) * shrink - w).astype(w.dtype), moved, anchor, params
            )

        new_center, center_state = state.center, state.center_state
        if center_optimizer is not None:
            # γ Σ_a (c − wᵃ) = γ y (c − mean_a wᵃ), the sum running over all devices.
            replica_mean = _tree_mean(params, axis_name)
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
            center_distance=_mean_sq_distance(diff, axis_name),
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
    beta = checkable(momentum, 0.0)
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 <= beta < 1:
        raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}.")
    _check_nonnegative_hparam("weight_decay", weight_decay)
    _check_nonnegative_hparam("learning_rate", learning_rate, positive=not callable(learning_rate))

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


def replicate_coupling(state: ReplicateState) -> jax.Array:
    """The coupling γ applied by the latest update, for logging.

    Args:
      state: a `ReplicateState`, or any Optax state containing exactly one
        (``optax.chain``, ``inject_hyperparams``).

    Returns:
      float32 scalar γ (after the explicit step's clamp, if any).

    Example:
      >>> import jax.numpy as jnp, optax, flatjax
      >>> opt = optax.chain(optax.clip(1.0), flatjax.replicate(optax.sgd(0.1), 2, coupling=0.3))
      >>> float(flatjax.replicate_coupling(opt.init(jnp.zeros((2, 3)))))
      0.3...
    """
    return _find_replicate_state(state).coupling


# --------------------------------------------------------------------------- replicas


def init_replicas(init_fn: Callable, key: jax.Array, num_replicas: int, *args, **kwargs):
    """y independently initialised replicas stacked on a leading axis.

    Replica a is ``init_fn(key_a, *args, **kwargs)`` with key_a the a-th of
    ``jax.random.split(key, num_replicas)``; the results are stacked on axis
    0 of every leaf (for a Flax model this stacks params and batch_stats).

    Args:
      init_fn: ``init_fn(key, *args, **kwargs) -> pytree``, e.g. ``model.init``.
      key: PRNG key.
      num_replicas: y >= 1.
      *args: passed to ``init_fn`` unchanged (e.g. a dummy input).
      **kwargs: passed to ``init_fn`` unchanged.

    Returns:
      The pytree of ``init_fn`` with a leading replica axis of size y.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, flatjax
      >>> v = flatjax.init_replicas(nn.Dense(4).init, jax.random.key(0), 3, jnp.ones((1, 2)))
      >>> v["params"]["kernel"].shape
      (3, 2, 4)
    """
    if not callable(init_fn):
        raise TypeError(f"init_fn must be callable, got {init_fn!r}.")
    if isinstance(num_replicas, bool) or not isinstance(num_replicas, numbers.Integral):
        raise TypeError(f"num_replicas must be an int, got {num_replicas!r}.")
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}.")
    keys = jax.random.split(key, int(num_replicas))
    return jax.vmap(lambda k: init_fn(k, *args, **kwargs))(keys)


def replica_center(params, *, axis_name=None):
    """The mean of the replicas, c = (1/y) Σ_a wᵃ.

    Args:
      params: replicated params (leading replica axis on every leaf).
      axis_name: named axis the replicas are spread over (inside
        ``shard_map``/``pmap``), or None.

    Returns:
      The mean's params, without replica axis.

    Example:
      >>> import jax.numpy as jnp, flatjax
      >>> flatjax.replica_center({"w": jnp.array([[1.0, 2.0], [3.0, 6.0]])})
      {'w': Array([2., 4.], dtype=float32)}
    """
    _check_replica_axis(params, _leading_size(params), "params")
    return _tree_mean(params, axis_name)


def _find_replicate_state(state) -> ReplicateState:
    is_rsgd = lambda s: isinstance(s, ReplicateState)  # noqa: E731
    found = [s for s in jax.tree.leaves(state, is_leaf=is_rsgd) if is_rsgd(s)]
    if len(found) != 1:
        raise TypeError(
            "expected an optimizer state containing exactly one ReplicateState (from "
            f"flatjax.replicate), found {len(found)} in a {type(state).__name__}."
        )
    return found[0]


def replicate_eval_params(state, params, *, axis_name=None):
    """The centre c, the network to evaluate and checkpoint.

    The explicit centre when the optimizer has one (``center_optimizer``),
    else the mean of the replicas. ``state`` may be the `ReplicateState` or
    any Optax state containing exactly one (e.g. ``optax.chain``,
    ``inject_hyperparams``). The argument order is optax's
    (``optax.contrib.schedule_free_eval_params(state, params)``).

    Args:
      state: the optimizer state.
      params: replicated params (leading replica axis on every leaf).
      axis_name: named axis the replicas are spread over, or None.

    Returns:
      The centre's params, without replica axis.

    Example:
      >>> import jax.numpy as jnp, optax, flatjax
      >>> opt = flatjax.replicated_sgd(0.1, 2, coupling=1.0)
      >>> params = {"w": jnp.array([[1.0, 2.0], [3.0, 6.0]])}
      >>> flatjax.replicate_eval_params(opt.init(params), params)
      {'w': Array([2., 4.], dtype=float32)}
    """
    found = _find_replicate_state(state)
    if not isinstance(found.center, optax.EmptyState):
        return found.center
    return replica_center(params, axis_name=axis_name)


def _leading_size(tree) -> int:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError("expected a pytree with array leaves, got no leaves.")
    shape = jnp.shape(leaves[0])
    if not shape:
        raise ValueError("every leaf needs a leading replica axis; found a scalar leaf.")
    return shape[0]


def average_batch_stats(batch_stats, *, axis_name=None):
    """The centre's BatchNorm statistics as the mean of the replicas' (authors' choice).

    Running means and variances are averaged over the replica axis. This is
    cheap but not the statistics of the centre network's activations; see
    `recompute_batch_stats` for those.

    Args:
      batch_stats: replicated ``batch_stats`` collection (leading replica axis).
      axis_name: named axis the replicas are spread over, or None.

    Returns:
      ``batch_stats`` without replica axis.

    Example:
      >>> import jax.numpy as jnp, flatjax
      >>> flatjax.average_batch_stats({"bn": {"mean": jnp.array([[0.0], [2.0]])}})
      {'bn': {'mean': Array([1.], dtype=float32)}}
    """
    _check_replica_axis(batch_stats, _leading_size(batch_stats), "batch_stats")
    return _tree_mean(batch_stats, axis_name)


def recompute_batch_stats(apply_fn: Callable, variables, batches: Iterable):
    """Recompute the centre's BatchNorm statistics from forward passes.

    As SWA, Parle and PAPA do for averaged weights: the running statistics
    are reset and re-estimated from training batches with the network in
    training mode. The result is the cumulative average, the exact mean over
    the K batches of each per-batch statistic (what a BatchNorm with
    momentum (k − 1)/k at batch k would hold), independent of the momentum
    the model was built with and of the batches' order.

    How: a BatchNorm update is affine in the old statistic, S' = m S + (1 − m) B
    with B the batch statistic. One pass from S = 0 gives Z = (1 − m) B, one
    pass from S = s gives m s + Z; so the first batch costs two forward passes
    (they reveal m, one momentum per statistics leaf) and every later batch
    one, B = Z / (1 − m). Float32 keeps B to a relative ~1e-7 / (1 − m).

    Args:
      apply_fn: ``apply_fn(variables, batch) -> (output, mutated)`` running
        the model in training mode and returning the updated collections,
        e.g. ``functools.partial(model.apply, train=True,
        mutable=["batch_stats"])``. It is jitted here.
      variables: the centre's variables, ``{"params": ..., "batch_stats": ...}``
        without replica axis (the incoming ``batch_stats`` only give the
        structure).
      batches: iterable of model inputs (at least one), each passed as
        ``batch`` to ``apply_fn``.

    Returns:
      ``variables`` with ``batch_stats`` replaced by the recomputed means.

    Example:
      >>> import functools, jax, jax.numpy as jnp, flax.linen as nn, flatjax
      >>> bn = nn.BatchNorm(use_running_average=False)
      >>> v = bn.init(jax.random.key(0), jnp.zeros((4, 1)))
      >>> apply = functools.partial(bn.apply, mutable=["batch_stats"])
      >>> xs = [jnp.array([[0.0], [2.0]]), jnp.array([[4.0], [4.0]])]
      >>> out = flatjax.recompute_batch_stats(apply, v, xs)
      >>> out["batch_stats"]["mean"], out["batch_stats"]["var"]  # means of (1, 4), (1, 0)
      (Array([2.5], dtype=float32), Array([0.5], dtype=float32))
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable, got {apply_fn!r}.")
    if not isinstance(variables, dict) or "batch_stats" not in variables:
        raise ValueError(
            "variables must be a dict with a 'batch_stats' collection, got "
            f"{type(variables).__name__} with keys "
            f"{list(variables) if isinstance(variables, dict) else '-'}."
        )

    @jax.jit
    def stats_from(stats, batch):
        _, mutated = apply_fn({**variables, "batch_stats": stats}, batch)
        return mutated["batch_stats"]

    template = variables["batch_stats"]
    zeros = jax.tree.map(jnp.zeros_like, template)
    total, decay, k = None, None, 0
    for batch in batches:
        scaled = stats_from(zeros, batch)  # (1 − m) B
        if decay is None:
            # A probe S = s with s ≥ |Z| keeps m's rounding error at a few ulps.
            probe = jax.tree.map(lambda z: 1.0 + jnp.abs(z), scaled)
            decay = jax.tree.map(
                lambda o, z, s: jnp.mean((o - z) / s), stats_from(probe, batch), scaled, probe
            )
            if any(not bool(m < 1.0 - 1e-6) for m in jax.tree.leaves(decay)):
                raise ValueError(
                    "apply_fn does not update batch_stats (momentum 1, or not in training "
                    "mode): pass a function that runs the model with train=True and "
                    'mutable=["batch_stats"].'
                )
            total = jax.tree.map(jnp.zeros_like, template)
        total = jax.tree.map(lambda t, s, m: t + s / (1.0 - m), total, scaled, decay)
        k += 1
    if k == 0:
        raise ValueError("batches is empty; recompute_batch_stats needs at least one batch.")
    return {**variables, "batch_stats": jax.tree.map(lambda t: t / k, total)}


def balanced_coupling(losses, params, *, axis_name=None) -> jax.Array:
    """γ₀ that balances the data term against the coupling at initialisation.

        γ₀ = 2 g₀,     g₀ = mean_a L(wᵃ) / mean_a ‖wᵃ − c‖²,     c = mean_a wᵃ

    the authors' rule (Pittorino et al. 2021, SacredDNN ``robust_dnn.py`` with
    ``g=None``): their coupling is written g‖w − c‖² (no ½) and g₀ makes it
    equal, on average, to the data loss. In flatjax's (γ/2)‖w − c‖² that is
    γ₀ = 2g₀. The authors measure L as the mean training loss over the whole
    training set with the networks in evaluation mode, before training; pass
    those per-replica means as ``losses``.

    Args:
      losses: per-replica losses, shape (y,) (local y under ``axis_name``).
      params: replicated params (leading replica axis of the same size).
      axis_name: named axis the replicas are spread over, or None.

    Returns:
      float32 scalar γ₀ (inf if all replicas coincide).

    Example:
      >>> import jax.numpy as jnp, flatjax
      >>> params = jnp.array([[0.0, 0.0], [2.0, 0.0]])  # ‖wᵃ − c‖² = 1 for both
      >>> float(flatjax.balanced_coupling(jnp.array([1.0, 3.0]), params))  # 2 · 2 / 1
      4.0
    """
    losses = jnp.asarray(losses)
    if losses.ndim != 1:
        raise ValueError(f"losses must have shape (num_replicas,), got shape {losses.shape}.")
    y_local = losses.shape[0]
    _check_replica_axis(params, y_local, "params")
    if y_local == 1 and _bound_axis_size(axis_name) is None:
        raise ValueError("balanced_coupling needs y >= 2 replicas: with one, ‖w − c‖² = 0.")
    center = _tree_mean(params, axis_name)
    diff = jax.tree.map(lambda w, c: w - c, params, center)
    mean_loss = jnp.mean(losses.astype(jnp.float32))
    if _bound_axis_size(axis_name) is not None:
        mean_loss = jax.lax.pmean(mean_loss, axis_name)
    distance = _mean_sq_distance(diff, axis_name)
    # Coinciding replicas give inf (documented), also when the losses are 0 (not 0/0 = NaN).
    ratio = 2.0 * mean_loss / jnp.where(distance > 0, distance, 1.0)
    return jnp.where(distance > 0, ratio, jnp.inf)


# --------------------------------------------------------------------------- execution


def replica_map(
    fn: Callable,
    *,
    strategy: str = "auto",
    in_axes: int | None | Sequence = 0,
    spmd_axis_name: Hashable | None = None,
):
    """Map a per-replica function over the leading replica axis of its arguments.

    ``replica_map(fn)(*args)[a] = fn(*args_a)`` where ``args_a`` takes index a
    of the leading axis of every mapped argument (``in_axes`` 0) and passes
    unmapped ones (``in_axes`` None) whole; outputs are stacked on axis 0.
    Typical use: ``replica_map(jax.value_and_grad(loss))(params, batches)``.

    Strategies (the forward/backward pass is the expensive part of a step):

    - ``"vmap"``: ``jax.vmap``; one batched program, the fast choice on
      GPU/TPU where batched matmuls and convolutions fill the device.
    - ``"unroll"``: a Python loop over the y replicas traced into the
      caller's ``jit`` and stacked. XLA:CPU batches convolutions poorly: on
      this project's 2-core CPU a vmapped LeNet-5 step took 2.0x the time of
      y sequential steps, the unrolled one 0.67x. Compile time grows with y.
    - ``"auto"``: ``"unroll"`` when JAX's default backend is CPU and y <= 8,
      ``"vmap"`` otherwise (decided when the mapped function is called; the
      unrolled program's compile time grows by about 7 s per LeNet-5 replica
      here, so large ensembles are vmapped).

    Args:
      fn: function of one replica.
      strategy: ``"auto"``, ``"vmap"`` or ``"unroll"``.
      in_axes: 0 (map every argument), None, or a sequence with one entry
        (0 or None) per positional argument.
      spmd_axis_name: with ``"vmap"`` under a sharded ``jit`` whose replica
        axis is sharded over this mesh axis (e.g. ``"replica"``), tells XLA
        that the mapped axis is that mesh axis, so each device computes its
        own replicas instead of gathering them (measured here on LeNet-5, 4
        emulated devices: 24 all-gathers and 60 all-reduces per step without
        it, 8 and 3 with it). Ignored by ``"unroll"``.

    Returns:
      The mapped function.

    Example:
      >>> import jax.numpy as jnp, flatjax
      >>> f = flatjax.replica_map(lambda w, x: w * x, strategy="unroll", in_axes=(0, None))
      >>> f(jnp.array([1.0, 2.0]), 3.0)
      Array([3., 6.], dtype=float32)
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}.")
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}.")
    if isinstance(in_axes, (list, tuple)):
        if any(a not in (0, None) or isinstance(a, bool) for a in in_axes):
            raise ValueError(f"in_axes entries must be 0 or None, got {in_axes!r}.")
        in_axes = tuple(in_axes)
    elif in_axes not in (0, None) or isinstance(in_axes, bool):
        raise ValueError(
            f"in_axes must be 0, None or a sequence of 0/None per argument, got {in_axes!r}."
        )

    def mapped(*args):
        axes = in_axes if isinstance(in_axes, tuple) else (in_axes,) * len(args)
        if len(axes) != len(args):
            raise ValueError(
                f"in_axes has {len(axes)} entries but the function got {len(args)} arguments."
            )
        sizes = {
            jnp.shape(leaf)[0] if jnp.ndim(leaf) else None
            for arg, ax in zip(args, axes, strict=True)
            if ax == 0
            for leaf in jax.tree.leaves(arg)
        }
        if not sizes:
            raise ValueError("replica_map needs at least one mapped (in_axes 0) array argument.")
        if None in sizes or len(sizes) != 1:
            raise ValueError(
                "every mapped argument needs the same leading replica axis; found leading "
                f"sizes {sorted(s for s in sizes if s is not None)}"
                f"{' and scalars' if None in sizes else ''}."
            )
        (y,) = sizes
        chosen = strategy
        if chosen == "auto":
            chosen = "unroll" if jax.default_backend() == "cpu" and y <= 8 else "vmap"
        if chosen == "vmap":
            return jax.vmap(fn, in_axes=axes, spmd_axis_name=spmd_axis_name)(*args)
        outs = [
            fn(
                *(
                    jax.tree.map(lambda x, a=a: x[a], arg) if ax == 0 else arg
                    for arg, ax in zip(args, axes, strict=True)
                )
            )
            for a in range(y)
        ]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    return mapped
