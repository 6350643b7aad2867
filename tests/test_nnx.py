"""Every flatjax transform under ``nnx.Optimizer`` with a BatchNorm model.

The state's structure must not change across updates (``nnx.Optimizer``
refuses that), the statistics must follow the rule of each transform, and
the loss must go down.
"""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import flatjax

L, Y = 3, 2


class Net(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(4, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.bn(self.dense(x))))


def _data():
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 4))
    return x, (x[:, 0] > 0).astype(jnp.int32)


def _loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _scan_step(model, optimizer, x, y):
    graphdef, _, _ = nnx.split(model, nnx.Param, nnx.BatchStat)

    def grad_fn(walker, i, stats):
        def f(w):
            m = nnx.merge(graphdef, w, stats)
            return _loss(m, x, y), nnx.as_pure(nnx.state(m, nnx.BatchStat))
        return jax.value_and_grad(f, has_aux=True)(walker)

    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads, grad_fn=grad_fn, value=loss,
                     aux=nnx.as_pure(nnx.state(model, nnx.BatchStat)))
    nnx.update(model, flatjax.entropy_sgd_aux(nnx.as_pure(optimizer.opt_state)))
    return loss


def _plain_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss


def _replica_step(models, optimizer, x, y):
    def total(models):
        return nnx.vmap(_loss, in_axes=(0, None, None))(models, x, y).sum()
    loss, grads = nnx.value_and_grad(total)(models)
    optimizer.update(models, grads)
    return loss / Y


def _stats(model):
    return nnx.as_pure(nnx.state(model, nnx.BatchStat))


CASES = {
    "entropy_sgd": lambda s: flatjax.entropy_sgd(0.5, L, 0.5, inner_learning_rate=0.1,
                                                 has_aux=True, aux_init=s),
    "scale_by_entropy_sgd+sgd": lambda s: optax.chain(
        flatjax.scale_by_entropy_sgd(L, 0.5, inner_learning_rate=0.1, has_aux=True, aux_init=s),
        optax.sgd(0.5)),
    "entropy_sgd_stepwise": lambda s: flatjax.entropy_sgd_stepwise(0.5, L, 0.5,
                                                                   inner_learning_rate=0.1),
    "replicated_sgd": lambda s: flatjax.replicated_sgd(0.2, Y, 0.5),
    "replicate(adam)": lambda s: flatjax.replicate(optax.adam(0.02), Y, 0.5),
}


@pytest.mark.parametrize("name", list(CASES))
def test_transform_runs_under_nnx_optimizer_with_batch_norm(name):
    x, y = _data()
    if name.startswith("replica"):
        models = nnx.vmap(lambda k: Net(nnx.Rngs(k)))(jax.random.split(jax.random.PRNGKey(0), Y))
        step = _replica_step
    else:
        models = Net(nnx.Rngs(0))
        step = _plain_step if name == "entropy_sgd_stepwise" else _scan_step
    stats0 = _stats(models)
    optimizer = nnx.Optimizer(models, CASES[name](stats0), wrt=nnx.Param)
    structure = jax.tree.structure(nnx.as_pure(optimizer.opt_state))
    jitted = nnx.jit(step)
    losses = [float(jitted(models, optimizer, x, y)) for _ in range(3 * L)]
    assert jax.tree.structure(nnx.as_pure(optimizer.opt_state)) == structure
    assert losses[-1] < losses[0], losses
    # the running statistics moved from their initial values (mean 0)
    mean = _stats(models)["bn"]["mean"]
    assert mean.shape == ((Y, 8) if name.startswith("replica") else (8,))
    assert float(jnp.abs(mean).max()) > 1e-3
