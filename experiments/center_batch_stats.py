"""Which BatchNorm statistics the Replicated-SGD centre should use.

The centre c = mean_a wᵃ is a network no replica ever was: the statistics
of its activations are not the average of the replicas' running statistics
unless the replicas are close to c. This script trains Replicated-SGD
(y = 3, the training library's defaults) with a small BatchNorm ResNet on
scikit-learn's digits and evaluates the centre at several epochs with
both choices of :func:`flatjax.training.eval_variables`:

* ``average``: the mean of the replicas' running statistics (free);
* ``recompute``: statistics re-estimated by forward passes of the centre
  over the training set (:func:`flatjax.recompute_batch_stats`).

It prints a markdown table: epoch, mean squared replica distance to the
centre, the replicas' mean test error, and the centre's test error with each
choice. Command (offline, about a minute on a 2-core CPU)::

    python -m experiments.center_batch_stats --epochs 12 --seed 0
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from flatjax import training
from flatjax.models import get_model
from flatjax.training.evaluate import evaluate, evaluate_replicas


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="resnet_tiny")
    parser.add_argument("--dataset", default="digits")
    args = parser.parse_args(argv)

    config = training.base_config()
    config.dataset, config.model, config.seed = args.dataset, args.model, args.seed
    config.algorithm = "replicated_sgd"
    config.batch_size = 64
    config.num_epochs = float(args.epochs)
    data = training.dataset_source(config)
    model = get_model(config.model, data.info.num_classes)
    state = training.create_train_state(
        config, model, data.info, jax.random.PRNGKey(args.seed),
        balance_batches=list(_take(data.train_batches(0), data.data_steps_per_epoch)),
    )
    step = jax.jit(training.make_train_step(config))
    x, y = data.eval_arrays
    per_epoch = data.data_steps_per_epoch
    batches = data.train_batches(0, num_replicas=config.rsgd.num_replicas)
    print("| epoch | ‖wᵃ − c‖² | replicas' test error (%) | centre, averaged stats | "
          "centre, recomputed stats |")
    print("|---|---|---|---|---|")
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        for _ in range(per_epoch):
            state, metrics = step(state, next(batches))
        if epoch in (1, 2, 3, 6, args.epochs):
            replicas = evaluate_replicas(
                state.apply_fn, {"params": state.params, "batch_stats": state.batch_stats}, x, y
            )
            averaged = evaluate(state.apply_fn, training.eval_variables(state), x, y)
            recomputed = evaluate(state.apply_fn, training.eval_variables(
                state, center_batch_stats="recompute", batches=data.stats_batches()), x, y)
            print(f"| {epoch} | {float(metrics['replica_distance']):.3g} | "
                  f"{np.mean(replicas['replica_error']):.1f} | {averaged['error']:.1f} | "
                  f"{recomputed['error']:.1f} |", flush=True)
    print(f"\n({args.dataset}, {args.model}, seed {args.seed}, "
          f"{time.perf_counter() - start:.0f} s)")


def _take(iterator, n):
    for _, item in zip(range(n), iterator, strict=False):
        yield item


if __name__ == "__main__":
    main()
