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
  fixed-size batches (``lax.scan``) plus one remainder batch, so every
  example is counted exactly once.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

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

_NOISES = ("multiplicative", "additive")
_METRICS = ("error", "loss")
_PERTURB_PRESETS = ("all", "no_bias_bn")
# Work budget of one vectorised chunk of local-energy draws, in units of
# (parameters × examples), i.e. roughly multiply-adds of a dense forward pass.
# On CPU larger chunks spill the batched activations out of cache (measured:
# experiments/benchmarks/local_energy_bench.py); accelerators want wide vmaps.
_CHUNK_WORK_BUDGET = {"cpu": 2**26}
_CHUNK_WORK_BUDGET_ACCELERATOR = 2**30
# Budget for the perturbed parameter copies alive at once (floats).
_CHUNK_PARAM_BUDGET = 2**28


# ---------------------------------------------------------------------------
# Validation helpers.


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return int(value)


def _check_positive_float(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}.") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return value


def _check_sigmas(sigmas: Any) -> np.ndarray:
    arr = np.asarray(sigmas, dtype=np.float64)
    if arr.ndim == 0:
        arr = arr[None]
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(
            f"sigmas must be a non-empty scalar or 1-D array, got shape {np.shape(sigmas)}."
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"sigmas must be finite, got {arr.tolist()}.")
    if np.any(arr < 0):
        raise ValueError(f"sigmas must be >= 0, got {arr.tolist()}.")
    return arr


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")
    return value


def _check_data(data: Any) -> tuple[jnp.ndarray, jnp.ndarray]:
    if isinstance(data, Mapping):
        if "image" not in data or "label" not in data:
            raise ValueError(f"a dict dataset needs keys 'image' and 'label', got {sorted(data)}.")
        x, y = data["image"], data["label"]
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    else:
        raise TypeError(
            "data must be a pair (x, y) or a dict {'image': x, 'label': y}, "
            f"got {type(data).__name__}."
        )
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.ndim < 1 or y.ndim != 1:
        raise ValueError(
            f"labels y must be 1-D integers and x at least 1-D, got x {x.shape}, y {y.shape}."
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x and y must have the same length, got {x.shape[0]} inputs and {y.shape[0]} labels."
        )
    if x.shape[0] == 0:
        raise ValueError("the dataset is empty (0 examples).")
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise TypeError(f"labels y must be integer class indices, got dtype {y.dtype}.")
    return x, y


def _check_variables(variables: Any) -> None:
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise ValueError(
            "variables must be a Flax variables dict with a 'params' collection, got "
            f"{type(variables).__name__}"
            + (f" with keys {sorted(variables)}" if isinstance(variables, Mapping) else "")
            + "."
        )


def _key_str(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _perturb_mask(params: Any, perturb: Any) -> tuple[bool, ...]:
    """One bool per leaf of ``params`` (flatten order): perturb this leaf?"""
    leaves_with_path = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [tuple(_key_str(e) for e in path) for path, _ in leaves_with_path]
    if perturb == "all":
        mask = [True] * len(paths)
    elif perturb == "no_bias_bn":
        # Flax names biases and normalisation shifts "bias" and BatchNorm/LayerNorm
        # gains "scale".
        mask = [path[-1] not in ("bias", "scale") for path in paths]
    elif callable(perturb):
        mask = [
            bool(perturb(path, leaf))
            for path, (_, leaf) in zip(paths, leaves_with_path, strict=True)
        ]
    else:
        raise ValueError(
            f"perturb must be one of {_PERTURB_PRESETS} or a predicate "
            f"(path: tuple[str, ...], leaf) -> bool, got {perturb!r}."
        )
    if not any(mask):
        raise ValueError(f"perturb={perturb!r} selects no parameter to perturb.")
    return tuple(mask)


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


# ---------------------------------------------------------------------------
# Progress lines.


# Seconds between two progress lines.
_PROGRESS_EVERY = 5.0


class _Progress:
    """Periodic one-line progress: ``progress=True`` prints to stderr, a callable gets the line.

    A line is emitted at most every ``_PROGRESS_EVERY`` seconds, and always for the last step.
    """

    def __init__(self, progress: Any, name: str, total: int, unit: str = ""):
        if progress is None or progress is False:
            self.emit = None
        elif progress is True:
            self.emit = lambda line: print(line, file=sys.stderr, flush=True)
        elif callable(progress):
            self.emit = progress
        else:
            raise TypeError(
                f"progress must be a bool or a callable taking one line (str), got {progress!r}."
            )
        self.name, self.total, self.unit, self.every = name, total, unit, _PROGRESS_EVERY
        self.seen = 0
        self.start = self.last = time.perf_counter()

    @property
    def on(self) -> bool:
        return self.emit is not None

    def __call__(self, done: int, detail: str = "") -> None:
        if self.emit is None:
            return
        now = time.perf_counter()
        if done < self.total and now - self.last < self.every:
            return
        self.last = now
        detail = f", {detail}" if detail else ""
        self.emit(f"{self.name}: {done}/{self.total}{self.unit}{detail} ({now - self.start:.1f} s)")


# ---------------------------------------------------------------------------
# Dataset streaming.


def _per_example(metric: str, logits: jnp.ndarray, y: jnp.ndarray) -> jnp.ndarray:
    if metric == "error":
        return 100.0 * (jnp.argmax(logits, axis=-1) != y).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]


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


def _check_finite_inputs(x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return
    bad = np.asarray(~jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1))
    if bad.any():
        first = int(np.argmax(bad))
        raise ValueError(
            f"data inputs x contain NaN or inf in {int(bad.sum())} of {bad.size} examples "
            f"(first at index {first}); clean or drop them before measuring."
        )


