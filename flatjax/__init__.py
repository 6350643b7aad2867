"""flatjax: flat-minima training in JAX.

Entropy-SGD and Replicated-SGD as Optax gradient transformations, flatness
measures (local energy, local entropy, Hessian spectra, sharpness), the
Gaussian-mixture theory of Pittorino et al. (ICLR 2021, arXiv 2006.07897),
models, offline-capable data pipelines and a small training library.

The public surface is this module's namespace; modules whose names start
with an underscore are private.
"""

__version__ = "0.1.0"

# --- coupling schedules ---
from flatjax._schedules import cosine_coupling, exponential_coupling, linear_coupling

# --- Entropy-SGD ---
from flatjax._esgd import (
    EntropySGDState,
    entropy_sgd,
    entropy_sgd_aux,
    entropy_sgd_eval_params,
    entropy_sgd_coupling,
    entropy_sgd_stepwise,
    scale_by_entropy_sgd,
)

# --- Replicated-SGD ---
from flatjax._rsgd import (
    ReplicateState,
    average_batch_stats,
    balanced_coupling,
    init_replicas,
    recompute_batch_stats,
    replica_center,
    replica_map,
    replicate,
    replicate_coupling,
    replicate_eval_params,
    replicated_sgd,
)

# --- flatness measures ---
from flatjax.flatness import (
    HessianEigen,
    HessianTrace,
    LocalEnergy,
    LocalEntropy,
    dataset_loss,
    hessian_top_eigenvalue,
    hessian_trace,
    hvp,
    local_energy,
    local_energy_fn,
    local_entropy,
    sam_sharpness,
)

# --- multi-device / multi-host ---
from flatjax._mesh import (
    batch_sharding,
    host_batch_to_global,
    initialize_distributed,
    make_mesh,
    process_batch_slice,
    rsgd_shard_map_step,
    shard_batch,
)

# --- theory: the Gaussian mixture model, a public submodule ---
from flatjax import theory
