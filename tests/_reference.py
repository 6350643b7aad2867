"""Pure-numpy (float64) transcriptions of the reference optimizers, for differential tests.

Each function re-derives the arithmetic of one published implementation (our own
code, not the original text):

- :func:`chaudhari_entropy_sgd`: ``EntropySGD.step`` of ucla-vision/entropy-sgd,
  ``python/optim.py`` at 61329f9c5e5fec2264af3a4bb8b722cb335322c4.
- :func:`authors_entropy_sgd`: the SacredDNN ``EntropySGD`` of Pittorino et al. 2021,
  devansh20la/LPF-SGD ``sacreddnn/sacreddnn/entropy_sgd.py`` at
  2b00987f1b427d64034857949266b1136d2aeb11, configured as ``parse_args.get_optimizer``
  and driven as ``scripts/esgd_dnn.py`` do.
- :func:`robustnet_replicated_sgd`: ``RobustNet`` (``sacreddnn/sacreddnn/models/robust.py``,
  same commit) trained by ``train()``/``main()`` of ``scripts/robust_dnn.py`` with
  ``torch.optim.SGD(lr * y, momentum, nesterov, weight_decay)``, dampening 0.

Conventions: the authors' rSGD g multiplies ``mean_a ||w_a - c||^2`` with no 1/2, so
gamma = 2 g in the elastic ``(gamma/2) ||w - c||^2`` form; their ``lr * y`` cancels the
1/y of the replica-averaged loss, so each replica moves with lr on its own loss while
PyTorch's weight decay becomes ``y * wd`` in those units. Both Entropy-SGDs pull the
walker with ``g * (w - wc)`` directly: gamma = g.

Params are dicts name -> float64 array; gradient callbacks return ``(loss, grads)``.
"""

from __future__ import annotations

import numpy as np


def _copy(tree):
    return {k: np.array(v, dtype=np.float64) for k, v in tree.items()}


def _zeros(tree):
    return {k: np.zeros_like(v, dtype=np.float64) for k, v in tree.items()}


def _sqdist(a, b):
    return float(sum(np.sum((a[k] - b[k]) ** 2) for k in a))


def _rate(lr, t):
    return float(lr(t)) if callable(lr) else float(lr)


def _momentum(d, buf, mom, nesterov):
    """Buffer update shared by both Entropy-SGDs: returns (direction, new buffer)."""
    buf = mom * buf + d
    return (d + mom * buf if nesterov else buf), buf


def chaudhari_entropy_sgd(params, grad_fn, *, num_steps, lr, momentum, weight_decay, L, g0,
                          g1=0.0, eps=0.0, nesterov=True, llr=0.1, beta1=0.75, rng=None):
    """Params after each of ``num_steps`` calls of his ``step`` (``lr`` float or t -> lr).

    ``grad_fn(params, t, i)``: i = -1 is the closure at the top of ``step``, 0..L-1 the
    inner calls. The top gradient seeds the persistent outer buffer (at t = 0 only) and,
    with L = 0, is the outer gradient. ``state['t']`` is never advanced, so g = g0.
    """
    w = _copy(params)
    outer_buf = None
    history = []
    g = g0 * (1.0 + g1) ** 0  # his scoping counter stays at 0
    for t in range(num_steps):
        _, top = grad_fn(w, t, -1)
        if outer_buf is None:
            outer_buf = _copy(top)
        wc, mw, buf = _copy(w), _copy(w), _zeros(w)
        for i in range(L):
            _, grads = grad_fn(w, t, i)
            for k in w:
                d = grads[k] + weight_decay * w[k] if weight_decay > 0 else grads[k].copy()
                aliased = momentum > 0 and not nesterov
                if momentum > 0:
                    d, buf[k] = _momentum(d, buf[k], momentum, nesterov)
                noise = rng.standard_normal(w[k].shape) if eps > 0 else 0.0
                d = d - g * (wc[k] - w[k]) + eps / np.sqrt(0.5 * llr) * noise
                if aliased:  # dw *is* the buffer: the pull and the noise land in it
                    buf[k] = d
                w[k] = w[k] - llr * d
                mw[k] = beta1 * mw[k] + (1.0 - beta1) * w[k]
        rate = _rate(lr, t)
        for k in w:
            if L > 0:
                w[k] = wc[k].copy()
                d = wc[k] - mw[k]
            else:
                d = top[k].copy()
            if weight_decay > 0:
                d = d + weight_decay * w[k]
            if momentum > 0:
                d, outer_buf[k] = _momentum(d, outer_buf[k], momentum, nesterov)
            w[k] = w[k] - rate * d
        history.append(_copy(w))
    return history