def _uses_conv(jaxpr) -> bool:
    """Whether a jaxpr, or one nested in it (scan, cond, pjit, ...), has a convolution."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            return True
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns") and _uses_conv(sub):
                    return True
    return False


def _check_labels(apply_fn, variables, x, y) -> bool:
    """Labels must index the logits: 0 ≤ y < C, C read from one trace of ``apply_fn``.

    Returns whether the network has a convolution (from the same trace).
    """
    closed, logits = jax.make_jaxpr(apply_fn, return_shape=True)(variables, x[:1])
    if not hasattr(logits, "shape"):
        raise ValueError(f"apply_fn must return logits [batch, classes], got {logits!r}.")
    if not logits.shape:
        raise ValueError(f"apply_fn must return logits [batch, classes], got shape {logits.shape}.")
    num_classes = int(logits.shape[-1])
    lo, hi = int(jnp.min(y)), int(jnp.max(y))
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"data labels y must be class indices in [0, {num_classes}) for the "
            f"{num_classes} logits of apply_fn, got labels in [{lo}, {hi}]; remap the "
            "labels to 0..C-1 or give the network as many outputs as classes."
        )
    return _uses_conv(closed.jaxpr)


def _check_finite_params(params) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) and not bool(
            jnp.all(jnp.isfinite(leaf))
        ):
            raise ValueError(
                f"variables['params'] contain NaN or inf at {jax.tree_util.keystr(path)}."
            )


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


# ---------------------------------------------------------------------------
# Local energy.


class LocalEnergy(NamedTuple):
    """Local energy curve δE(w, σ) on a grid of noise levels σ.

    Attributes:
      sigmas: the noise levels σ, shape ``[S]``.
      mean: mean over the M noise draws of E(perturbed w) − E(w), ``[S]``.
      stderr: standard error of that mean over the draws (sample std with
        ddof = 1 over √M; NaN when M = 1), ``[S]``.
      base: the unperturbed energy E(w), a scalar.
    """

    sigmas: jnp.ndarray
    mean: jnp.ndarray
    stderr: jnp.ndarray
    base: jnp.ndarray


def _perturb(params, sigma, key, mask, noise):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    out = []
    for leaf, k, on in zip(leaves, keys, mask, strict=True):
        if not on:
            out.append(leaf)
            continue
        z = jax.random.normal(k, leaf.shape, leaf.dtype)
        if noise == "multiplicative":
            out.append(leaf * (1 + sigma.astype(leaf.dtype) * z))
        else:
            out.append(leaf + sigma.astype(leaf.dtype) * z)
    return jax.tree_util.tree_unflatten(treedef, out)


# The reporters of the local-energy calls running now (innermost last); the
# compiled program reaches them through one module-level callback, so that
# turning progress on does not make a program per reporter.
_ACTIVE_REPORTS: list[_Progress] = []


def _progress_tick(done, *_) -> None:
    # Unordered callbacks may arrive late: only a count above the last one is shown.
    if _ACTIVE_REPORTS:
        report, done = _ACTIVE_REPORTS[-1], int(done)
        if report.seen < done < report.total:
            report.seen = done
            report(done)


def _local_energy_core(
    energy_fn,
    params,
    energy_args,
    sigmas,
    active,
    key,
    *,
    num_draws,
    noise,
    mask,
    chunk_size,
    progress,
):
    """δE on the grid; only the σ > 0 rows ``active`` are evaluated (σ = 0 is δE = 0)."""
    base = energy_fn(params, *energy_args)
    if progress:
        jax.debug.callback(_progress_tick, 1, base)
    total = active.shape[0] * num_draws

    def one(index):
        s, m = active[index // num_draws], index % num_draws
        # Draw m uses the same z at every σ (common random numbers): the curve is
        # smooth in σ and differences between σ are not blurred by fresh noise.
        w = _perturb(params, sigmas[s], jax.random.fold_in(key, m), mask, noise)
        return energy_fn(w, *energy_args)

    # lax.map(one, arange(total), batch_size=chunk_size), written out so that a
    # progress tick can follow each chunk: full chunks by lax.scan, then the rest.
    num_full, rem = divmod(total, chunk_size)
    parts = []
    if num_full:

        def body(_, indices):
            values = jax.vmap(one)(indices)
            if progress:
                jax.debug.callback(_progress_tick, 1 + indices[-1] + 1, values)
            return None, values

        indices = jnp.arange(num_full * chunk_size).reshape(num_full, chunk_size)
        parts.append(jax.lax.scan(body, None, indices)[1].reshape(-1))
    if rem:
        parts.append(jax.vmap(one)(jnp.arange(num_full * chunk_size, total)))
    delta = jnp.zeros((sigmas.shape[0], num_draws), base.dtype)
    if parts:
        values = jnp.concatenate(parts).reshape(active.shape[0], num_draws)
        delta = delta.at[active].set(values - base)
    mean = jnp.mean(delta, axis=1)
    if num_draws > 1:
        stderr = jnp.std(delta, axis=1, ddof=1) / math.sqrt(num_draws)
    else:
        stderr = jnp.full_like(mean, jnp.nan)
    return LocalEnergy(sigmas, mean, stderr, base)


_local_energy_jit = jax.jit(
    _local_energy_core,
    static_argnames=("energy_fn", "num_draws", "noise", "mask", "chunk_size", "progress"),
)


def _local_energy_run(
    energy_fn, params, energy_args, sigmas, key, *, num_draws, noise, mask, chunk_size, progress
):
    """One compiled call: the base, then the σ > 0 draws in vmapped chunks of ``chunk_size``."""
    active = np.flatnonzero(sigmas > 0).astype(np.int32)
    total = active.size * num_draws
    report = _Progress(progress, "local_energy", 1 + total, " evaluations")
    _ACTIVE_REPORTS.append(report)
    try:
        result = _local_energy_jit(
            energy_fn,
            params,
            energy_args,
            jnp.asarray(sigmas, jnp.float32),
            jnp.asarray(active),
            key,
            num_draws=num_draws,
            noise=noise,
            mask=mask,
            chunk_size=max(1, min(chunk_size, total)),
            progress=report.on,
        )
        if report.on:
            jax.block_until_ready(result)
            report(1 + total)
    finally:
        _ACTIVE_REPORTS.remove(report)
    return result


def _num_params(params) -> int:
    return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree_util.tree_leaves(params))


def _default_chunk_size(
    num_params: int, examples_per_pass: int, total: int, has_conv: bool = False
) -> int:
    """Draws evaluated together by one ``vmap``.

    Heuristic: a chunk's work per forward pass, ``chunk × params × batch``
    (≈ multiply-adds of a dense network), stays under 2²⁶ on CPU (larger
    chunks spill the batched activations out of cache) and 2³⁰ on GPU/TPU,
    and the perturbed parameter copies ``chunk × params`` under 2²⁸ floats
    (1 GiB in float32). On CPU a convolutional network gets chunks of 1:
    XLA:CPU runs a convolution vmapped over weight copies as a grouped
    convolution, 4-6× slower than the separate passes (measured:
    experiments/benchmarks/hessian_bench.py).
    """
    if has_conv and jax.default_backend() == "cpu":
        return 1
    num_params = max(num_params, 1)
    budget = _CHUNK_WORK_BUDGET.get(jax.default_backend(), _CHUNK_WORK_BUDGET_ACCELERATOR)
    by_work = budget // (num_params * max(examples_per_pass, 1))
    by_memory = _CHUNK_PARAM_BUDGET // num_params
    return int(max(1, min(total, by_work, by_memory)))


def _validate_local_energy_args(sigmas, key, num_draws, noise, chunk_size):
    sigmas = _check_sigmas(sigmas)
    if key is None:
        raise ValueError("key is required: pass a jax.random key for the noise draws.")
    num_draws = _check_positive_int("num_draws", num_draws)
    _check_choice("noise", noise, _NOISES)
    if chunk_size is not None:
        chunk_size = _check_positive_int("chunk_size", chunk_size)
    return sigmas, num_draws, chunk_size


def local_energy_fn(
    energy_fn: Callable[[Any], jnp.ndarray],
    params: Any,
    sigmas: Any,
    *,
    key: jax.Array,
    num_draws: int = 100,
    noise: str = "multiplicative",
    perturb: str | Callable = "all",
    chunk_size: int | None = None,
    progress: bool | Callable[[str], Any] = False,
) -> LocalEnergy:
    r"""Local energy of any scalar energy of the parameters.

    .. math::
      δE(w, σ) = \mathbb{E}_z[E(w ⊙ (1 + σ z))] − E(w)  \quad\text{(multiplicative)},
      \qquad δE(w, σ) = \mathbb{E}_z[E(w + σ z)] − E(w)  \quad\text{(additive)},

    z ~ N(0, I), estimated with M = ``num_draws`` draws per σ (the same draws
    at every σ). For small σ and additive noise δE ≈ ½σ² tr ∇²E; for
    multiplicative noise δE ≈ ½σ² Σᵢ (∇²E)ᵢᵢ wᵢ². The draws are evaluated by
    ``jax.vmap`` in chunks of ``chunk_size`` (``lax.scan`` over chunks), in
    one jitted call; σ = 0 is δE = 0 exactly and costs nothing.

    Args:
      energy_fn: ``energy_fn(params) -> scalar``, jittable and vmappable, e.g.
        a :func:`dataset_loss` (its data then enter the compiled program as
        arguments). For repeated calls pass the same function object: the
        compiled program is cached on it.
      params: the parameter pytree w (finite).
      sigmas: noise level σ ≥ 0, a scalar or a 1-D grid ``[S]``.
      key: a ``jax.random`` key for the noise.
      num_draws: M ≥ 1, noise draws per σ.
      noise: ``"multiplicative"`` (default; invariant to the rescalings that
        leave a ReLU/BatchNorm network unchanged) or ``"additive"``.
      perturb: which leaves to perturb: ``"all"``, ``"no_bias_bn"`` (skip leaves
        named ``bias`` or ``scale``: biases and normalisation scale/shift), or a
        predicate ``(path: tuple[str, ...], leaf) -> bool``.
      chunk_size: draws per vectorised chunk; default from a heuristic on the
        parameter count (``chunk × params ≤ 2²⁸`` floats).
      progress: ``True`` prints a line every few seconds to stderr
        (evaluations done), a callable receives the line instead.

    Returns:
      :class:`LocalEnergy` ``(sigmas, mean, stderr, base)``.

    Example:
      >>> import flatjax
      >>> import jax, jax.numpy as jnp
      >>> energy = lambda w: 0.5 * jnp.sum(w**2)  # tr H = 3
      >>> le = flatjax.local_energy_fn(energy, jnp.zeros(3), [0.0, 0.1],
      ...                              key=jax.random.PRNGKey(0), noise="additive")
      >>> le.mean.shape, float(le.mean[0])
      ((2,), 0.0)

    References:
      Pittorino et al., "Entropic gradient descent algorithms and wide flat
      minima", ICLR 2021, arXiv 2006.07897.
    """
    if not callable(energy_fn):
        raise TypeError(f"energy_fn must be callable, got {type(energy_fn).__name__}.")
    sigmas, num_draws, chunk_size = _validate_local_energy_args(
        sigmas, key, num_draws, noise, chunk_size
    )
    mask = _perturb_mask(params, perturb)
    _check_finite_params(params)
    fn, args = _loss_parts(energy_fn)
    if chunk_size is None:
        per_pass, has_conv = 1, False
        if isinstance(energy_fn, _DatasetLoss):
            per_pass, has_conv = energy_fn.batches.x.shape[1], energy_fn.energy.has_conv
        chunk_size = _default_chunk_size(
            _num_params(params), per_pass, sigmas.size * num_draws, has_conv
        )
    return _local_energy_run(
        fn, params, args, sigmas, key, num_draws=num_draws, noise=noise, mask=mask,
        chunk_size=chunk_size, progress=progress,
    )  # fmt: skip


def local_energy(
    apply_fn: Callable,
    variables: Mapping[str, Any],
    data: Any,
    sigmas: Any,
    *,
    key: jax.Array,
    num_draws: int = 100,
    noise: str = "multiplicative",
    metric: str = "error",
    batch_size: int = 1000,
    chunk_size: int | None = None,
    perturb: str | Callable = "all",
    progress: bool | Callable[[str], Any] = False,
) -> LocalEnergy:
    r"""Local energy of a trained network over a whole dataset (Pittorino et al. 2021).

    .. math::
      δE(w, σ) = \mathbb{E}_z\big[E_{\rm train}(w ⊙ (1 + σ z))\big] − E_{\rm train}(w),
      \qquad z \sim N(0, I),

    where w = ``variables["params"]`` (only these are perturbed; BatchNorm
    ``batch_stats`` stay frozen), E_train is the classification error in
    percent (``metric="error"``, the paper's choice) or the mean
    cross-entropy (``metric="loss"``) over ALL of ``data``, and the
    expectation is estimated with M = ``num_draws`` draws (the same z at every
    σ). ``noise="additive"`` uses w + σz instead. The authors' protocol: σ on a
    grid in [0, 0.1], M = 100, all parameters perturbed, training set.

    Cost: one unperturbed pass plus M per σ > 0 (σ = 0 is δE = 0 exactly).
    The perturbed networks are evaluated by ``jax.vmap`` over draws in
    chunks, each chunk streaming the dataset once in equal padded batches of
    at most ``batch_size`` (``lax.scan``), all inside one jitted call; the
    program is cached on ``apply_fn`` and the shapes, so reuse the same
    function object across calls.

    Args:
      apply_fn: ``apply_fn(variables, x) -> logits [batch, classes]`` in eval
        mode, e.g. ``lambda v, x: model.apply(v, x, train=False)``.
      variables: Flax variables with a ``"params"`` collection (finite).
      data: ``(x, y)`` or ``{"image": x, "label": y}``, integer labels ``[n]``
        in ``[0, classes)``, finite inputs.
      sigmas: σ ≥ 0, a scalar or a 1-D grid ``[S]``.
      key: a ``jax.random`` key for the noise.
      num_draws: M ≥ 1, noise draws per σ.
      noise: ``"multiplicative"`` (default) or ``"additive"``.
      metric: ``"error"`` (percent misclassified) or ``"loss"``.
      batch_size: largest number of examples per forward pass.
      chunk_size: draws evaluated together by one ``vmap``. Default: the
        largest chunk with ``chunk × params × batch`` (work of a dense
        forward pass) ≤ 2²⁶ on CPU, 2³⁰ on GPU/TPU, and ``chunk × params ≤
        2²⁸``, and 1 on CPU for a network with convolutions (XLA:CPU runs
        vmapped convolutions as slow grouped ones); lower it if memory runs
        out (e.g. convolutional nets with large activations), raise it to
        fill a large accelerator.
      perturb: ``"all"`` (default), ``"no_bias_bn"`` (skip biases and
        normalisation scale/shift, i.e. leaves named ``bias``/``scale``) or a
        predicate ``(path: tuple[str, ...], leaf) -> bool``.
      progress: ``True`` prints a line every few seconds to stderr
        (evaluations done), a callable receives the line instead.

    Returns:
      :class:`LocalEnergy` ``(sigmas, mean, stderr, base)``; ``base`` is
      E_train(w) in the chosen metric.

    Raises:
      ValueError: NaN or inf in the inputs or the params, or a label that is
        not a class index of the logits (besides malformed arguments).

    Example:
      >>> import flatjax
      >>> import jax, jax.numpy as jnp
      >>> apply_fn = lambda v, x: x @ v["params"]["w"]
      >>> variables = {"params": {"w": jnp.eye(2)}}
      >>> x, y = jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.array([0, 1])
      >>> le = flatjax.local_energy(apply_fn, variables, (x, y), [0.0, 0.05],
      ...                           key=jax.random.PRNGKey(0), num_draws=8)
      >>> float(le.base), float(le.mean[0])
      (0.0, 0.0)

    References:
      Pittorino et al., "Entropic gradient descent algorithms and wide flat
      minima", ICLR 2021, arXiv 2006.07897, Sec. 4.
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}.")
    _check_variables(variables)
    sigmas, num_draws, chunk_size = _validate_local_energy_args(
        sigmas, key, num_draws, noise, chunk_size
    )
    energy, other, batches = _dataset_parts(apply_fn, variables, data, batch_size, metric)
    params = variables["params"]
    mask = _perturb_mask(params, perturb)
    _check_finite_params(params)
    if chunk_size is None:
        chunk_size = _default_chunk_size(
            _num_params(params), batches.x.shape[1], sigmas.size * num_draws, energy.has_conv
        )
    return _local_energy_run(
        energy, params, (other, batches), sigmas, key, num_draws=num_draws, noise=noise,
        mask=mask, chunk_size=chunk_size, progress=progress,
    )  # fmt: skip


