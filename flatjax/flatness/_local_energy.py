"""Local energy δE(w, σ): the mean rise of the training error under weight noise.

The flatness measure of Pittorino et al. (ICLR 2021, arXiv 2006.07897) that
correlates with test error. Only ``variables["params"]`` is ever perturbed;
``batch_stats`` and any other collection are passed through untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from flatjax.flatness._checks import (
    _check_choice,
    _check_finite_params,
    _check_positive_int,
    _check_sigmas,
    _check_variables,
)
from flatjax.flatness._chunks import _default_chunk_size, _num_params
from flatjax.flatness._data import _dataset_parts, _DatasetLoss, _loss_parts
from flatjax.flatness._progress import _Progress

__all__ = ["LocalEnergy", "local_energy", "local_energy_fn"]

_NOISES = ("multiplicative", "additive")
_PERTURB_PRESETS = ("all", "no_bias_bn")


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
