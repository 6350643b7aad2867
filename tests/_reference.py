"""numpy (float64) transcriptions of the reference implementations flatjax is tested against.

Written from reading the sources (the arithmetic, in our own code), for the
differential tests in ``tests/test_reference.py``:

- :func:`chaudhari_entropy_sgd`: Chaudhari et al.'s PyTorch Entropy-SGD,
  repository ucla-vision/entropy-sgd, ``python/optim.py``, commit
  61329f9 (``EntropySGD.step``).
- :func:`authors_entropy_sgd`: Pittorino et al.'s SacredDNN ``EntropySGD``,
  repository devansh20la/LPF-SGD, commit 2b00987, ``sacreddnn/sacreddnn/entropy_sgd.py``
  (driven by ``sacreddnn/scripts/esgd_dnn.py``).
- :func:`robustnet_replicated_sgd`: the same framework's replicated network,
  ``sacreddnn/sacreddnn/models/robust.py`` (``RobustNet``) trained as
  ``sacreddnn/scripts/robust_dnn.py`` trains it, with ``torch.optim.SGD``
  (momentum, Nesterov, weight decay, dampening 0).

Conventions of those codes: the authors' rSGD loss is
(1/y) Σ_a L_a + g · (1/y) Σ_a ‖wᵃ − c‖² (no ½), so γ = 2g in flatjax's
(γ/2)‖w − c‖², and its learning rate × y undoes the 1/y while also scaling
PyTorch's weight decay: each replica decays with y·wd. Both Entropy-SGDs
write the pull as g (x′ − x): γ = g.

Params are dicts name -> float64 array; gradient callbacks return
``(loss, grads)``.
"""

from __future__ import annotations

import numpy as np


def _copy(tree):
    return {k: np.array(v, dtype=np.float64) for k, v in tree.items()}


def _sqdist(a, b):
    return float(sum(np.sum((a[k] - b[k]) ** 2) for k in a))


def chaudhari_entropy_sgd(params, grad_fn, *, num_steps, lr, momentum, weight_decay, L, g0,
                          g1=0.0, eps=0.0, nesterov=True, llr=0.1, beta1=0.75, rng=None):
    """Params after each of ``num_steps`` calls of his ``step``.

    ``grad_fn(params, t, i)``: i = -1 for the closure call at the top of
    ``step`` (its gradient seeds the outer momentum buffer at t = 0 only),
    0..L-1 for the inner calls. His scoping counter ``t`` is never
    incremented, so g = g0 (1 + g1)^0 = g0 at every step.
    """
    w = _copy(params)
    outer_buf = None
    history = []
    counter = 0  # state['t'] in his code: initialised, never advanced
    for t in range(num_steps):
        _, grad_top = grad_fn(w, t, -1)
        if outer_buf is None:
            outer_buf = _copy(grad_top)
        anchor = _copy(w)
        average = _copy(w)
        inner_buf = {k: np.zeros_like(v) for k, v in w.items()}
        g = g0 * (1 + g1) ** counter
        for i in range(L):
            _, grads = grad_fn(w, t, i)
            for k in w:
                d = grads[k].copy()
                if weight_decay > 0:
                    d = d + weight_decay * w[k]
                if momentum > 0:
                    inner_buf[k] = momentum * inner_buf[k] + d
                    if nesterov:
                        d = d + momentum * inner_buf[k]
                    else:
                        d = inner_buf[k]  # his dw aliases the buffer: the next adds land in it
                noise = rng.standard_normal(w[k].shape) if eps > 0 else 0.0
                d = d - g * (anchor[k] - w[k]) + eps / np.sqrt(0.5 * llr) * noise
                if momentum > 0 and not nesterov:
                    inner_buf[k] = d
                w[k] = w[k] - llr * d
                average[k] = beta1 * average[k] + (1 - beta1) * w[k]
        for k in w:
            d = anchor[k] - average[k]
            x = anchor[k]
            if weight_decay > 0:
                d = d + weight_decay * x
            if momentum > 0:
                outer_buf[k] = momentum * outer_buf[k] + d
                d = d + momentum * outer_buf[k] if nesterov else outer_buf[k]
            w[k] = x - lr * d
        history.append(_copy(w))
    return history