# ---------------------------------------------------------------------------
# Hessian-vector products, spectrum, trace, sharpness.


def _hvp_acc(term, params, v, acc, *args):
    """``acc + ∇²T(w) v`` on flat vectors, T = ``term(·, *args)``; ``v`` ``[d]`` or ``[c, d]``."""
    _, unravel = ravel_pytree(params)
    grad = jax.grad(lambda p: term(p, *args))

    def one(t):
        tangent = unravel(t.astype(acc.dtype))
        return ravel_pytree(jax.jvp(grad, (params,), (tangent,))[1])[0]

    return acc + (jax.vmap(one)(v) if v.ndim == 2 else one(v))


_hvp_acc_jit = jax.jit(_hvp_acc, static_argnums=0)


class _HessianOperator:
    """v ↦ ∇²L(w) v on flat vectors, from one compiled HVP reused for every call.

    For a :func:`dataset_loss` the compiled program is the HVP of one batch's
    share of L, called once per batch and accumulated (XLA:CPU runs HVPs in a
    ``lax.scan`` up to 2× slower than separate calls); for any other loss it
    is the HVP of the loss itself. The cache is keyed on the loss's code
    (``apply_fn``) and the shapes, so repeated calls do not compile again.
    """

    def __init__(self, loss_fn: Callable, params: Any):
        if isinstance(loss_fn, _DatasetLoss):
            self.term = loss_fn.energy.term
            self.args = [(loss_fn.other_vars, *batch) for batch in loss_fn.batch_list()]
        else:
            self.term, self.args = _static(loss_fn), [()]
        self.params = params
        self.flat, self.unravel = ravel_pytree(params)

    @property
    def dim(self) -> int:
        return int(self.flat.size)

    def __call__(self, v: jnp.ndarray) -> jnp.ndarray:
        acc = jnp.zeros(v.shape, self.flat.dtype)
        for args in self.args:
            acc = _hvp_acc_jit(self.term, self.params, v, acc, *args)
        return acc


