"""A model's loss over a whole dataset, streamed in equal padded batches.

A dataset is ``(x, y)`` (or ``{"image": x, "label": y}``) with integer class
labels ``y`` of shape ``[n]``. It is streamed through the network in
fixed-size batches (``lax.scan``), the last one padded and masked, so every
example is counted exactly once. The loss object keeps its code (the
network's ``apply_fn``, hashable, a static ``jit`` argument) apart from its
data (arguments of the compiled programs), so that every measure compiles
once per network and shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from flatjax._losses import misclassified, softmax_cross_entropy
from flatjax.flatness._checks import (
    _check_choice,
    _check_data,
    _check_finite_inputs,
    _check_labels,
    _check_positive_int,
    _check_variables,
)

__all__ = ["dataset_loss"]

_METRICS = ("error", "loss")


class _ById:
    """Wraps an unhashable callable so it can be a static ``jit`` argument."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

    # Equal for the same function object: wrapping it again hits the jit cache.
    def __hash__(self) -> int:
        return id(self.fn)

    def __eq__(self, other) -> bool:
        return isinstance(other, _ById) and other.fn is self.fn


def _static(fn: Callable) -> Callable:
    try:
        hash(fn)
    except TypeError:
        return _ById(fn)
    return fn


def _per_example(metric: str, logits: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    """ℓ(f(x), y) per example: the error in percent or the softmax cross-entropy."""
    if metric == "error":
        return 100.0 * misclassified(logits, y)
    return softmax_cross_entropy(logits, y)


class _Batches(NamedTuple):
    """A dataset cut into ``k`` equal batches, the last padded and masked (a pytree).

    Attributes:
      x: inputs ``[k, b, ...]``; y: labels ``[k, b]``; mask: ``[k, b]`` bool,
      False on the at most k − 1 padding examples.
    """

    x: jnp.ndarray
    y: jnp.ndarray
    mask: jnp.ndarray


def _batch_layout(n: int, batch_size: int) -> tuple[int, int]:
    """``(k, b)``: the fewest batches of at most ``batch_size``, of equal size b = ⌈n/k⌉."""
    k = -(-n // batch_size)
    return k, -(-n // k)


def _stack_batches(x, y, batch_size: int) -> _Batches:
    n = x.shape[0]
    k, b = _batch_layout(n, batch_size)
    pad = k * b - n
    mask = jnp.arange(k * b) < n
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)])
        y = jnp.concatenate([y, jnp.zeros((pad,), y.dtype)])
    return _Batches(x.reshape(k, b, *x.shape[1:]), y.reshape(k, b), mask.reshape(k, b))


class _BatchTerm(NamedTuple):
    """Hashable ``(params, other_vars, x, y, mask) -> Σ_batch metric / n``: one batch's share."""

    apply_fn: Callable
    metric: str
    num_examples: int

    def __call__(self, params, other_vars, x, y, mask):
        logits = self.apply_fn({**other_vars, "params": params}, x)
        values = jnp.where(mask, _per_example(self.metric, logits, y), 0.0)
        return jnp.sum(values) / self.num_examples


class _DatasetEnergy(NamedTuple):
    """Hashable ``(params, other_vars, batches) -> metric``: keeps the jit cache warm.

    The mean over the whole dataset, the batches streamed by ``lax.scan`` (a
    single batch is evaluated directly).
    """

    apply_fn: Callable
    metric: str
    num_examples: int
    has_conv: bool = False

    @property
    def term(self) -> _BatchTerm:
        return _BatchTerm(self.apply_fn, self.metric, self.num_examples)

    def __call__(self, params, other_vars, batches: _Batches):
        term = self.term
        if batches.x.shape[0] == 1:
            return term(params, other_vars, batches.x[0], batches.y[0], batches.mask[0])

        def body(acc, batch):
            return acc + term(params, other_vars, *batch), None

        total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), tuple(batches))
        return total


class _DatasetLoss:
    """``loss_fn(params)`` of :func:`dataset_loss`; keeps its data apart from its code.

    Calling it streams the dataset (``lax.scan``) and is differentiable and
    jittable. The Hessian tools instead read ``energy``, ``other_vars`` and
    ``batches`` and run one cached, jitted per-batch HVP per batch, so the
    data are arguments of the compiled programs, never constants baked into
    them.
    """

    __slots__ = ("energy", "other_vars", "batches", "_batch_list", "__weakref__")  # jax.jit(it)

    def __init__(self, energy: _DatasetEnergy, other_vars, batches: _Batches):
        self.energy, self.other_vars, self.batches = energy, other_vars, batches
        self._batch_list = None

    def __call__(self, params):
        return self.energy(params, self.other_vars, self.batches)

    def batch_list(self) -> list[tuple]:
        """``[(x_i, y_i, mask_i)]``, sliced once."""
        if self._batch_list is None:
            b = self.batches
            self._batch_list = [(b.x[i], b.y[i], b.mask[i]) for i in range(b.x.shape[0])]
        return self._batch_list

    def __repr__(self) -> str:
        k, b = self.batches.x.shape[:2]
        return (
            f"dataset_loss(metric={self.energy.metric!r}, n={self.energy.num_examples}, "
            f"{k} batch(es) of {b})"
        )