def authors_entropy_sgd(params, grad_fn, *, num_steps, lr, L, momentum=0.0, momentum_sgld=0.0,
                        weight_decay=0.0, nesterov=True, eps=0.0, g0=None, g1=None, gmax=1e4,
                        epochs=None, num_batches=None, gtime=1, sgld_lr=0.1, alpha=0.75,
                        gscale=True, rng=None):
    """(params after each outer step, the g each outer step's update used).

    ``grad_fn(params, t, i)`` for inner iteration i = 0..L-1 (the only closure
    calls). ``lr`` may be a callable t -> lr (a scheduler's value). As in the
    source, g = g0 (1 + g1)^t with no cap (gmax is the total growth factor
    used to derive g1 = gmax^{1/(epochs · num_batches)} − 1 when g1 = 0);
    with g0 = 0 it is calibrated at the first outer step t >= gtime, at the
    last inner iteration, as g0 = loss / (½ ‖wc − w‖²), loss being that
    iteration's closure value and w the walker after its update; the g of
    that step's outer update was computed before, i.e. it is still 0.
    """
    if g0 is None or g1 is None:
        raise ValueError("the source's defaults leave g0/g1 as None, and g0 * ... fails; pass them")
    w = _copy(params)
    outer_buf = {k: np.zeros_like(v) for k, v in w.items()}
    history, g_used = [], []
    for t in range(num_steps):
        rate = lr(t) if callable(lr) else lr
        anchor = _copy(w)
        average = _copy(w)
        inner_buf = {k: np.zeros_like(v) for k, v in w.items()}
        g = g0 * (1 + g1) ** t
        for i in range(L):
            loss, grads = grad_fn(w, t, i)
            g = g0 * (1 + g1) ** t
            for k in w:
                d = grads[k] + g * (w[k] - anchor[k])
                if weight_decay > 0:
                    d = d + weight_decay * w[k]
                if momentum_sgld > 0:
                    inner_buf[k] = momentum_sgld * inner_buf[k] + d
                    d = d + momentum_sgld * inner_buf[k] if nesterov else inner_buf[k]
                if eps > 0:
                    d = d + eps / np.sqrt(0.5 * sgld_lr) * rng.standard_normal(w[k].shape)
                w[k] = w[k] - sgld_lr * d
                average[k] = alpha * average[k] + (1 - alpha) * w[k]
            if t >= gtime:
                if g1 == 0:
                    g1 = gmax ** (1 / (epochs * num_batches)) - 1
                if g0 == 0 and i == L - 1:
                    g0 = loss / (0.5 * _sqdist(anchor, w))
        for k in w:
            x = anchor[k]
            d = x - average[k]
            if weight_decay > 0:
                d = d + weight_decay * x
            if momentum > 0:
                outer_buf[k] = momentum * outer_buf[k] + d
                d = d + momentum * outer_buf[k] if nesterov else outer_buf[k]
            w[k] = x - (rate * g if gscale else rate) * d
        history.append(_copy(w))
        g_used.append(g)
    return history, g_used


def _torch_sgd_step(w, grads, bufs, *, lr, momentum, nesterov, weight_decay):
    """``torch.optim.SGD.step`` (dampening 0) on one param dict, in place."""
    for k in w:
        d = grads[k] + weight_decay * w[k]
        if momentum > 0:
            bufs[k] = d.copy() if bufs.get(k) is None else momentum * bufs[k] + d
            d = d + momentum * bufs[k] if nesterov else bufs[k]
        w[k] = w[k] - lr * d


def robustnet_replicated_sgd(replicas, grad_fn, *, num_epochs, steps_per_epoch, lr,
                             weight_decay, momentum=0.9, nesterov=True, g=None, grate=None,
                             gmax=1e4, train_loss_fn=None, center=None, gtime=1):
    """(history, g_history): the y replicas (and the centre, last, if any) after each step.

    ``grad_fn(params, a, k)`` is replica a's mean minibatch loss and gradient
    at global step k. Loss per step: (1/y) Σ_a L_a + g · (1/y) Σ_a ‖wᵃ − c‖²
    (the coupling term added when the step's index in the epoch is a
    multiple of gtime), c the detached mean of the replicas, or the centre's
    own parameters (``use_center``: moved by the same SGD, no data loss).
    SGD with lr · y, the given momentum and weight decay on every parameter.
    ``g=None``: g = mean_a train_loss_fn(wᵃ) / mean_a ‖wᵃ − c‖² before
    training, then g *= gtime; ``grate=None``: gmax^{1/num_epochs} − 1; g is
    multiplied by (1 + grate) after every epoch.
    """
    y = len(replicas)
    ws = [_copy(r) for r in replicas]
    c_own = None if center is None else _copy(center)

    def reference_center():
        if c_own is not None:
            return c_own
        return {k: np.mean([w[k] for w in ws], axis=0) for k in ws[0]}

    if g is None:
        c = reference_center()
        mean_loss = float(np.mean([train_loss_fn(w) for w in ws]))
        g = mean_loss / float(np.mean([_sqdist(w, c) for w in ws]))
    g = g * gtime
    if grate is None:
        grate = gmax ** (1 / num_epochs) - 1
    bufs = [{} for _ in range(y + 1)]
    history, g_history = [], []
    k = 0
    for _ in range(num_epochs):
        for counter in range(steps_per_epoch):
            c = reference_center()
            coupled = counter % gtime == 0
            grads = []
            for a, w in enumerate(ws):
                _, ga = grad_fn(w, a, k)
                grads.append({n: ga[n] / y + (2 * g / y * (w[n] - c[n]) if coupled else 0.0)
                              for n in w})
            if c_own is not None:
                gc = {n: (2 * g / y * sum(c_own[n] - w[n] for w in ws) if coupled else
                          np.zeros_like(c_own[n])) for n in c_own}
            for a, w in enumerate(ws):
                _torch_sgd_step(w, grads[a], bufs[a], lr=lr * y, momentum=momentum,
                                nesterov=nesterov, weight_decay=weight_decay)
            if c_own is not None:
                _torch_sgd_step(c_own, gc, bufs[y], lr=lr * y, momentum=momentum,
                                nesterov=nesterov, weight_decay=weight_decay)
            history.append([_copy(w) for w in ws] + ([_copy(c_own)] if c_own is not None else []))
            g_history.append(g)
            k += 1
        g *= 1 + grate
    return history, g_history