def _is_traced(tree) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))


def hvp(loss_fn: Callable[[Any], jnp.ndarray], params: Any, v: Any) -> Any:
    r"""Hessian-vector product ∇²L(w) v, forward-over-reverse.

    Computes ``jvp(grad(L), (w,), (v,))``: one gradient's cost (about 3×),
    never forming the Hessian. The product is jitted once per loss (cached on
    the function object, or for a :func:`dataset_loss` on its ``apply_fn``
    and batch shape, the batches accumulated one compiled call each), so
    repeated products do not trace or compile again. Inside a trace (e.g.
    under the caller's ``jit``) it is the plain ``jvp`` expression.

    Args:
      loss_fn: ``loss_fn(params) -> scalar`` L.
      params: the point w (a pytree).
      v: the direction, a pytree with the structure and leaf shapes of ``params``.

    Returns:
      ∇²L(w) v, with the structure of ``params``.

    Raises:
      ValueError: ``v`` differs from ``params`` in tree structure or a leaf shape.

    Example:
      >>> import flatjax
      >>> import jax.numpy as jnp
      >>> loss = lambda w: jnp.sum(jnp.array([1.0, 2.0]) * w**2)  # H = diag(2, 4)
      >>> flatjax.hvp(loss, jnp.zeros(2), jnp.ones(2))
      Array([2., 4.], dtype=float32)

    References:
      Pearlmutter, "Fast exact multiplication by the Hessian", Neural
      Computation 6(1), 1994.
    """
    _check_like_params(v, params)
    if _is_traced((params, v)):
        return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]
    op = _HessianOperator(loss_fn, params)
    return op.unravel(op(ravel_pytree(v)[0].astype(op.flat.dtype)))


def _check_like_params(v: Any, params: Any) -> None:
    """Raises unless ``v`` has the tree structure and leaf shapes of ``params``."""
    v_tree, p_tree = jax.tree.structure(v), jax.tree.structure(params)
    if v_tree != p_tree:
        raise ValueError(
            f"v must have the tree structure and shapes of params; got v with structure "
            f"{v_tree}, params with structure {p_tree}."
        )
    paths = jax.tree_util.tree_leaves_with_path(params)
    for (path, p_leaf), v_leaf in zip(paths, jax.tree.leaves(v), strict=True):
        if jnp.shape(v_leaf) != jnp.shape(p_leaf):
            where = f" at {jax.tree_util.keystr(path)}" if path else ""
            raise ValueError(
                f"v must have the tree structure and shapes of params; v has shape "
                f"{jnp.shape(v_leaf)}{where} where params has shape {jnp.shape(p_leaf)}."
            )


def _check_key(key: Any, what: str) -> None:
    if key is None:
        raise ValueError(f"key is required: pass a jax.random key for {what}.")


class HessianEigen(NamedTuple):
    """Result of :func:`hessian_top_eigenvalue`.

    Attributes:
      eigenvalue: the Rayleigh quotient vᵀHv of the final iterate v.
      eigenvector: that unit-norm iterate v, a pytree like ``params``.
      num_iters: int32, power iterations run (= HVPs computed).
    """

    eigenvalue: jnp.ndarray
    eigenvector: Any
    num_iters: jnp.ndarray


def _flat_loss(loss_fn, params, loss_args=()):
    flat, unravel = ravel_pytree(params)
    return (lambda w: loss_fn(unravel(w), *loss_args)), flat, unravel


@jax.jit
def _unit_normal(key, like):
    v = jax.random.normal(key, like.shape, like.dtype)
    return v / jnp.linalg.norm(v)