def _loss_parts(loss_fn: Callable) -> tuple[Callable, tuple]:
    """``(fn, args)`` with ``loss_fn(p) == fn(p, *args)``, ``fn`` a static ``jit`` argument.

    A :func:`dataset_loss` is split into its code and its data, so that the
    data enter compiled programs as arguments.
    """
    if isinstance(loss_fn, _DatasetLoss):
        return loss_fn.energy, (loss_fn.other_vars, loss_fn.batches)
    return _static(loss_fn), ()


def _flat_loss(loss_fn, params, loss_args=()):
    flat, unravel = ravel_pytree(params)
    return (lambda w: loss_fn(unravel(w), *loss_args)), flat, unravel


def _dataset_parts(apply_fn, variables, data, batch_size, metric):
    """Validates a model and dataset; returns ``(_DatasetEnergy, other_vars, _Batches)``."""
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}.")
    _check_variables(variables)
    x, y = _check_data(data)
    batch_size = _check_positive_int("batch_size", batch_size)
    _check_choice("metric", metric, _METRICS)
    _check_finite_inputs(x)
    has_conv = _check_labels(apply_fn, variables, x, y)
    other = {k: v for k, v in variables.items() if k != "params"}
    energy = _DatasetEnergy(_static(apply_fn), metric, int(x.shape[0]), has_conv)
    return energy, other, _stack_batches(x, y, batch_size)


def dataset_loss(
    apply_fn: Callable,
    variables: Mapping[str, Any],
    data: Any,
    *,
    batch_size: int = 1000,
    metric: str = "loss",
) -> Callable[[Any], jnp.ndarray]:
    r"""Makes ``loss_fn(params)``: a model's mean loss over a whole dataset.

    .. math::
      L(w) = \frac{1}{n} \sum_{\mu=1}^{n} \ell(f_w(x^\mu), y^\mu),

    with ℓ the softmax cross-entropy (``metric="loss"``) or the 0/1 error in
    percent (``metric="error"``), the network ``f_w = apply_fn({**variables,
    "params": w}, ·)`` in eval mode. The n examples are cut into the fewest
    k = ⌈n / ``batch_size``⌉ batches of equal size b = ⌈n/k⌉, the last padded
    with at most k − 1 masked examples that count for nothing, and streamed
    by ``lax.scan``: every example is counted exactly once. The returned
    function is differentiable and jittable; feed it to :func:`hvp`,
    :func:`hessian_top_eigenvalue`, :func:`hessian_trace`,
    :func:`sam_sharpness`, :func:`local_entropy` or :func:`local_energy_fn`.
    These recognise it and pass the data to their compiled programs as
    arguments (the Hessian tools compile one HVP of a single batch and
    accumulate it over the batches), so the programs are compiled once per
    ``apply_fn`` and shape, whatever the number of iterations or probes.

    Args:
      apply_fn: ``apply_fn(variables, x) -> logits [batch, classes]`` in eval
        mode, e.g. ``lambda v, x: model.apply(v, x, train=False)``.
      variables: the Flax variables; ``variables["params"]`` is replaced by
        the argument of the returned function, other collections are fixed.
      data: ``(x, y)`` or ``{"image": x, "label": y}``, integer labels ``[n]``
        in ``[0, classes)``, finite inputs.
      batch_size: largest number of examples per forward pass.
      metric: ``"loss"`` (mean cross-entropy) or ``"error"`` (percent).

    Returns:
      ``loss_fn(params) -> scalar``.

    Raises:
      ValueError: the inputs contain NaN or inf, or a label is not a class
        index of ``apply_fn``'s logits.

    Example:
      >>> import flatjax
      >>> import jax.numpy as jnp
      >>> apply_fn = lambda v, x: x @ v["params"]["w"]
      >>> x, y = jnp.eye(2), jnp.array([0, 1])
      >>> loss_fn = flatjax.dataset_loss(apply_fn, {"params": {"w": jnp.zeros((2, 2))}}, (x, y))
      >>> float(loss_fn({"w": jnp.zeros((2, 2))}))  # log 2
      0.6931...
    """
    return _DatasetLoss(*_dataset_parts(apply_fn, variables, data, batch_size, metric))
