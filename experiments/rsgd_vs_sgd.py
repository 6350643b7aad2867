"""Replicated-SGD against SGD at equal epochs and at equal gradient evaluations.

A one-hidden-layer MLP on scikit-learn's 8x8 digits (1797 images, shipped
offline), split 70/30 with a fixed seed. Replicated-SGD trains y = 3
independently initialised replicas, each on its own shuffle of the training
set, coupled through their mean c with a coupling γ set by balance at
initialisation (``flatjax.balanced_coupling``) and grown exponentially, once
per epoch, by a total factor over the run (``flatjax.exponential_coupling``).
One rSGD epoch costs y SGD epochs of gradient evaluations, so SGD is run
twice: for the same number of epochs and for y times as many (same number of
gradient evaluations). Reported: test error of the centre c (the network
rSGD delivers), of each replica, and of the output ensemble (mean of the
replicas' softmax), and SGD's; mean ± std over seeds.

Run: ``.venv/bin/python -m experiments.rsgd_vs_sgd`` (under a minute on 2
CPU cores).
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


def error(pred, y) -> float:
    return 100.0 * float(jnp.mean(pred != y))


def epoch_indices(rng, n, batch_size, num_shuffles=None):
    """Shuffled minibatch indices [steps, batch] (or [shuffles, steps, batch])."""
    steps = n // batch_size
    shape = (steps, batch_size)
    if num_shuffles is None:
        return rng.permutation(n)[: steps * batch_size].reshape(shape)
    return np.stack([epoch_indices(rng, n, batch_size) for _ in range(num_shuffles)])


def base_optimizer(cfg, weight_decay=None):
    """The baseline of the paper: SGD, Nesterov 0.9, weight decay."""
    return optax.chain(
        optax.add_decayed_weights(cfg.weight_decay if weight_decay is None else weight_decay),
        optax.sgd(cfg.lr, momentum=0.9, nesterov=True),
    )


def train_sgd(model, params, data, cfg, seed, epochs):
    x_tr, _, y_tr, _ = map(jnp.asarray, data)
    opt = base_optimizer(cfg)
    grad = jax.grad(lambda p, x, y: loss_fn(model, p, x, y))

    @jax.jit
    def run_epoch(params, state, idx):
        def step(carry, i):
            params, state = carry
            updates, state = opt.update(grad(params, x_tr[i], y_tr[i]), state, params)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(step, (params, state), idx)[0]

    rng = np.random.default_rng(seed)
    state = opt.init(params)
    for _ in range(epochs):
        params, state = run_epoch(params, state, epoch_indices(rng, len(x_tr), cfg.batch))
    return params


def train_rsgd(model, params, data, cfg, seed):
    """Returns (replicated params, final ReplicateState, γ₀)."""
    x_tr, _, y_tr, _ = map(jnp.asarray, data)
    y = cfg.replicas
    steps_per_epoch = len(x_tr) // cfg.batch
    rng = np.random.default_rng(seed)
    per_replica_loss = flatjax.replica_map(
        jax.value_and_grad(lambda p, x, t: loss_fn(model, p, x, t))
    )

    # The authors' balanced γ_0 = 2 g_0: the mean loss over the whole training set.
    losses = jax.vmap(lambda p: loss_fn(model, p, x_tr, y_tr))(params)
    gamma0 = float(flatjax.balanced_coupling(losses, params))
    coupling = flatjax.exponential_coupling(
        gamma0,
        total_steps=cfg.epochs * steps_per_epoch,
        factor=cfg.gamma_factor,
        steps_per_update=steps_per_epoch,
    )
    # The authors' rule: the coupling inside each replica's Nesterov gradient, and
    # weight decay y · wd (their lr × y also scales PyTorch's decay).
    opt = flatjax.replicate(base_optimizer(cfg, weight_decay=y * cfg.weight_decay), y, coupling)

    @jax.jit
    def run_epoch(params, state, idx):  # idx [steps, y, batch]: own batch per replica
        def step(carry, i):
            params, state = carry
            _, grads = per_replica_loss(params, x_tr[i], y_tr[i])
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(step, (params, state), idx)[0]

    state = opt.init(params)
    for _ in range(cfg.epochs):
        idx = epoch_indices(rng, len(x_tr), cfg.batch, num_shuffles=y).transpose(1, 0, 2)
        params, state = run_epoch(params, state, idx)
    return params, state, gamma0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=20, help="passes of each replica")
    parser.add_argument("--replicas", type=int, default=3, help="y")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--gamma-factor", type=float, default=1e3, help="total growth of γ")
    cfg = parser.parse_args(argv)

    data = load_data()
    x_te, y_te = jnp.asarray(data[1]), jnp.asarray(data[3])
    model = MLP(hidden_sizes=(cfg.hidden,), num_classes=10)
    y = cfg.replicas
    evals = cfg.epochs * (len(data[0]) // cfg.batch)
    print(
        f"digits: {len(data[0])} train / {len(data[1])} test; MLP 64-{cfg.hidden}-10; batch "
        f"{cfg.batch}; base optimizer SGD lr {cfg.lr}, Nesterov 0.9, wd {cfg.weight_decay}"
    )
    print(
        f"rSGD: y = {y}, {cfg.epochs} epochs per replica = {y * evals} gradient evaluations; "
        f"γ₀ balanced at init, ×{cfg.gamma_factor:g} exponentially (per epoch); proximal "
        f"coupling step; centre = mean of replicas"
    )
    print(
        f"SGD same epochs: {cfg.epochs} epochs = {evals} gradient evaluations; SGD same "
        f"gradient evaluations: {y * cfg.epochs} epochs = {y * evals}"
    )
    rows = {
        "rSGD centre": [],
        "rSGD replicas (mean)": [],
        "rSGD ensemble": [],
        f"SGD {cfg.epochs} ep (same epochs)": [],
        f"SGD {y * cfg.epochs} ep (same grad evals)": [],
    }
    start = time.perf_counter()
    predict = jax.jit(lambda p, x: model.apply({"params": p}, x))
    for seed in range(cfg.seeds):
        key = jax.random.PRNGKey(seed)
        replicas = flatjax.init_replicas(model.init, key, y, jnp.zeros((1, 64)))["params"]
        trained, state, gamma0 = train_rsgd(model, replicas, data, cfg, seed)
        center = flatjax.replicate_eval_params(state, trained)
        logits = jax.vmap(predict, in_axes=(0, None))(trained, x_te)
        replica_errs = [error(jnp.argmax(l, -1), y_te) for l in logits]
        ensemble = jnp.mean(jax.nn.softmax(logits, -1), axis=0)
        # SGD starts from replica 0's initialisation.
        sgd_init = jax.tree.map(lambda l: l[0], replicas)
        sgd_same_epochs = train_sgd(model, sgd_init, data, cfg, seed, cfg.epochs)
        sgd_same_evals = train_sgd(model, sgd_init, data, cfg, seed, y * cfg.epochs)
        errs = [
            error(jnp.argmax(predict(center, x_te), -1), y_te),
            float(np.mean(replica_errs)),
            error(jnp.argmax(ensemble, -1), y_te),
            error(jnp.argmax(predict(sgd_same_epochs, x_te), -1), y_te),
            error(jnp.argmax(predict(sgd_same_evals, x_te), -1), y_te),
        ]
        for row, e in zip(rows.values(), errs, strict=True):
            row.append(e)
        gamma_final = float(flatjax.replicate_coupling(state))
        print(
            f"seed {seed}: γ₀ {gamma0:.3g} → γ_final {gamma_final:.3g}, "
            f"mean ‖wᵃ − c‖² {float(state.center_distance):.2e}; test error % centre "
            f"{errs[0]:.2f}, replicas {', '.join(f'{e:.2f}' for e in replica_errs)}, ensemble "
            f"{errs[2]:.2f}, SGD {errs[3]:.2f} / {errs[4]:.2f}"
        )
    print(f"test error (%), mean ± std over {cfg.seeds} seeds:")
    for name, errs in rows.items():
        errs = np.asarray(errs)
        std = errs.std(ddof=1) if len(errs) > 1 else 0.0
        print(f"  {name:32s} {errs.mean():5.2f} ± {std:.2f}")
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