@jax.jit
def _power_step(v, hv):
    lam = jnp.vdot(v, hv)
    norm = jnp.linalg.norm(hv)
    # A zero Hessian has every vector as eigenvector: keep v rather than NaN.
    return jnp.where(norm > 0, hv / jnp.where(norm > 0, norm, 1.0), v), lam


def hessian_top_eigenvalue(
    loss_fn: Callable[[Any], jnp.ndarray],
    params: Any,
    *,
    key: jax.Array,
    num_iters: int = 200,
    tol: float = 1e-6,
    progress: bool | Callable[[str], Any] = False,
) -> HessianEigen:
    r"""Largest-magnitude Hessian eigenvalue by power iteration.

    .. math::
      λ_k = v_kᵀ H v_k, \qquad v_{k+1} = \frac{H v_k}{\|H v_k\|},
      \qquad H = ∇²L(w),

    from a random Gaussian unit v₁, stopping when abs(λ_k − λ_{k−1}) ≤ tol·abs(λ_k)
    or after ``num_iters`` iterations; it returns (λ_k, v_k). Each iteration
    is one HVP: a single jitted HVP (for a :func:`dataset_loss`, one per
    batch, accumulated) compiled once and called from a Python loop, so the
    cost is that of the HVPs plus one small host read of λ_k per iteration.
    It converges to the eigenvalue of largest abs(λ), which at a minimum is the
    top (sharpest) one; the rate is the ratio of the two largest abs(λ).

    Args:
      loss_fn: ``loss_fn(params) -> scalar``, e.g. from :func:`dataset_loss`.
      params: the point w.
      key: a ``jax.random`` key for v₁.
      num_iters: maximum number of iterations (≥ 1).
      tol: relative tolerance on successive Rayleigh quotients (> 0).
      progress: ``True`` prints a line every few seconds to stderr
        (iteration, λ), a callable receives the line instead.

    Returns:
      :class:`HessianEigen` ``(eigenvalue, eigenvector, num_iters)``.

    Example:
      >>> import flatjax
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda w: jnp.sum(jnp.array([1.0, 3.0]) * w**2)  # H = diag(2, 6)
      >>> res = flatjax.hessian_top_eigenvalue(loss, jnp.zeros(2), key=jax.random.PRNGKey(0))
      >>> round(float(res.eigenvalue), 4)
      6.0
    """
    _check_key(key, "the starting vector v₁")
    num_iters = _check_positive_int("num_iters", num_iters)
    tol = _check_positive_float("tol", tol)
    report = _Progress(progress, "hessian_top_eigenvalue", num_iters)
    if _is_traced((params, key)):
        return _top_eig_traced(*_loss_parts(loss_fn), params, key, num_iters=num_iters, tol=tol)
    op = _HessianOperator(loss_fn, params)
    v = _unit_normal(key, op.flat)
    lam_prev = math.nan
    for i in range(1, num_iters + 1):
        new_v, lam = _power_step(v, op(v))
        lam_host = float(lam)
        report(i, f"λ = {lam_host:.6g}")
        if i >= 2 and abs(lam_host - lam_prev) <= tol * abs(lam_host):
            break
        if i < num_iters:
            v, lam_prev = new_v, lam_host
    if report.on and i < num_iters:
        report.emit(f"hessian_top_eigenvalue: converged after {i} iterations, λ = {lam_host:.6g}")
    return HessianEigen(lam, op.unravel(v), jnp.int32(i))


def _top_eig_traced(loss_fn, loss_args, params, key, *, num_iters, tol):
    """The same power iteration inside the caller's trace, as one ``lax.while_loop``."""
    f, flat, unravel = _flat_loss(loss_fn, params, loss_args)
    hv = lambda v: jax.jvp(jax.grad(f), (flat,), (v,))[1]

    def cond(state):
        i, _, _, lam, lam_prev = state
        return (i < num_iters) & ((i < 2) | (jnp.abs(lam - lam_prev) > tol * jnp.abs(lam)))

    def body(state):
        i, v, new_v, lam, _ = state
        v = jnp.where(i > 0, new_v, v)
        new_v, new_lam = _power_step(v, hv(v))
        return i + 1, v, new_v, new_lam, lam

    v0 = _unit_normal(key, flat)
    zero = jnp.zeros((), flat.dtype)
    i, v, _, lam, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), v0, v0, zero, zero))
    return HessianEigen(lam, unravel(v), i)


class HessianTrace(NamedTuple):
    """Hutchinson estimate of tr ∇²L.

    Attributes:
      mean: the estimate, the mean of vᵀHv over the probes.
      stderr: its standard error (sample std over probes, ddof = 1, over
        √num_samples; NaN for a single probe).
    """

    mean: jnp.ndarray
    stderr: jnp.ndarray


@jax.jit
def _rademacher(keys, like):
    return jax.vmap(lambda k: jax.random.rademacher(k, like.shape, like.dtype))(keys)


@jax.jit
def _quad_forms(v, hv):
    return jnp.sum(v * hv, axis=-1)


