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

from flatjax._rsgd._balanced import balanced_coupling
from flatjax._rsgd._batch_stats import average_batch_stats, recompute_batch_stats
from flatjax._rsgd._replicas import init_replicas, replica_center, replica_map
from flatjax._rsgd._state import ReplicateState, replicate_coupling, replicate_eval_params
from flatjax._rsgd._transform import replicate, replicated_sgd

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
