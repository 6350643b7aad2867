"""The training state, its optimizer, and the parameters to evaluate and save.

:class:`TrainState` is flax's ``TrainState`` plus BatchNorm statistics, a PRNG
key and the algorithm's name, with one difference that matters here:
:meth:`TrainState.apply_gradients` forwards extra keyword arguments to
``tx.update`` (flax's own drops them, flax#4471), so Entropy-SGD's
``grad_fn=`` and ``value=`` reach the optimizer through an unmodified loop.

The params a loop holds are not always the network to evaluate and save
(the schedule-free and lookahead pitfall): :func:`eval_params` returns the Entropy-SGD anchor x, the
Replicated-SGD centre c, or the params of SGD.

References:
  Pittorino et al., Entropic gradient descent algorithms and wide flat minima,
  ICLR 2021, arXiv:2006.07897.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from flatjax.training.config import StepPlan, plan_steps, validate_config

__all__ = [
    "TrainState",
    "create_train_state",
    "make_optimizer",
    "rsgd_weight_decay",
    "eval_params",
    "eval_variables",
    "esgd_scan_aux",
    "info_field",
]


class TrainState(struct.PyTreeNode):
    """Everything a training step reads and writes, as one pytree.

    Attributes:
      step: int32, training steps done (jitted step calls; see
        :func:`flatjax.training.plan_steps` for what one costs).
      params: the params the loop holds: the network (SGD), the anchor
        (Entropy-SGD scan mode) or walker (stepwise), or the replicas with a
        leading axis y (Replicated-SGD).
      batch_stats: BatchNorm running statistics (``{}`` for models without).
      opt_state: the optimizer's state.
      rng: PRNG key (uint32 [2]) for dropout and other per-step randomness.
      apply_fn: ``model.apply`` (static).
      tx: the Optax transformation (static).
      algorithm: 'sgd', 'entropy_sgd' or 'replicated_sgd' (static); decides
        which params :func:`eval_params` returns.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    algorithm: str = struct.field(pytree_node=False, default="sgd")

    @classmethod
    def create(cls, *, apply_fn, params, tx, batch_stats=None, rng=None,
               algorithm: str = "sgd") -> TrainState:
        """A state at step 0, as flax's ``TrainState.create``: ``opt_state = tx.init(params)``.

        Args:
          apply_fn: the model's ``apply`` (or None).
          params: the params the loop holds (for Replicated-SGD, stacked replicas).
          tx: the Optax transformation.
          batch_stats: BatchNorm statistics (default ``{}``: none).
          rng: PRNG key for dropout (default ``jax.random.PRNGKey(0)``).
          algorithm: 'sgd', 'entropy_sgd' or 'replicated_sgd' (selects
            :func:`eval_params`).

        Returns:
          A :class:`TrainState`.

        Example:
          >>> import jax.numpy as jnp, flatjax
          >>> from flatjax.training import TrainState
          >>> tx = flatjax.entropy_sgd(0.5, inner_steps=2, coupling=1.0)
          >>> state = TrainState.create(apply_fn=None, params=jnp.ones(2), tx=tx,
          ...                           algorithm="entropy_sgd")
          >>> grad_fn = lambda w, i: 2 * w
          >>> state = state.apply_gradients(grads=grad_fn(state.params, 0), grad_fn=grad_fn)
          >>> int(state.step), bool(jnp.all(state.params < 1))
          (1, True)
        """
        if algorithm not in ("sgd", "entropy_sgd", "replicated_sgd"):
            raise ValueError(
                "algorithm must be 'sgd', 'entropy_sgd' or 'replicated_sgd', "
                f"got {algorithm!r}."
            )
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats={} if batch_stats is None else batch_stats,
            opt_state=tx.init(params),
            rng=jax.random.PRNGKey(0) if rng is None else rng,
            apply_fn=apply_fn,
            tx=tx,
            algorithm=algorithm,
        )

    def apply_gradients(self, *, grads, **extra_args) -> TrainState:
        """One optimizer update: ``tx.update(grads, opt_state, params, **extra_args)``.

        Unlike flax's ``TrainState.apply_gradients`` (which treats keyword
        arguments as fields to replace), ``extra_args`` go to ``tx.update``:
        ``grad_fn=`` for Entropy-SGD's scan mode, ``value=`` for its
        calibration. Use ``.replace`` for other fields.

        Args:
          grads: gradients shaped like ``params``.
          **extra_args: forwarded to ``tx.update``.

        Returns:
          The state with ``step + 1``, new ``params`` and ``opt_state``.

        Example:
          >>> import jax, jax.numpy as jnp, optax
          >>> from flatjax.training import TrainState
          >>> tx = optax.contrib.sam(optax.sgd(0.1), optax.sgd(0.1), opaque_mode=True)
          >>> params = jnp.ones(2)
          >>> state = TrainState(step=jnp.int32(0), params=params, batch_stats={},
          ...                    opt_state=tx.init(params), rng=jax.random.PRNGKey(0),
          ...                    apply_fn=None, tx=tx)
          >>> grad_fn = lambda p, _: 2 * p
          >>> state = state.apply_gradients(grads=grad_fn(params, 0), grad_fn=grad_fn)
          >>> int(state.step), bool(jnp.all(state.params < 1))
          (1, True)
        """
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra_args)
        return self.replace(
            step=self.step + 1,
            params=optax.apply_updates(self.params, updates),
            opt_state=opt_state,
        )


