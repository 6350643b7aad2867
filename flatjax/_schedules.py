"""Coupling schedules: how the elastic coupling γ grows during training.

Both Entropy-SGD and Replicated-SGD anneal the coupling γ upwards ("scoping"):
a small γ smooths the landscape, a large γ at the end makes the final network
a true minimiser of the loss, one that sits inside a wide flat region. The
schedules here are plain Optax schedules ``step -> γ``; they can be passed
wherever flatjax accepts a coupling.

All three go from ``init_value`` at step 0 to ``init_value * factor`` at
``total_steps``, optionally capped at ``max_value``, and hold their final
value after ``total_steps``. With ``steps_per_update > 1`` γ moves as a
staircase, once every ``steps_per_update`` steps (``steps_per_update =
steps_per_epoch`` gives the per-epoch growth of the authors' code).

References:
  Pittorino et al., Entropic gradient descent algorithms and wide flat minima,
  ICLR 2021, arXiv:2006.07897.
  Chaudhari et al., Entropy-SGD: biasing gradient descent into wide valleys,
  ICLR 2017, arXiv:1611.01838.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from flatjax._validation import check_finite

__all__ = ["exponential_coupling", "linear_coupling", "cosine_coupling"]


def _check(init_value, total_steps, factor, max_value, steps_per_update) -> int:
    """Validates the shared arguments; returns the number of γ updates n."""
    check_finite("init_value", init_value, strict=True)
    if not isinstance(total_steps, numbers.Integral) or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}.")
    check_finite("factor", factor, minimum=1)
    check_finite("max_value", max_value, strict=True, optional=True)
    if max_value is not None and max_value < init_value:
        # A cap below γ_0 would hold γ constant at the cap: no growth at all.
        raise ValueError(
            f"max_value must be >= init_value = {init_value!r} (a cap below the initial "
            f"coupling leaves no schedule), got {max_value!r}."
        )
    if not isinstance(steps_per_update, numbers.Integral) or not (
        1 <= steps_per_update <= total_steps
    ):
        raise ValueError(
            "steps_per_update must be an integer in [1, total_steps] "
            f"= [1, {total_steps}], got {steps_per_update!r}."
        )
    return int(total_steps) // int(steps_per_update)


def _growth_schedule(
    growth: Callable[[jax.Array], jax.Array],
    init_value: float,
    total_steps: int,
    factor: float,
    max_value: float | None,
    steps_per_update: int,
) -> optax.Schedule:
    """γ_t = min(γ_0 · growth(k/n), γ_max), k/n the fraction of the n γ updates done.

    ``growth`` maps k/n in [0, 1] to the growth factor, 1 at 0 and ``factor`` at 1.
    """
    n = _check(init_value, total_steps, factor, max_value, steps_per_update)

    def schedule(count):
        count = jnp.clip(jnp.asarray(count, jnp.int32), 0, total_steps)
        progress = (count // steps_per_update).astype(jnp.float32) / n
        value = init_value * growth(progress)
        return value if max_value is None else jnp.minimum(value, max_value)

    return schedule


def exponential_coupling(
    init_value: float, total_steps: int, factor: float = 1e4,
    max_value: float | None = None, steps_per_update: int = 1,
) -> optax.Schedule:
    r"""Exponential growth of the coupling, the rule of the authors' code.

    .. math::

      γ_t = \min\big(γ_0 (1 + γ_1)^{k},\ γ_{max}\big), \quad
      k = \lfloor \min(t, T) / s \rfloor, \quad
      γ_1 = \mathrm{factor}^{1/n} − 1, \quad n = \lfloor T / s \rfloor

    with γ_0 = ``init_value``, T = ``total_steps``, s = ``steps_per_update``,
    γ_max = ``max_value``. So γ_T = γ_0 · ``factor`` (before the cap).

    Args:
      init_value: γ_0 > 0, the coupling at step 0.
      total_steps: T >= 1, the step at which γ reaches γ_0 · ``factor``.
      factor: total growth factor >= 1 over the run (1e4 in the paper's code).
      max_value: optional cap γ_max >= γ_0.
      steps_per_update: s, γ changes once every s steps (a staircase); use
        the number of steps per epoch for per-epoch growth.

    Returns:
      An Optax schedule ``step -> γ`` (float32).

    Example:
      >>> import flatjax
      >>> gamma = flatjax.exponential_coupling(0.1, total_steps=100, factor=100.0)
      >>> round(float(gamma(0)), 4), round(float(gamma(50)), 4), round(float(gamma(100)), 4)
      (0.1, 1.0, 10.0)

    References:
      Pittorino et al., ICLR 2021, arXiv:2006.07897;
      Chaudhari et al., ICLR 2017, arXiv:1611.01838 ("scoping").
    """
    growth = lambda p: jnp.exp(math.log(factor) * p)
    return _growth_schedule(growth, init_value, total_steps, factor, max_value, steps_per_update)


def linear_coupling(
    init_value: float, total_steps: int, factor: float = 1e4,
    max_value: float | None = None, steps_per_update: int = 1,
) -> optax.Schedule:
    r"""Linear growth of the coupling from γ_0 to γ_0 · ``factor``.

    .. math::

      γ_t = \min\big(γ_0 (1 + (\mathrm{factor} − 1)\, k/n),\ γ_{max}\big)

    with k, n, γ_0, γ_max as in :func:`exponential_coupling`.

    Args:
      init_value, total_steps, factor, max_value, steps_per_update: as in
        :func:`exponential_coupling`.

    Returns:
      An Optax schedule ``step -> γ`` (float32).

    Example:
      >>> import flatjax
      >>> gamma = flatjax.linear_coupling(1.0, total_steps=10, factor=11.0)
      >>> float(gamma(0)), float(gamma(5)), float(gamma(10)), float(gamma(20))
      (1.0, 6.0, 11.0, 11.0)

    References:
      Pittorino et al., ICLR 2021, arXiv:2006.07897.
    """
    growth = lambda p: 1.0 + (factor - 1.0) * p
    return _growth_schedule(growth, init_value, total_steps, factor, max_value, steps_per_update)


def cosine_coupling(
    init_value: float, total_steps: int, factor: float = 1e4,
    max_value: float | None = None, steps_per_update: int = 1,
) -> optax.Schedule:
    r"""Cosine growth of the coupling from γ_0 to γ_0 · ``factor``.

    .. math::

      γ_t = \min\Big(γ_0 + γ_0(\mathrm{factor} − 1)\,
      \tfrac{1 − \cos(π k / n)}{2},\ γ_{max}\Big)

    with k, n, γ_0, γ_max as in :func:`exponential_coupling`: slow at both
    ends, fastest in the middle.

    Args:
      init_value, total_steps, factor, max_value, steps_per_update: as in
        :func:`exponential_coupling`.

    Returns:
      An Optax schedule ``step -> γ`` (float32).

    Example:
      >>> import flatjax
      >>> gamma = flatjax.cosine_coupling(1.0, total_steps=10, factor=3.0)
      >>> float(gamma(0)), float(gamma(5)), float(gamma(10))
      (1.0, 2.0, 3.0)

    References:
      Pittorino et al., ICLR 2021, arXiv:2006.07897.
    """
    growth = lambda p: 1.0 + (factor - 1.0) * (0.5 * (1.0 - jnp.cos(jnp.pi * p)))
    return _growth_schedule(growth, init_value, total_steps, factor, max_value, steps_per_update)
