"""Hessian tools: Hessian-vector products, the top eigenvalue, the trace.

Every tool works through HVPs, never forming the Hessian; each compiles one
HVP (for a :func:`~flatjax.dataset_loss`, of one batch's share of the loss)
and reuses it for every iteration or probe.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from flatjax.flatness._checks import (
    _check_key,
    _check_like_params,
    _check_positive_float,
    _check_positive_int,
)
from flatjax.flatness._chunks import _default_chunk_size
from flatjax.flatness._data import _DatasetLoss, _flat_loss, _loss_parts, _static
from flatjax.flatness._progress import _Progress

__all__ = ["HessianEigen", "HessianTrace", "hvp", "hessian_top_eigenvalue", "hessian_trace"]


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
