"""Entropy-SGD against SGD at an equal number of gradient evaluations.

A small MLP on scikit-learn's 8x8 digits (1797 images, shipped offline),
split 70/30 with a fixed seed. Both optimisers see the same number of
minibatch gradients: SGD takes ``epochs * steps_per_epoch`` steps; Entropy-SGD
takes ``epochs * steps_per_epoch / L`` outer steps of L inner steps each, so
both pass over the training data ``epochs`` times. Entropy-SGD is evaluated
at its anchor x. Prints the test error (mean ± std over seeds) of each.

Run: ``.venv/bin/python -m experiments.esgd_vs_sgd`` (about a minute on 2 CPU
cores).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import flatjax
from experiments._digits import load_data, loss_fn
from flatjax.models import MLP


def test_error(model, params, x, y) -> float:
    pred = jnp.argmax(model.apply({"params": params}, x), axis=-1)
    return 100.0 * float(jnp.mean(pred != y))


def epoch_batches(rng, x, y, batch_size):
    """One shuffled epoch as stacked arrays [steps, batch, ...] (remainder dropped)."""
    steps = len(x) // batch_size
    idx = rng.permutation(len(x))[: steps * batch_size].reshape(steps, batch_size)
    return x[idx], y[idx]


def train_sgd(model, params, data, cfg, seed):
    x_tr, _, y_tr, _ = data
    opt = optax.chain(
        optax.add_decayed_weights(cfg.weight_decay),
        optax.sgd(cfg.lr, momentum=0.9, nesterov=True),
    )
    grad = jax.grad(lambda p, x, y: loss_fn(model, p, x, y))

    @jax.jit
    def run_epoch(params, state, bx, by):
        def step(carry, batch):
            params, state = carry
            updates, state = opt.update(grad(params, *batch), state, params)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(step, (params, state), (bx, by))[0]

    rng = np.random.default_rng(seed)
    state = opt.init(params)
    for _ in range(cfg.epochs):
        params, state = run_epoch(params, state, *epoch_batches(rng, x_tr, y_tr, cfg.batch))
    return params


def train_esgd(model, params, data, cfg, seed):
    x_tr, _, y_tr, _ = data
    L = cfg.inner_steps
    steps_per_epoch = len(x_tr) // cfg.batch
    outer_per_epoch = steps_per_epoch // L
    coupling = flatjax.exponential_coupling(
        cfg.gamma0, total_steps=cfg.epochs * outer_per_epoch, factor=cfg.gamma_factor
    )
    opt = flatjax.entropy_sgd(
        cfg.outer_lr,
        inner_steps=L,
        coupling=coupling,
        inner_learning_rate=cfg.inner_lr,
        weight_decay=cfg.weight_decay,
        seed=seed,
    )
    grad = jax.grad(lambda p, x, y: loss_fn(model, p, x, y))

    @jax.jit
    def run_epoch(params, state, bx, by):
        def outer(carry, batch):
            params, state = carry
            bxs, bys = batch  # L stacked minibatches
            grad_fn = lambda w, i: grad(w, bxs[i], bys[i])
            updates, state = opt.update(None, state, params, grad_fn=grad_fn)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(outer, (params, state), (bx, by))[0]

    rng = np.random.default_rng(seed)
    state = opt.init(params)
    for _ in range(cfg.epochs):
        bx, by = epoch_batches(rng, x_tr, y_tr, cfg.batch)
        bx = bx[: outer_per_epoch * L].reshape(outer_per_epoch, L, *bx.shape[1:])
        by = by[: outer_per_epoch * L].reshape(outer_per_epoch, L, *by.shape[1:])
        params, state = run_epoch(params, state, bx, by)
    return params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=40, help="passes over the training set")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate")
    parser.add_argument("--inner-lr", type=float, default=0.1, help="Entropy-SGD inner η′")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--inner-steps", type=int, default=5, help="Entropy-SGD L")
    parser.add_argument("--outer-lr", type=float, default=1.0, help="Entropy-SGD outer η")
    parser.add_argument("--gamma0", type=float, default=0.5)
    parser.add_argument("--gamma-factor", type=float, default=20.0)
    cfg = parser.parse_args(argv)

    data = load_data()
    x_te, y_te = jnp.asarray(data[1]), jnp.asarray(data[3])
    model = MLP(hidden_sizes=(64,), num_classes=10)
    steps = cfg.epochs * (len(data[0]) // cfg.batch)
    print(
        f"digits: {len(data[0])} train / {len(data[1])} test; MLP 64-{model.hidden_sizes[0]}-10; "
        f"{steps} gradient evaluations per run (batch {cfg.batch}, {cfg.epochs} epochs)"
    )
    print(
        f"SGD: lr {cfg.lr}, Nesterov 0.9, wd {cfg.weight_decay}.  Entropy-SGD: L "
        f"{cfg.inner_steps}, η′ {cfg.inner_lr}, outer lr {cfg.outer_lr} Nesterov 0.9, "
        f"γ {cfg.gamma0} → ×{cfg.gamma_factor:g} (exponential), ε 1e-4, α 0.75"
    )
    errors = {"SGD": [], "Entropy-SGD": []}
    start = time.perf_counter()
    for seed in range(cfg.seeds):
        params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 64)))["params"]
        sgd = train_sgd(model, params, data, cfg, seed)
        esgd = train_esgd(model, params, data, cfg, seed)
        errors["SGD"].append(test_error(model, sgd, x_te, y_te))
        errors["Entropy-SGD"].append(test_error(model, esgd, x_te, y_te))
        print(
            f"seed {seed}: test error SGD {errors['SGD'][-1]:.2f}%  "
            f"Entropy-SGD {errors['Entropy-SGD'][-1]:.2f}%"
        )
    for name, errs in errors.items():
        errs = np.asarray(errs)
        std = errs.std(ddof=1) if len(errs) > 1 else 0.0
        print(
            f"{name:12s} test error {errs.mean():.2f} ± {std:.2f} %"
            f" (mean ± std over {len(errs)} seeds)"
        )
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