def authors_entropy_sgd(params, grad_fn, *, num_steps, lr, L, momentum=0.0, momentum_sgld=0.0,
                        weight_decay=0.0, nesterov=True, eps=0.0, g0=None, g1=None, gmax=1e4,
                        epochs=None, num_batches=None, gtime=1, sgld_lr=0.1, alpha=0.75,
                        gscale=True, rng=None):
    """(params after each outer step, g used by each outer update); ``lr`` float or t -> lr.

    ``grad_fn(params, t, i)``, i = 0..L-1. g = g0 (1 + g1)^t, recomputed at the top of
    every inner iteration, no cap. At t >= gtime: g1 == 0 becomes
    ``gmax**(1/(epochs*num_batches)) - 1`` after the first inner update; g0 == 0 becomes
    ``loss / (0.5 ||wc - w||^2)`` after the last one (loss of that closure, w after its
    update), so the outer update of the calibration step still uses g = 0.
    """
    # Constructor: None -> the default, which for g0/g1 is None again; step() then does
    # None * ..., and ``t % num_batches`` with the default 0 divides by zero; L = 0
    # leaves ``mf`` unbound.
    if g0 is None or g1 is None:
        raise TypeError("g0/g1 None: the source's defaults are None and g0 * (1 + g1)**t fails")
    if not num_batches:
        raise ZeroDivisionError("num_batches 0/None: the source prints on t % num_batches")
    if L < 1:
        raise UnboundLocalError("L = 0: the source returns mf, which only the inner loop sets")
    w = _copy(params)
    outer_buf = _zeros(w)
    history, g_used = [], []
    for t in range(num_steps):
        rate = _rate(lr, t)
        wc, mw, buf = _copy(w), _copy(w), _zeros(w)
        for i in range(L):
            loss, grads = grad_fn(w, t, i)
            g = g0 * (1.0 + g1) ** t
            for k in w:
                d = grads[k] + g * (w[k] - wc[k])
                if weight_decay > 0:
                    d = d + weight_decay * w[k]
                aliased = momentum_sgld > 0 and not nesterov
                if momentum_sgld > 0:
                    d, buf[k] = _momentum(d, buf[k], momentum_sgld, nesterov)
                if eps > 0:
                    d = d + eps / np.sqrt(0.5 * sgld_lr) * rng.standard_normal(w[k].shape)
                    if aliased:
                        buf[k] = d
                w[k] = w[k] - sgld_lr * d
                mw[k] = alpha * mw[k] + (1.0 - alpha) * w[k]
            if t >= gtime:
                if g1 == 0:
                    if epochs is None:
                        raise TypeError("g1 = 0 needs epochs (epochs * num_batches)")
                    g1 = gmax ** (1.0 / (epochs * num_batches)) - 1.0
                if g0 == 0 and i == L - 1:
                    g0 = float(loss) / (0.5 * _sqdist(wc, w))  # ZeroDivisionError as theirs
        for k in w:
            w[k] = wc[k].copy()
            d = wc[k] - mw[k]
            if weight_decay > 0:
                d = d + weight_decay * w[k]
            if momentum > 0:
                d, outer_buf[k] = _momentum(d, outer_buf[k], momentum, nesterov)
            w[k] = w[k] - (rate * g if gscale else rate) * d
        history.append(_copy(w))
        g_used.append(g)
    return history, g_used


def _torch_sgd(w, grads, bufs, *, lr, momentum, nesterov, weight_decay):
    """One ``torch.optim.SGD`` step (dampening 0) on a param dict, in place."""
    for k in w:
        d = grads[k] + weight_decay * w[k] if weight_decay != 0 else grads[k].copy()
        if momentum != 0:
            bufs[k] = d.copy() if k not in bufs else momentum * bufs[k] + d
            d = d + momentum * bufs[k] if nesterov else bufs[k]
        w[k] = w[k] - lr * d


