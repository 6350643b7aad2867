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

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from flatjax.training import algorithms
from flatjax.training.config import StepPlan, plan_steps, validate_config

__all__ = [
    "TrainState",
    "create_train_state",
    "make_optimizer",
    "eval_params",
    "eval_variables",
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
      hparams: hyperparameters measured at initialisation (float32 scalars;
        Replicated-SGD's balanced γ_0 as ``{'coupling': γ_0}``, ``{}``
        otherwise). They are checkpointed, so a resumed run rebuilds its
        optimizer from them instead of measuring again.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    algorithm: str = struct.field(pytree_node=False, default="sgd")
    hparams: Any = struct.field(default_factory=dict)

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
        if algorithm not in algorithms.ALGORITHMS:
            raise ValueError(
                "algorithm must be one of "
                + ", ".join(repr(n) for n in algorithms.ALGORITHMS) + f", got {algorithm!r}."
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


def make_optimizer(
    config: ml_collections.ConfigDict,
    plan: StepPlan,
    *,
    hparams: Mapping[str, Any] | None = None,
) -> optax.GradientTransformation:
    """The Optax transformation ``config`` asks for.

    SGD: ``chain(add_decayed_weights(λ), sgd(η, momentum, nesterov))``.
    Entropy-SGD: :func:`flatjax.entropy_sgd` (scan mode, ``has_aux=True``)
    or :func:`flatjax.entropy_sgd_stepwise` with γ_t =
    :func:`flatjax.exponential_coupling` over the run's outer steps (γ_0 =
    ``esgd.coupling``, or calibrated at outer step ``esgd.calibration_step``
    when it is None), the authors' γ-scaled outer step and Nesterov inner
    momentum. Replicated-SGD: :func:`flatjax.replicated_sgd` (the explicit
    rule, coupling inside the Nesterov gradient) with each replica's weight
    decay y · λ (``rsgd.weight_decay`` overrides it), γ(t) growing by
    ``rsgd.coupling_factor`` per ``rsgd.coupling_schedule``. Each is built by
    its module in :mod:`flatjax.training.algorithms`.

    Args:
      config: a validated config.
      plan: the run's :class:`flatjax.training.StepPlan`.
      hparams: measured hyperparameters (a state's ``hparams``): Replicated-SGD's
        ``{'coupling': γ_0}`` when ``rsgd.coupling`` is None.

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> from flatjax.training import base_config, make_optimizer, plan_steps
      >>> config = base_config()
      >>> tx = make_optimizer(config, plan_steps(config, 10))
      >>> type(tx).__name__
      'GradientTransformationExtraArgs'
    """
    return algorithms.get(config.algorithm).make_optimizer(config, plan, hparams or {})


def create_train_state(
    config: ml_collections.ConfigDict,
    model,
    info,
    rng: jax.Array,
    *,
    plan: StepPlan | None = None,
    balance_batches: Iterable[Mapping[str, Any]] | None = None,
    hparams: Mapping[str, Any] | None = None,
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
      hparams: measured hyperparameters to use instead of measuring them (a
        checkpointed state's ``hparams``).

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
    return build_train_state(config, model, info, rng, plan=plan,
                             balance_batches=balance_batches, hparams=hparams)


def _default_plan(config, info) -> StepPlan:
    num_train = int(info_field(info, "num_train", "num_train_examples", "train_size"))
    num_train = int(num_train * (1 - config.validation_fraction))
    return plan_steps(config, num_train // config.batch_size)


def abstract_train_state(config, model, info, rng, *, plan=None) -> TrainState:
    """The state's structure, shapes and dtypes (``jax.eval_shape``): a restore target.

    Nothing is initialised or compiled; the measured hyperparameters are
    placeholders of the right structure (a restore brings the saved ones).
    The Optax transformation is built outside the abstract evaluation, so it
    holds no traced values.
    """
    algorithm = algorithms.get(config.algorithm)
    plan = _default_plan(config, info) if plan is None else plan
    hparams = algorithm.placeholder_hparams(config)
    state = jax.eval_shape(lambda: build_train_state(config, model, info, rng, plan=plan,
                                                     hparams=hparams))
    return state.replace(tx=algorithm.make_optimizer(config, plan, hparams))


def build_train_state(config, model, info, rng, *, plan=None, balance_batches=None,
                      hparams=None) -> TrainState:
    """:func:`create_train_state` for a config that was already validated."""
    algorithm = algorithms.get(config.algorithm)
    if plan is None:
        plan = _default_plan(config, info)
    init_rng, state_rng = jax.random.split(rng)
    shape = tuple(info_field(info, "input_shape", "shape", "image_shape"))
    dummy = jnp.zeros((1, *shape), jnp.float32)

    def init(key, x):
        return model.init({"params": key, "dropout": key}, x, train=False)

    variables = algorithm.init_variables(config, init, init_rng, dummy)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    if hparams is None:
        hparams = algorithm.measure(config, model.apply, params, batch_stats, balance_batches)
    hparams = dict(hparams)
    tx = algorithm.make_optimizer(config, plan, hparams)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=algorithm.init_opt_state(config, tx, params, batch_stats),
        rng=state_rng,
        apply_fn=model.apply,
        tx=tx,
        algorithm=config.algorithm,
        hparams=hparams,
    )


def with_saved_hparams(state: TrainState, config, plan: StepPlan) -> TrainState:
    """``state`` with its optimizer rebuilt from its own (restored) ``hparams``."""
    if not state.hparams:
        return state
    hparams = {k: float(v) for k, v in state.hparams.items()}
    return state.replace(tx=algorithms.get(config.algorithm).make_optimizer(config, plan, hparams))


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
    return algorithms.get(state.algorithm).eval_params(state)


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
    algorithm = algorithms.get(state.algorithm)
    params = algorithm.eval_params(state)
    if not state.batch_stats:
        return {"params": params}
    stats = algorithm.eval_batch_stats(state, params, center_batch_stats, batches)
    return {"params": params, "batch_stats": stats}
