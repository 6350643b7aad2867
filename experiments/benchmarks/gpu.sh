#!/usr/bin/env bash
# The benchmark, unchanged, on one GPU: one prepared run, under 8 minutes.
#
# The GPU host has jax, flax, optax, orbax-checkpoint and chex but not
# tensorflow-datasets, grain, scikit-learn, ml_collections: the sections that
# need them (input pipeline, devices via flatjax.training) are left out, and
# nothing here imports them. ResNet-18 runs at batch 128 with --reps reps.
# The sharded strategy needs y = 3 devices: on a 1-GPU host it is reported
# as skipped. Writes JSON + summary.json to $OUT/results (or /tmp).
#
# Usage (repository root):  bash experiments/benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
DEST=${OUT:-/tmp/flatjax-bench}/results
mkdir -p "$DEST"
"$PY" -c "import jax; print(jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 470 "$PY" -m experiments.benchmarks.run \
  --only rsgd esgd compile local_energy cpu \
  --batch-size 128 --reps 5 --compile-models lenet5 \
  --cpu-batch-size 128 --cpu-reps 5 --cpu-variants default bfloat16 \
  --torch-python none --out "$DEST" | tee "$DEST/table.md"