def info_field(info, *names, default=None):
    """Reads the first of ``names`` present in ``info`` (an object or a mapping)."""
    for name in names:
        if isinstance(info, Mapping) and name in info:
            return info[name]
        if hasattr(info, name):
            return getattr(info, name)
    if default is not None:
        return default
    raise ValueError(f"The dataset info {info!r} has none of the fields {names}.")


def esgd_scan_aux(batch_stats):
    """The value Entropy-SGD's scan step threads through its inner steps.

    ``(batch statistics, Σ loss, Σ error %, max ‖g‖)`` over the inner
    minibatches: the walker's BatchNorm statistics ('walker' mode; carried
    unchanged otherwise) and the training metrics of the L gradient
    evaluations, so no forward pass is repeated for them. The optimizer
    state holds it from step 0 (its structure never changes).
    """
    zero = jnp.zeros((), jnp.float32)
    return (batch_stats, zero, zero, zero)


def _lr_schedule(config, total):
    if config.lr_schedule == "cosine":
        return optax.cosine_decay_schedule(config.learning_rate, total)
    return config.learning_rate


def _rsgd_coupling(config, plan, init_value):
    import flatjax

    per_step = config.rsgd.coupling_per == "step"
    every = 1 if per_step else max(1, min(plan.total_steps, plan.data_steps_per_epoch))
    schedule = {
        "exponential": flatjax.exponential_coupling,
        "linear": flatjax.linear_coupling,
        "cosine": flatjax.cosine_coupling,
    }[config.rsgd.coupling_schedule]
    return schedule(
        init_value, plan.total_steps, config.rsgd.coupling_factor, steps_per_update=every
    )


def make_optimizer(
    config: ml_collections.ConfigDict,
    plan: StepPlan,
    *,
    has_batch_stats: bool = False,
    rsgd_coupling: float | None = None,
) -> optax.GradientTransformation:
    """The Optax transformation ``config`` asks for.

    SGD: ``chain(add_decayed_weights(λ), sgd(η, momentum, nesterov))``.
    Entropy-SGD: :func:`flatjax.entropy_sgd` (scan mode, ``has_aux=True``: the
    step threads :func:`esgd_scan_aux` through the inner steps) or
    :func:`flatjax.entropy_sgd_stepwise` with γ_t =
    :func:`flatjax.exponential_coupling` over the run's outer steps (γ_0 =
    ``esgd.coupling``, or calibrated at outer step ``esgd.calibration_step``
    when it is None), the authors' γ-scaled outer step and Nesterov inner
    momentum. Replicated-SGD: :func:`flatjax.replicate` (the explicit rule,
    coupling inside the Nesterov gradient) of the SGD above with weight decay
    :func:`rsgd_weight_decay`, γ(t) growing by ``rsgd.coupling_factor`` per
    ``rsgd.coupling_schedule``.

    Args:
      config: a validated config.
      plan: the run's :class:`flatjax.training.StepPlan`.
      has_batch_stats: whether the model has BatchNorm statistics.
      rsgd_coupling: γ_0 for Replicated-SGD when ``rsgd.coupling`` is None
        (the balanced value, measured by :func:`create_train_state`).

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> from flatjax.training import base_config, make_optimizer, plan_steps
      >>> config = base_config()
      >>> tx = make_optimizer(config, plan_steps(config, 10))
      >>> type(tx).__name__
      'GradientTransformationExtraArgs'
    """
    if config.algorithm == "sgd":
        return optax.chain(
            optax.add_decayed_weights(config.weight_decay),
            optax.sgd(
                _lr_schedule(config, plan.total_steps), config.momentum, config.nesterov
            ),
        )
    import flatjax

    if config.algorithm == "entropy_sgd":
        e = config.esgd
        calibrate = e.coupling is None
        coupling = flatjax.exponential_coupling(
            1.0 if calibrate else e.coupling, plan.total_outer_steps, e.coupling_factor
        )
        stepwise = e.mode == "stepwise"
        factory = (flatjax.entropy_sgd_stepwise if stepwise
                   else functools.partial(flatjax.entropy_sgd, has_aux=True))
        inner_wd = config.weight_decay if e.inner_weight_decay is None else e.inner_weight_decay
        return factory(
            _lr_schedule(config, plan.total_outer_steps),
            e.inner_steps,
            coupling,
            inner_learning_rate=e.inner_learning_rate,
            noise=e.noise,
            average_weight=e.average,
            inner_weight_decay=inner_wd,
            inner_momentum=e.inner_momentum,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
            outer_scale=e.outer_scale,
            seed=config.seed,
            calibrate_coupling=calibrate,
            calibration_step=e.calibration_step,
            max_coupling=e.coupling_max,
        )
    r = config.rsgd
    gamma0 = r.coupling if r.coupling is not None else rsgd_coupling
    if gamma0 is None:
        raise ValueError(
            "rsgd.coupling is None (balanced γ_0) but no measured rsgd_coupling was given; "
            "create_train_state measures it from training batches (balance_batches=)."
        )
    return flatjax.replicated_sgd(
        _lr_schedule(config, plan.total_steps),
        r.num_replicas,
        _rsgd_coupling(config, plan, float(gamma0)),
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=rsgd_weight_decay(config),
        coupling_step=r.coupling_step,
    )