def robustnet_replicated_sgd(replicas, grad_fn, *, num_epochs, steps_per_epoch, lr,
                             weight_decay, momentum=0.9, nesterov=True, g=None, grate=None,
                             gmax=1e4, train_loss_fn=None, center=None, gtime=1):
    """(history, g_history) of RobustNet training; ``lr`` float or global step k -> lr.

    history[k]: the y replicas (then the centre, if ``center`` is given) after step k.
    ``grad_fn(params, a, k)``: replica a's mean minibatch loss and gradient at step k.
    The coupling is added when ``y != 1`` and the in-epoch index is a multiple of
    gtime. ``g *= gtime`` happens whether g was given or balanced.
    """
    y = len(replicas)
    ws = [_copy(r) for r in replicas]
    cw = None if center is None else _copy(center)

    def centre():  # sqdistances(): the centre parameters, or the detached replica mean
        return cw if cw is not None else {k: np.mean([w[k] for w in ws], 0) for k in ws[0]}

    if g is None:  # report() with g = 0, then train loss / distance loss
        c = centre()
        with np.errstate(divide="ignore", invalid="ignore"):
            g = np.mean([train_loss_fn(w) for w in ws]) / np.float64(
                np.mean([_sqdist(w, c) for w in ws]))
    g = float(g) * gtime
    if grate is None:
        grate = gmax ** (1.0 / num_epochs) - 1.0
    bufs = [{} for _ in range(y + 1)]
    centre_has_grad = False  # PyTorch skips a parameter whose .grad is None
    history, g_history = [], []
    k = 0
    for _ in range(num_epochs):
        for counter in range(steps_per_epoch):
            coupled = y != 1 and counter % gtime == 0
            c = centre()
            step_grads = []
            for a, w in enumerate(ws):
                _, ga = grad_fn(w, a, k)
                step_grads.append({n: ga[n] / y + (2.0 * g / y * (w[n] - c[n]) if coupled else 0.0)
                                   for n in w})
            if cw is not None:
                centre_has_grad = centre_has_grad or coupled  # zero_grad() keeps zeros
                gc = {n: 2.0 * g / y * sum(cw[n] - w[n] for w in ws) if coupled
                      else np.zeros_like(cw[n]) for n in cw}
            rate = _rate(lr, k) * y
            for w, gw, b in zip(ws, step_grads, bufs, strict=False):
                _torch_sgd(w, gw, b, lr=rate, momentum=momentum, nesterov=nesterov,
                           weight_decay=weight_decay)
            if cw is not None and centre_has_grad:
                _torch_sgd(cw, gc, bufs[y], lr=rate, momentum=momentum, nesterov=nesterov,
                           weight_decay=weight_decay)
            history.append([_copy(w) for w in ws] + ([_copy(cw)] if cw is not None else []))
            g_history.append(g)
            k += 1
        g *= 1.0 + grate  # increase_g() after the epoch, uncapped
    return history, g_history


# ----------------------------------------------------------------------------- self-checks


def _quadratic(a=2.0, b=0.5):
    """f(w) = a/2 (w - b)^2 on a 1-d param {"w": ...}; grad_fn ignores the indices."""
    def grad_fn(p, *_):
        return 0.5 * a * float(np.sum((p["w"] - b) ** 2)), {"w": a * (p["w"] - b)}
    return grad_fn


def _selfcheck_robustnet_reduces_to_torch_sgd():
    lr, wd, m, w = 0.1, 0.01, 0.9, np.array([1.5])
    hist, gh = robustnet_replicated_sgd([{"w": w}], _quadratic(), num_epochs=2,
                                        steps_per_epoch=3, lr=lr, weight_decay=wd, g=0.0)
    buf = None
    for k in range(6):
        d = 2.0 * (w - 0.5) + wd * w
        buf = d if buf is None else m * buf + d
        w = w - lr * (d + m * buf)
        np.testing.assert_allclose(hist[k][0]["w"], w, rtol=1e-13)
    assert gh == [0.0] * 6