def hessian_trace(
    loss_fn: Callable[[Any], jnp.ndarray],
    params: Any,
    *,
    key: jax.Array,
    num_samples: int = 100,
    chunk_size: int | None = None,
    progress: bool | Callable[[str], Any] = False,
) -> HessianTrace:
    r"""Hutchinson estimate of the Hessian trace with Rademacher probes.

    .. math::
      \operatorname{tr} H ≈ \frac{1}{K} \sum_{k=1}^{K} v_kᵀ H v_k,
      \qquad v_k ∈ \{−1, +1\}^d \text{ uniform},

    unbiased, with per-probe variance 2 Σ_{i≠j} H_ij² (exact for a diagonal
    H). K = ``num_samples`` probes, ``chunk_size`` of them vmapped through
    one jitted HVP (for a :func:`dataset_loss`, one per batch, accumulated),
    compiled once and called ⌈K / chunk⌉ times.

    Args:
      loss_fn: ``loss_fn(params) -> scalar``, e.g. from :func:`dataset_loss`.
      params: the point w.
      key: a ``jax.random`` key for the probes.
      num_samples: K ≥ 1, number of probes.
      chunk_size: probes per vmapped HVP call. Default: 1 on CPU (XLA:CPU
        gains nothing from batching the probes of a convolutional network),
        elsewhere as many as fit 2²⁸ floats of probes.
      progress: ``True`` prints a line every few seconds to stderr, a
        callable receives the line instead.

    Returns:
      :class:`HessianTrace` ``(mean, stderr)``.

    Example:
      >>> import flatjax
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda w: jnp.sum(jnp.array([1.0, 3.0]) * w**2)  # tr H = 8
      >>> float(flatjax.hessian_trace(loss, jnp.zeros(2), key=jax.random.PRNGKey(0)).mean)
      8.0

    References:
      Hutchinson, "A stochastic estimator of the trace of the influence
      matrix", Comm. Stat. Simul. Comput. 18(3), 1989.
    """
    _check_key(key, "the Rademacher probes")
    num_samples = _check_positive_int("num_samples", num_samples)
    if _is_traced((params, key)):
        if chunk_size is not None:
            _check_positive_int("chunk_size", chunk_size)
        return _trace_traced(*_loss_parts(loss_fn), params, key, num_samples=num_samples)
    op = _HessianOperator(loss_fn, params)
    if chunk_size is not None:
        chunk_size = _check_positive_int("chunk_size", chunk_size)
    elif jax.default_backend() == "cpu":
        chunk_size = 1
    else:
        chunk_size = _default_chunk_size(op.dim, 1, num_samples)
    chunk = min(chunk_size, num_samples)
    num_chunks = -(-num_samples // chunk)
    # A fixed chunk shape (the last chunk's extra probes are dropped): one program.
    keys = jax.random.split(key, num_chunks * chunk)
    report = _Progress(progress, "hessian_trace", num_samples)
    values = []
    for c in range(num_chunks):
        v = _rademacher(keys[c * chunk : (c + 1) * chunk], op.flat)
        if chunk == 1:
            v = v[0]
        values.append(_quad_forms(v, op(v)).reshape(-1))
        if report.on:
            values[-1].block_until_ready()
            report(min((c + 1) * chunk, num_samples))
    values = jnp.concatenate(values)[:num_samples]
    return _trace_estimate(values)


def _trace_estimate(values) -> HessianTrace:
    """Hutchinson's mean over the probes' vᵀHv and its standard error (NaN for one probe)."""
    mean = jnp.mean(values)
    if values.shape[0] > 1:
        stderr = jnp.std(values, ddof=1) / math.sqrt(values.shape[0])
    else:
        stderr = jnp.full_like(mean, jnp.nan)
    return HessianTrace(mean, stderr)


def _trace_traced(loss_fn, loss_args, params, key, *, num_samples):
    """The same estimate inside the caller's trace, probes by ``lax.map``."""
    f, flat, _ = _flat_loss(loss_fn, params, loss_args)
    keys = jax.random.split(key, num_samples)
    values = jax.lax.map(
        lambda v: jnp.vdot(v, jax.jvp(jax.grad(f), (flat,), (v,))[1]), _rademacher(keys, flat)
    )
    return _trace_estimate(values)


def sam_sharpness(
    loss_fn: Callable[[Any], jnp.ndarray],
    params: Any,
    rho: float,
    *,
    num_steps: int = 1,
) -> jnp.ndarray:
    r"""SAM sharpness: the loss increase at the worst point of a ρ-ball, estimated.

    .. math::
      S_ρ(w) = \max_{\|ε\| ≤ ρ} L(w + ε) − L(w).

    ``num_steps = 1`` is SAM's first-order solution ε = ρ g/‖g‖, g = ∇L(w)
    (Foret et al. 2021); on L = ½wᵀHw it gives ρ‖Hw‖ + ½ρ² gᵀHg/‖g‖². With
    ``num_steps = K > 1`` it continues with K − 1 projected normalised ascent
    steps ε ← Π_ρ(ε + ρ ∇L(w+ε)/‖∇L(w+ε)‖) (Π_ρ: rescale onto the ball if
    outside) and returns the largest increase seen, so the result never
    decreases with K. Every estimate is a lower bound of S_ρ; for a quadratic
    S_ρ ≤ ρ‖g‖ + ½ρ²λ_max. A zero gradient gives ε = 0 (no NaN).

    Args:
      loss_fn: ``loss_fn(params) -> scalar``, e.g. from :func:`dataset_loss`.
      params: the point w.
      rho: radius ρ > 0 of the ball (Euclidean norm over all parameters).
      num_steps: K ≥ 1 ascent steps.

    Returns:
      The estimated S_ρ(w), a scalar.

    Example:
      >>> import flatjax
      >>> import jax.numpy as jnp
      >>> loss = lambda w: 0.5 * jnp.sum(w**2)  # g = w, H = I
      >>> float(flatjax.sam_sharpness(loss, jnp.array([3.0, 4.0]), 0.1))  # 0.1·5 + 0.005
      0.505...

    References:
      Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
      Generalization", ICLR 2021, arXiv 2010.01412.
    """
    rho = _check_positive_float("rho", rho)
    num_steps = _check_positive_int("num_steps", num_steps)
    fn, args = _loss_parts(loss_fn)
    return _sam_jit(fn, params, args, rho, num_steps=num_steps)


def _sam(loss_fn, params, loss_args, rho, *, num_steps):
    f, flat, _ = _flat_loss(loss_fn, params, loss_args)
    base = f(flat)

    def unit(g):
        norm = jnp.linalg.norm(g)
        return jnp.where(norm > 0, g / jnp.where(norm > 0, norm, 1.0), 0.0)

    eps = rho * unit(jax.grad(f)(flat))
    best = f(flat + eps) - base

    def body(_, carry):
        eps, best = carry
        eps = eps + rho * unit(jax.grad(f)(flat + eps))
        norm = jnp.linalg.norm(eps)
        eps = eps * jnp.minimum(1.0, rho / jnp.where(norm > 0, norm, 1.0))
        return eps, jnp.maximum(best, f(flat + eps) - base)

    _, best = jax.lax.fori_loop(1, num_steps, body, (eps, best))
    return best


_sam_jit = jax.jit(_sam, static_argnames=("loss_fn", "num_steps"))


# ---------------------------------------------------------------------------
# Local entropy.


class LocalEntropy(NamedTuple):
    r"""Thermodynamic-integration estimate of the local entropy F(w̃; γ).

    Attributes:
      value: F(w̃; γ) = log ∫ dw exp(−L(w) − (γ/2)‖w − w̃‖²), un-normalised.
      normalized: F + (d/2) log(γ/2π) = log E_{w∼N(w̃, I/γ)}[e^{−L(w)}], the
        log of the average of e^{−L} over a Gaussian around w̃ (0 for a zero
        loss, → −L(w̃) as γ → ∞). Same error as ``value``.
      stderr: statistical standard error (chains and anchor samples); the
        quadrature error of the γ ladder is not included.
      couplings: the γ ladder, increasing, ``[K]``; ``couplings[0]`` is γ.
      mean_sq_distance: ⟨‖w − w̃‖²⟩_γ on each rung, ``[K]``.
      mean_sq_distance_stderr: its standard error over chains, ``[K]``.
      acceptance: mean Metropolis acceptance rate per rung (1 for ULA), ``[K]``.
      anchor: estimate of the normalised F at the top rung γ_max.
    """

    value: jnp.ndarray
    normalized: jnp.ndarray
    stderr: jnp.ndarray
    couplings: jnp.ndarray
    mean_sq_distance: jnp.ndarray
    mean_sq_distance_stderr: jnp.ndarray
    acceptance: jnp.ndarray
    anchor: jnp.ndarray


def local_entropy(
    loss_fn: Callable[[Any], jnp.ndarray],
    params: Any,
    coupling: float,
    *,
    key: jax.Array,
    gamma_max: float | None = None,
    num_rungs: int = 16,
    num_chains: int = 16,
    num_steps: int = 1000,
    burn_in: int | None = None,
    sampler: str = "mala",
    step_fraction: float | None = None,
    curvature: float | None = None,
    num_anchor_samples: int = 1000,
) -> LocalEntropy:
    r"""Local entropy of a point w̃ by thermodynamic integration over γ.

    .. math::
      F(w̃; γ) = \log \int dw\, e^{−L(w) − \frac{γ}{2}\|w − w̃\|^2},
      \qquad \frac{∂F}{∂γ} = −\tfrac12 ⟨\|w − w̃\|^2⟩_γ,

    with ⟨·⟩_γ the Gibbs measure P(w|w̃) ∝ exp(−L(w) − (γ/2)‖w − w̃‖²)
    (the definition above). Working with the normalised G(γ) = F + (d/2) log(γ/2π)
    = log E_{N(w̃, I/γ)}[e^{−L}], whose derivative vanishes as γ → ∞,

    .. math::
      G(γ) = G(γ_{\max}) − \tfrac12 \int_{\log γ}^{\log γ_{\max}}
             \big(d − γ'⟨\|w − w̃\|^2⟩_{γ'}\big)\, d\log γ'.

    - The integral runs over a ladder of K = ``num_rungs`` couplings,
      log-spaced from γ = ``coupling`` to ``gamma_max``, by the trapezoid rule
      in log γ. On each rung ``num_chains`` independent Langevin chains
      (vmapped) sample P(w|w̃) for ``num_steps`` steps, the first ``burn_in``
      discarded; ⟨‖w − w̃‖²⟩ is the average over the rest.
    - Anchor: at γ_max the Gaussian N(w̃, I/γ_max) is so narrow that L varies
      little over it, and G(γ_max) = log mean_j e^{−L(w̃ + z_j/√γ_max)} over
      ``num_anchor_samples`` draws is accurate (Laplace limit: G ≈ −L(w̃) +
      (‖∇L‖² − tr ∇²L)/(2γ_max)).
    - Sampler: ``"mala"`` (default), Metropolis-adjusted Langevin, exact for
      the target; its step size starts at η = ``step_fraction``/(γ + λ) with λ
      = ``curvature`` and adapts during burn-in towards 57% acceptance, then
      stays fixed. ``"ula"``, the unadjusted Langevin (SGLD with the full loss)
      w ← w − η∇U(w) + √(2η) ξ with η = ``step_fraction``/(γ + λ) fixed, has
      a discretisation bias: for a Gaussian target of precision A it samples
      covariance (A − ηA²/2)⁻¹, inflating ⟨‖w − w̃‖²⟩ by O(η) and F with it.
    - Error: ``stderr`` combines the chain-to-chain standard errors of the
      rung averages (propagated through the trapezoid weights) and the
      anchor's delta-method error; it assumes burn-in reached equilibrium and
      leaves out the quadrature error (raise ``num_rungs`` to check it).

    Cost: ``num_rungs × num_chains × num_steps`` gradient evaluations plus
    ``num_anchor_samples`` losses, all in one jitted call (rungs run one after
    the other, chains vmapped).

    The Gibbs measure is exp(−L) at temperature 1 with L = ``loss_fn``: for a
    network, pass the loss at the scale you mean (e.g. n × mean cross-entropy,
    or β·L). The sampler works on the flattened parameter vector (d entries).

    Args:
      loss_fn: ``loss_fn(params) -> scalar`` L, full-batch or on fixed data
        (e.g. from :func:`dataset_loss`), differentiable.
      params: the point w̃.
      coupling: γ > 0.
      key: a ``jax.random`` key.
      gamma_max: top of the ladder (> γ). Default: max(100γ, 100‖∇L(w̃)‖²,
        10√d λ), so that L varies by ≲ 0.1 over N(w̃, I/γ_max).
      num_rungs: K ≥ 2 couplings in the ladder.
      num_chains: chains per rung (≥ 2, for the error estimate).
      num_steps: Langevin steps per chain, burn-in included.
      burn_in: steps discarded; default ``num_steps // 2``.
      sampler: ``"mala"`` or ``"ula"``.
      step_fraction: η·(γ + λ), in (0, 2); default 0.5 for MALA (the
        starting point of the adaptation) and 0.01 for ULA (small, to keep
        its O(η) bias down: on a quadratic ULA overestimates F by up to
        step_fraction·d/4 nats per unit of log γ on the ladder).
      curvature: λ, the scale of ∇²L (its top eigenvalue); default
        the absolute value of :func:`hessian_top_eigenvalue` at w̃ (50 iterations).
      num_anchor_samples: Gaussian draws for the anchor at γ_max (≥ 2).

    Returns:
      :class:`LocalEntropy`; ``value`` is F, ``normalized`` is F + (d/2)
      log(γ/2π).

    Example:
      >>> import flatjax
      >>> import jax, jax.numpy as jnp
      >>> loss = lambda w: 0.5 * jnp.sum(w**2)  # F = log(2π/(1+γ)) for d = 2
      >>> res = flatjax.local_entropy(loss, jnp.zeros(2), 1.0, key=jax.random.PRNGKey(0),
      ...                             num_rungs=8, num_steps=200)
      >>> abs(float(res.value) - float(jnp.log(jnp.pi))) < 0.1
      True

    References:
      Baldassi et al., "Shaping the learning landscape in neural networks
      around wide flat minima", PNAS 117(1):161, 2020; Chaudhari et al.,
      "Entropy-SGD", arXiv 1611.01838; Roberts & Tweedie, "Exponential
      convergence of Langevin distributions", Bernoulli 2(4), 1996 (MALA).
    """
    coupling = _check_positive_float("coupling", coupling)
    num_rungs = _check_positive_int("num_rungs", num_rungs)
    if num_rungs < 2:
        raise ValueError(f"num_rungs must be >= 2, got {num_rungs}.")
    num_chains = _check_positive_int("num_chains", num_chains)
    if num_chains < 2:
        raise ValueError(f"num_chains must be >= 2 (for the error estimate), got {num_chains}.")
    num_steps = _check_positive_int("num_steps", num_steps)
    burn_in = num_steps // 2 if burn_in is None else burn_in
    if (
        isinstance(burn_in, bool)
        or not isinstance(burn_in, (int, np.integer))
        or not (0 <= burn_in < num_steps)
    ):
        raise ValueError(
            f"burn_in must be an integer in [0, num_steps={num_steps}), got {burn_in!r}."
        )
    _check_choice("sampler", sampler, ("mala", "ula"))
    if step_fraction is None:
        step_fraction = 0.5 if sampler == "mala" else 0.01
    step_fraction = _check_positive_float("step_fraction", step_fraction)
    if step_fraction >= 2:
        raise ValueError(f"step_fraction must be in (0, 2) for a stable step, got {step_fraction}.")
    num_anchor_samples = _check_positive_int("num_anchor_samples", num_anchor_samples)
    if num_anchor_samples < 2:
        raise ValueError(f"num_anchor_samples must be >= 2, got {num_anchor_samples}.")
    if key is None:
        raise ValueError("key is required: pass a jax.random key for the chains.")

    key_eig, key_run = jax.random.split(key)
    if curvature is None:
        eig = hessian_top_eigenvalue(loss_fn, params, key=key_eig, num_iters=50, tol=1e-3)
        curvature = float(jnp.abs(eig.eigenvalue))
    else:
        curvature = float(curvature)
        if not math.isfinite(curvature) or curvature < 0:
            raise ValueError(f"curvature must be a finite number >= 0, got {curvature}.")
    flat, _ = ravel_pytree(params)
    dim = flat.size
    if gamma_max is None:
        grad_sq = float(_grad_sq_jit(*_loss_parts(loss_fn), params))
        gamma_max = max(100.0 * coupling, 100.0 * grad_sq, 10.0 * math.sqrt(dim) * curvature)
    gamma_max = _check_positive_float("gamma_max", gamma_max)
    if gamma_max <= coupling:
        raise ValueError(f"gamma_max must exceed coupling={coupling}, got {gamma_max}.")
    couplings = np.geomspace(coupling, gamma_max, num_rungs)
    fn, loss_args = _loss_parts(loss_fn)
    return _local_entropy_jit(
        fn,
        params,
        loss_args,
        jnp.asarray(couplings, jnp.float32),
        key_run,
        jnp.float32(curvature),
        jnp.float32(step_fraction),
        num_chains=num_chains,
        num_steps=num_steps,
        burn_in=int(burn_in),
        sampler=sampler,
        num_anchor_samples=num_anchor_samples,
    )


def _grad_sq(loss_fn, loss_args, params):
    return jnp.sum(ravel_pytree(jax.grad(loss_fn)(params, *loss_args))[0] ** 2)


_grad_sq_jit = jax.jit(_grad_sq, static_argnums=0)


def _local_entropy(
    loss_fn,
    params,
    loss_args,
    couplings,
    key,
    curvature,
    step_fraction,
    *,
    num_chains,
    num_steps,
    burn_in,
    sampler,
    num_anchor_samples,
):
    f, center, _ = _flat_loss(loss_fn, params, loss_args)
    dim = center.size
    mala = sampler == "mala"
    target_accept = 0.574

    def run_rung(args):
        gamma, rung_key = args
        potential = lambda w: f(w) + 0.5 * gamma * jnp.sum((w - center) ** 2)
        value_and_grad = jax.value_and_grad(potential)
        init_key, chain_key = jax.random.split(rung_key)
        w0 = center + jax.random.normal(init_key, (num_chains, dim)) / jnp.sqrt(gamma + curvature)
        u0, g0 = jax.vmap(value_and_grad)(w0)
        log_eta0 = jnp.log(step_fraction / (gamma + curvature))

        def step(carry, t):
            w, u, g, log_eta, sq_sum, acc_sum = carry
            eta = jnp.exp(log_eta)
            k_noise, k_accept = jax.random.split(jax.random.fold_in(chain_key, t))
            xi = jax.random.normal(k_noise, w.shape)
            prop = w - eta * g + jnp.sqrt(2 * eta) * xi
            u_p, g_p = jax.vmap(value_and_grad)(prop)
            if mala:
                fwd = jnp.sum((prop - w + eta * g) ** 2, axis=1)
                bwd = jnp.sum((w - prop + eta * g_p) ** 2, axis=1)
                log_alpha = u - u_p + (fwd - bwd) / (4 * eta)
                log_alpha = jnp.where(jnp.isfinite(log_alpha), log_alpha, -jnp.inf)
                accept = jnp.log(jax.random.uniform(k_accept, (num_chains,))) < log_alpha
                alpha = jnp.exp(jnp.minimum(log_alpha, 0.0))
                w = jnp.where(accept[:, None], prop, w)
                u = jnp.where(accept, u_p, u)
                g = jnp.where(accept[:, None], g_p, g)
                # Robbins-Monro on log η during burn-in only; frozen afterwards so the
                # sampling phase is a fixed, exact Markov kernel.
                rate = jnp.where(t < burn_in, 1.0 / jnp.sqrt(t + 1.0), 0.0)
                log_eta = log_eta + rate * (jnp.mean(alpha) - target_accept)
            else:
                w, u, g, alpha = prop, u_p, g_p, jnp.ones((num_chains,))
            keep = (t >= burn_in).astype(w.dtype)
            sq_sum = sq_sum + keep * jnp.sum((w - center) ** 2, axis=1)
            acc_sum = acc_sum + keep * jnp.mean(alpha)
            return (w, u, g, log_eta, sq_sum, acc_sum), None

        init = (w0, u0, g0, log_eta0, jnp.zeros((num_chains,)), jnp.zeros(()))
        (_, _, _, _, sq_sum, acc_sum), _ = jax.lax.scan(step, init, jnp.arange(num_steps))
        per_chain = sq_sum / (num_steps - burn_in)
        return (
            jnp.mean(per_chain),
            jnp.std(per_chain, ddof=1) / math.sqrt(num_chains),
            acc_sum / (num_steps - burn_in),
        )

    anchor_key, rungs_key = jax.random.split(key)
    rung_keys = jax.random.split(rungs_key, couplings.shape[0])
    msd, msd_se, acceptance = jax.lax.map(run_rung, (couplings, rung_keys))

    # Anchor: G(γ_max) = log E_{N(w̃, I/γ_max)} e^{−L}, by log-mean-exp.
    gamma_max = couplings[-1]
    z = jax.random.normal(anchor_key, (num_anchor_samples, dim))
    neg_loss = -jax.lax.map(
        f, center + z / jnp.sqrt(gamma_max), batch_size=min(64, num_anchor_samples)
    )
    anchor = jax.nn.logsumexp(neg_loss) - math.log(num_anchor_samples)
    ratio = jnp.exp(neg_loss - jnp.max(neg_loss))
    anchor_se = jnp.std(ratio, ddof=1) / (jnp.mean(ratio) * math.sqrt(num_anchor_samples))

    # G(γ) = G(γ_max) − ½ ∫ (d − γ'⟨‖Δ‖²⟩) d log γ', trapezoid on the ladder.
    log_g = jnp.log(couplings)
    widths = jnp.diff(log_g)
    weights = jnp.zeros_like(log_g).at[:-1].add(widths / 2).at[1:].add(widths / 2)
    integrand = 0.5 * (dim - couplings * msd)
    normalized = anchor - jnp.sum(weights * integrand)
    stderr = jnp.sqrt(jnp.sum((weights * 0.5 * couplings * msd_se) ** 2) + anchor_se**2)
    value = normalized - 0.5 * dim * jnp.log(couplings[0] / (2 * jnp.pi))
    return LocalEntropy(value, normalized, stderr, couplings, msd, msd_se, acceptance, anchor)


_local_entropy_jit = jax.jit(
    _local_entropy,
    static_argnames=(
        "loss_fn",
        "num_chains",
        "num_steps",
        "burn_in",
        "sampler",
        "num_anchor_samples",
    ),
)