def rsgd_weight_decay(config: ml_collections.ConfigDict) -> float:
    """Each replica's weight decay: ``rsgd.weight_decay``, or y · ``weight_decay``.

    The authors' code multiplies the learning rate by y to undo the 1/y of its
    replica-averaged loss; PyTorch scales the weight decay by the learning rate,
    so each of their replicas decays with y · wd. ``rsgd.weight_decay = None``
    reproduces that.

    Example:
      >>> from flatjax.training import base_config
      >>> from flatjax.training.state import rsgd_weight_decay
      >>> rsgd_weight_decay(base_config())  # y = 3, wd = 5e-4
      0.0015
    """
    if config.rsgd.weight_decay is not None:
        return float(config.rsgd.weight_decay)
    return float(config.rsgd.num_replicas * config.weight_decay)


def _init_variables(config, model, info, rng):
    shape = tuple(info_field(info, "input_shape", "shape", "image_shape"))
    dummy = jnp.zeros((1, *shape), jnp.float32)

    def init(key, x):
        return model.init({"params": key, "dropout": key}, x, train=False)

    if config.algorithm == "replicated_sgd":
        import flatjax

        return flatjax.init_replicas(init, rng, config.rsgd.num_replicas, dummy)
    return init(rng, dummy)


def create_train_state(
    config: ml_collections.ConfigDict,
    model,
    info,
    rng: jax.Array,
    *,
    plan: StepPlan | None = None,
    balance_batches: Iterable[Mapping[str, Any]] | None = None,
) -> TrainState:
    """Initialises the model (y replicas for Replicated-SGD) and the optimizer.

    Args:
      config: a config from :func:`flatjax.training.base_config`.
      model: a flax linen module called as ``model.apply(variables, x,
        train=bool, ...)``.
      info: the dataset info: an object or mapping with ``input_shape`` (one
        example's shape) and, unless ``plan`` is given, ``num_train`` (size of
        the training split).
      rng: PRNG key; split into the init key and the state's key.
      plan: the run's :class:`flatjax.training.StepPlan` (default: from
        ``info``'s training-set size and ``config``).
      balance_batches: training batches (dicts with 'image' and 'label',
        no replica axis) over which the balanced γ_0 = 2 · mean_a L(wᵃ) /
        mean_a ‖wᵃ − c‖² is measured when ``rsgd.coupling`` is None: the mean
        training loss of each replica at initialisation, networks in
        evaluation mode (the authors' rule; :func:`flatjax.balanced_coupling`).

    Returns:
      A :class:`TrainState` at step 0.

    Example:
      >>> import jax
      >>> from flatjax.models.mlp import MLPTiny
      >>> from flatjax.training import base_config, create_train_state
      >>> state = create_train_state(base_config(), MLPTiny(num_classes=3),
      ...                            {"input_shape": (4,), "num_train": 1024},
      ...                            jax.random.PRNGKey(0))
      >>> state.params["Dense_0"]["kernel"].shape, int(state.step)
      ((4, 16), 0)
    """
    validate_config(config)
    if plan is None:
        num_train = int(info_field(info, "num_train", "num_train_examples", "train_size"))
        num_train = int(num_train * (1 - config.validation_fraction))
        plan = plan_steps(config, num_train // config.batch_size)
    init_rng, state_rng = jax.random.split(rng)
    variables = _init_variables(config, model, info, init_rng)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    rsgd_coupling = None
    if config.algorithm == "replicated_sgd" and config.rsgd.coupling is None:
        if balance_batches is None:
            raise ValueError(
                "rsgd.coupling is None (balanced γ_0): create_train_state needs "
                "balance_batches= (training batches without replica axis) to measure it, "
                "or set config.rsgd.coupling to a number."
            )
        rsgd_coupling = _balanced_rsgd_coupling(model.apply, params, batch_stats, balance_batches)
    tx = make_optimizer(
        config, plan, has_batch_stats=bool(batch_stats), rsgd_coupling=rsgd_coupling
    )
    opt_state = tx.init(params)
    if config.algorithm == "entropy_sgd" and config.esgd.mode == "scan":
        opt_state = opt_state._replace(aux=esgd_scan_aux(batch_stats))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        rng=state_rng,
        apply_fn=model.apply,
        tx=tx,
        algorithm=config.algorithm,
    )