def _selfcheck_robustnet_coupling_first_step():
    zero = lambda p, *_: (0.0, {"w": np.zeros_like(p["w"])})  # noqa: E731
    reps = [{"w": np.array([1.0])}, {"w": np.array([-3.0])}]
    lr, g, m, y = 0.05, 0.3, 0.9, 2
    hist, gh = robustnet_replicated_sgd(reps, zero, num_epochs=2, steps_per_epoch=1, lr=lr,
                                        weight_decay=0.0, g=g, grate=1.0)
    for a, want in enumerate([1.0, -3.0]):  # c = -1; first Nesterov step is (1 + m) d
        d = 2 * g / y * (want + 1.0)
        np.testing.assert_allclose(hist[0][a]["w"], want - lr * y * (1 + m) * d, rtol=1e-13)
    assert gh == [g, 2 * g]
    c0 = {"w": np.array([0.5])}
    hist, _ = robustnet_replicated_sgd(reps, zero, num_epochs=1, steps_per_epoch=1, lr=lr,
                                       weight_decay=0.0, g=g, center=c0)
    dc = 2 * g / y * ((0.5 - 1.0) + (0.5 + 3.0))
    np.testing.assert_allclose(hist[0][y]["w"], 0.5 - lr * y * (1 + m) * dc, rtol=1e-13)
    np.testing.assert_allclose(hist[0][0]["w"], 1.0 - lr * y * (1 + m) * g * (1.0 - 0.5),
                               rtol=1e-13)


def _selfcheck_authors_esgd_quadratic():
    a, b, g0, g1, lr, sl, al, L = 2.0, 0.5, 0.7, 0.1, 0.2, 0.1, 0.75, 3
    hist, gh = authors_entropy_sgd({"w": np.array([1.5])}, _quadratic(a, b), num_steps=2,
                                   lr=lr, L=L, g0=g0, g1=g1, num_batches=1, sgld_lr=sl,
                                   alpha=al)
    x = 1.5
    for t in range(2):
        g = g0 * (1 + g1) ** t
        w, mw = x, x
        for _ in range(L):
            w = w - sl * (a * (w - b) + g * (w - x))
            mw = al * mw + (1 - al) * w
        x = x - lr * g * (x - mw)
        np.testing.assert_allclose(hist[t]["w"], [x], rtol=1e-13)
        assert np.isclose(gh[t], g)


def _selfcheck_authors_esgd_calibration():
    a, b, sl, L, x0, gmax = 2.0, 0.5, 0.1, 2, 1.5, 4.0
    hist, gh = authors_entropy_sgd({"w": np.array([x0])}, _quadratic(a, b), num_steps=3,
                                   lr=0.2, L=L, momentum=0.9, g0=0.0, g1=0.0, gmax=gmax,
                                   epochs=1, num_batches=2, sgld_lr=sl)
    assert gh[0] == gh[1] == 0.0 and hist[0]["w"][0] == hist[1]["w"][0] == x0
    w1 = x0 - sl * a * (x0 - b)  # step 1: g = 0 inside, calibrate from the last iteration
    w2 = w1 - sl * a * (w1 - b)
    g0 = 0.5 * a * (w1 - b) ** 2 / (0.5 * (x0 - w2) ** 2)
    assert np.isclose(gh[2], g0 * (gmax ** 0.5) ** 2)


def _selfcheck_chaudhari():
    a, b, lr, m, wd, llr, b1 = 2.0, 0.5, 0.2, 0.9, 0.01, 0.1, 0.75
    q = _quadratic(a, b)
    # L = 0: SGD on the closure gradient, outer buffer seeded with it: m g + d at t = 0.
    h = chaudhari_entropy_sgd({"w": np.array([1.5])}, q, num_steps=1, lr=lr, momentum=m,
                              weight_decay=wd, L=0, g0=0.3)
    gr = a * (1.5 - b)
    d = gr + wd * 1.5
    np.testing.assert_allclose(h[0]["w"], [1.5 - lr * (d + m * (m * gr + d))], rtol=1e-13)
    # L = 2, heavy ball: the pull g (w - wc) enters the inner buffer; g1 has no effect.
    g, x = 0.3, 1.5
    h = chaudhari_entropy_sgd({"w": np.array([x])}, q, num_steps=1, lr=lr, momentum=m,
                              weight_decay=0.0, L=2, g0=g, g1=5.0, nesterov=False, llr=llr,
                              beta1=b1)
    w, mw, buf = x, x, 0.0
    for _ in range(2):
        buf = m * buf + a * (w - b) + g * (w - x)
        w = w - llr * buf
        mw = b1 * mw + (1 - b1) * w
    outer = m * a * (x - b) + (x - mw)
    np.testing.assert_allclose(h[0]["w"], [x - lr * outer], rtol=1e-13)


def _selfcheck_all():
    for name, fn in sorted(globals().items()):
        if name.startswith("_selfcheck_") and name != "_selfcheck_all":
            fn()


if __name__ == "__main__":
    _selfcheck_all()
    print("ok")
