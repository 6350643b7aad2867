"""flatjax: flat-minima training in JAX.

Entropy-SGD and Replicated-SGD as Optax gradient transformations, flatness
measures (local energy, local entropy, Hessian spectra, sharpness), the
Gaussian-mixture theory of Pittorino et al. (ICLR 2021, arXiv 2006.07897),
models, offline-capable data pipelines and a small training library.

The public surface is this module's namespace; modules whose names start
with an underscore are private.
"""

__version__ = "0.1.0"

# --- coupling schedules (issue 3/4) ---

# --- Entropy-SGD (issue 3) ---

# --- Replicated-SGD (issue 4) ---

# --- flatness measures (issue 5) ---

# --- multi-device / multi-host (issue 10) ---