def _balanced_rsgd_coupling(apply_fn, params, batch_stats, batches) -> float:
    import flatjax
    from flatjax.training.steps import cross_entropy

    @jax.jit
    def losses_on(batch):
        def loss(p, s):
            variables = {"params": p, **({"batch_stats": s} if s else {})}
            logits = apply_fn(variables, batch["image"], train=False)
            return cross_entropy(logits, batch["label"]) * batch["label"].shape[0]

        return jax.vmap(loss)(params, batch_stats)

    total, count = 0.0, 0
    for batch in batches:
        batch = {k: jnp.asarray(batch[k]) for k in ("image", "label")}
        total = total + losses_on(batch)
        count += int(batch["label"].shape[0])
    if count == 0:
        raise ValueError("balance_batches is empty; the balanced γ_0 needs training batches.")
    return float(flatjax.balanced_coupling(total / count, params))


def eval_params(state: TrainState):
    """The params to evaluate and checkpoint as THE network of the run.

    SGD: ``state.params``. Entropy-SGD: the anchor x
    (:func:`flatjax.entropy_sgd_eval_params`; in stepwise mode the loop holds the
    walker). Replicated-SGD: the centre c = (1/y) Σ_a wᵃ
    (:func:`flatjax.replica_center`).

    Args:
      state: a :class:`TrainState`.

    Returns:
      A params pytree without replica axis.

    Example:
      >>> import jax
      >>> from flatjax.models.mlp import MLPTiny
      >>> from flatjax.training import base_config, create_train_state, eval_params
      >>> state = create_train_state(base_config(), MLPTiny(num_classes=3),
      ...                            {"input_shape": (4,), "num_train": 1024},
      ...                            jax.random.PRNGKey(0))
      >>> eval_params(state) is state.params
      True
    """
    if state.algorithm == "entropy_sgd":
        import flatjax

        return flatjax.entropy_sgd_eval_params(state.opt_state, state.params)
    if state.algorithm == "replicated_sgd":
        import flatjax

        return flatjax.replicate_eval_params(state.opt_state, state.params)
    return state.params


def eval_variables(state: TrainState, *, center_batch_stats: str = "average", batches=None):
    """``{'params': eval_params(state), 'batch_stats': ...}``, ready for ``apply_fn``.

    Replicated-SGD's centre gets the mean of the replicas' running statistics
    (``center_batch_stats='average'``, the authors' choice) or statistics
    recomputed by forward passes of the centre over ``batches`` of training
    data (``'recompute'``, as SWA, Parle and PAPA do). Entropy-SGD keeps the
    statistics the training step maintained (per ``esgd.batch_norm``).

    Args:
      state: a :class:`TrainState`.
      center_batch_stats: 'average' or 'recompute' (Replicated-SGD only).
      batches: iterable of training batches (dicts with 'image', no replica
        axis), for 'recompute'.

    Returns:
      A variables dict (no 'batch_stats' key for models without BatchNorm).

    Example:
      >>> import jax
      >>> from flatjax.models.mlp import MLPTiny
      >>> from flatjax.training import base_config, create_train_state, eval_variables
      >>> state = create_train_state(base_config(), MLPTiny(num_classes=3),
      ...                            {"input_shape": (4,), "num_train": 1024},
      ...                            jax.random.PRNGKey(0))
      >>> sorted(eval_variables(state))
      ['params']
    """
    if center_batch_stats not in ("average", "recompute"):
        raise ValueError(
            f"center_batch_stats must be 'average' or 'recompute', got {center_batch_stats!r}."
        )
    params = eval_params(state)
    stats = state.batch_stats
    if not stats:
        return {"params": params}
    if state.algorithm == "replicated_sgd":
        import flatjax

        stats = flatjax.average_batch_stats(stats)
        if center_batch_stats == "recompute":
            if batches is None:
                raise ValueError("center_batch_stats='recompute' needs batches= of training data.")
            apply = functools.partial(state.apply_fn, train=True, mutable=["batch_stats"])
            images = (batch["image"] for batch in batches)
            variables = flatjax.recompute_batch_stats(
                apply, {"params": params, "batch_stats": stats}, images
            )
            stats = variables["batch_stats"]
    return {"params": params, "batch_stats": stats}
