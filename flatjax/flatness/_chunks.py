"""How many perturbed parameter copies (or Hessian probes) one ``vmap`` evaluates."""

from __future__ import annotations

import jax
import numpy as np

# Work budget of one vectorised chunk of local-energy draws, in units of
# (parameters × examples), i.e. roughly multiply-adds of a dense forward pass.
# On CPU larger chunks spill the batched activations out of cache (measured:
# experiments/benchmarks/local_energy_bench.py); accelerators want wide vmaps.
_CHUNK_WORK_BUDGET = {"cpu": 2**26}
_CHUNK_WORK_BUDGET_ACCELERATOR = 2**30
# Budget for the perturbed parameter copies alive at once (floats).
_CHUNK_PARAM_BUDGET = 2**28


def _num_params(params) -> int:
    return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree_util.tree_leaves(params))


def _default_chunk_size(
    num_params: int, examples_per_pass: int, total: int, has_conv: bool = False
) -> int:
    """Draws (or probes) evaluated together by one ``vmap``.

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
