"""Every public function and config rejects bad inputs with a clear message.

One table, ``CASES``, of ``Case(name, call, error, match)`` rows: calling
``call()`` must raise ``error`` (or a subclass) whose message matches the
regex ``match``, which names the argument and the value given (and, where
useful, what is expected). The rows run as one parametrized test whose ids
are the row names, so ``pytest --collect-only -q tests/test_bad_inputs.py``
counts them.

Every row fails before any heavy work: no dataset is prepared (names are
unknown or data dirs do not exist), nothing large is compiled.

Below the table, behaviour tests for non-finite numbers in the optimizers:
NaN/inf gradients must stay visible (never silently replaced by finite
numbers, so the training loop's NaN policy sees them), an unstable coupling
must show its divergence in the state, and zero gradients must never
produce NaN (optax#1743).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import flax.errors
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flatjax
from flatjax import cli, data, models, theory, training
from tests.helpers import TinyMLP

REPO = Path(__file__).resolve().parents[1]
MNIST5K_CONFIG = str(REPO / "experiments" / "configs" / "mnist5k.py")
NO_DIR = "/nonexistent/flatjax-bad-inputs"  # never created: data and workdirs that do not exist
KEY = jax.random.PRNGKey(0)


class Case(NamedTuple):
    """One bad input.

    Attributes:
      name: the pytest id, ``<function>-<what is wrong>``.
      call: a function of no arguments that makes the bad call.
      error: the exception type expected (subclasses match).
      match: regex searched in the message; it names the argument and value.
    """

    name: str
    call: Callable[[], Any]
    error: type[BaseException]
    match: str


class CLIFailed(Exception):
    """``flatjax ...`` exited non-zero; the message is what it printed on stderr."""


def _cli(*argv: str) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = cli.main(list(argv))
    if status != 0:
        raise CLIFailed(f"exit {status}: {err.getvalue().strip()}")


def _config(**fields):
    """validate_config on base_config() with ``fields`` set (``a__b`` is ``a.b``)."""

    def call():
        config = training.base_config()
        for dotted, value in fields.items():
            *parents, leaf = dotted.split("__")
            node = config
            for part in parents:
                node = node[part]
            node[leaf] = value
        training.validate_config(config)

    return call


def _config_with_unknown_key():
    config = training.base_config()
    config.learnig_rate = 0.2  # typo: base_config() is locked, so this raises (no silent 0.1)
    training.validate_config(config)


# -- shared small inputs ---------------------------------------------------------------------

_Y2 = jnp.zeros((2, 3))  # y = 2 replicas of a 3-vector


def _rsgd(**kwargs):
    base = dict(base_optimizer=optax.sgd(0.1), num_replicas=2, coupling=1.0, learning_rate=0.1)
    return lambda: flatjax.replicate(**{**base, **kwargs})


def _rsgd_update(grads, params=_Y2):
    opt = flatjax.replicate(optax.sgd(0.1), 2, 1.0, learning_rate=0.1)
    return lambda: opt.update(grads, opt.init(_Y2), params)


def _esgd(**kwargs):
    return lambda: flatjax.entropy_sgd(**{"learning_rate": 0.1, **kwargs})


def _esgd_scan_update(grad_fn):
    opt = flatjax.entropy_sgd(0.1, inner_steps=2)
    return lambda: opt.update(None, opt.init(jnp.zeros(3)), jnp.zeros(3), grad_fn=grad_fn)


def _esgd_stepwise_update(grads):
    opt = flatjax.entropy_sgd_stepwise(0.1, inner_steps=2)
    return lambda: opt.update(grads, opt.init(jnp.zeros(3)), jnp.zeros(3))


_APPLY = lambda v, x: x @ v["params"]["w"]  # noqa: E731 (a linear "network")
_VARS = {"params": {"w": jnp.zeros((2, 2))}}
_DATA = (jnp.eye(2), jnp.array([0, 1]))


def _le(data=_DATA, sigmas=(0.0, 0.1), **kwargs):
    kwargs = {"key": KEY, **kwargs}
    return lambda: flatjax.local_energy(_APPLY, _VARS, data, sigmas, **kwargs)


def _quad(w):
    return 0.5 * jnp.sum(w**2)


def _eval_shape_init(name, shape, **kwargs):
    model = models.get_model(name, 10, **kwargs)
    return lambda: jax.eval_shape(model.init, KEY, jnp.zeros(shape))


def _lenet_applied_to(shape):
    model = models.get_model("lenet5", 10)

    def call():
        variables = jax.eval_shape(model.init, KEY, jnp.zeros((1, 28, 28, 1)))
        return jax.eval_shape(model.apply, variables, jnp.zeros(shape))

    return call


_X4, _Y4 = np.zeros((4, 3), np.float32), np.zeros(4, np.int32)
_TINY = TinyMLP(hidden=2, num_classes=2)


def _evaluate(x=_X4, y=_Y4, **kwargs):
    def call():
        shapes = jax.eval_shape(_TINY.init, KEY, _X4)
        variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return training.evaluate(_TINY.apply, variables, x, y, **kwargs)

    return call


_GM_X = np.array([[1.0, 0.0], [-1.0, 0.0], [2.0, 1.0], [-2.0, 1.0]])
_GM_Y = np.array([1.0, -1.0, 1.0, -1.0])
_MESH = None


def _mesh():
    global _MESH
    if _MESH is None:
        _MESH = flatjax.make_mesh(replica=2, data=2, devices=jax.devices()[:4])
    return _MESH


def _empty_dir():
    return tempfile.mkdtemp(prefix="flatjax-bad-inputs-")


# -- the table ---------------------------------------------------------------------------------

CASES = [
    # ---- coupling schedules: hyperparameter ranges
    Case("exponential_coupling-init_value<=0",
         lambda: flatjax.exponential_coupling(0.0, 10), ValueError, r"init_value.*> 0.*0\.0"),
    Case("exponential_coupling-init_value=nan",
         lambda: flatjax.exponential_coupling(float("nan"), 10), ValueError, r"init_value.*nan"),
    Case("linear_coupling-total_steps<1",
         lambda: flatjax.linear_coupling(1.0, 0), ValueError, r"total_steps.*>= 1.*got 0"),
    Case("cosine_coupling-total_steps-float",
         lambda: flatjax.cosine_coupling(1.0, 10.5), ValueError, r"total_steps.*integer.*10\.5"),
    Case("exponential_coupling-factor<1",
         lambda: flatjax.exponential_coupling(1.0, 10, factor=0.5), ValueError,
         r"factor.*>= 1.*0\.5"),
    Case("exponential_coupling-factor=inf",
         lambda: flatjax.exponential_coupling(1.0, 10, factor=float("inf")), ValueError,
         r"factor.*finite.*inf"),
    Case("linear_coupling-max_value<init_value",
         lambda: flatjax.linear_coupling(1.0, 10, max_value=0.5), ValueError,
         r"max_value must be >= init_value = 1\.0.*got 0\.5"),
    Case("cosine_coupling-max_value<=0",
         lambda: flatjax.cosine_coupling(1.0, 10, max_value=-1.0), ValueError,
         r"max_value.*> 0.*-1\.0"),
    Case("exponential_coupling-steps_per_update>total_steps",
         lambda: flatjax.exponential_coupling(1.0, 10, steps_per_update=11), ValueError,
         r"steps_per_update.*\[1, 10\].*11"),
    # ---- Entropy-SGD: hyperparameter ranges, types, shapes, dtypes
    Case("entropy_sgd-L<1", _esgd(inner_steps=0), ValueError, r"inner_steps \(L\).*>= 1.*0"),
    Case("entropy_sgd-L-float", _esgd(inner_steps=2.0), TypeError, r"inner_steps \(L\).*int.*2\.0"),
    Case("entropy_sgd-gamma<0", _esgd(coupling=-0.1), ValueError, r"coupling \(γ\).*>= 0.*-0\.1"),
    Case("entropy_sgd-gamma=inf", _esgd(coupling=float("inf")), ValueError,
         r"coupling \(γ\).*finite.*inf"),
    Case("entropy_sgd-gamma-schedule<0", _esgd(coupling=lambda t: -1.0), ValueError,
         r"coupling \(γ\).*γ\(0\) = -1\.0"),
    Case("entropy_sgd-gamma-string", _esgd(coupling="0.1"), TypeError,
         r"coupling \(γ\).*float or an Optax schedule.*'0\.1'"),
    Case("entropy_sgd-eta'<=0", _esgd(inner_learning_rate=0.0), ValueError,
         r"inner_learning_rate \(η′\).*> 0.*0\.0"),
    Case("entropy_sgd-eps<0", _esgd(noise=-1e-4), ValueError, r"noise \(ε\).*>= 0.*-0\.0001"),
    Case("entropy_sgd-alpha=1", _esgd(average_weight=1.0), ValueError,
         r"average_weight \(α\).*\[0, 1\).*1\.0"),
    Case("entropy_sgd-alpha<0", _esgd(average_weight=-0.5), ValueError,
         r"average_weight \(α\).*\[0, 1\).*-0\.5"),
    Case("entropy_sgd-inner_weight_decay<0", _esgd(inner_weight_decay=-1.0), ValueError,
         r"inner_weight_decay \(λ′\).*>= 0.*-1\.0"),
    Case("entropy_sgd-inner_momentum=1", _esgd(inner_momentum=1.0), ValueError,
         r"inner_momentum.*\[0, 1\).*1\.0"),
    Case("entropy_sgd-lr<0", _esgd(learning_rate=-0.1), ValueError,
         r"learning_rate \(η\).*> 0.*-0\.1"),
    Case("entropy_sgd-lr-string", _esgd(learning_rate="0.1"), TypeError,
         r"learning_rate \(η\).*number or an Optax schedule.*'0\.1'"),
    Case("entropy_sgd-lr-missing", _esgd(learning_rate=None), ValueError,
         r"learning_rate \(η, outer step\) is required"),
    Case("entropy_sgd-lr-and-outer_optimizer", _esgd(outer_optimizer=optax.sgd(0.1)),
         ValueError, r"either learning_rate.*or outer_optimizer.*learning_rate=0\.1"),
    Case("entropy_sgd-momentum=1", _esgd(momentum=1.0), ValueError, r"momentum.*\[0, 1\).*1\.0"),
    Case("entropy_sgd-weight_decay<0", _esgd(weight_decay=-1.0), ValueError,
         r"weight_decay.*>= 0.*-1\.0"),
    Case("entropy_sgd-seed-float", _esgd(seed=0.5), TypeError, r"seed must be an int.*0\.5"),
    Case("entropy_sgd-calibrate-with-gamma0=0", _esgd(coupling=0.0, calibrate_coupling=True),
         ValueError, r"calibrate_coupling=True.*coupling\(0\) > 0, got 0\.0"),
    Case("scale_by_entropy_sgd-L<1", lambda: flatjax.scale_by_entropy_sgd(inner_steps=0),
         ValueError, r"inner_steps \(L\).*0"),
    Case("entropy_sgd_stepwise-alpha=1",
         lambda: flatjax.entropy_sgd_stepwise(0.1, average_weight=1.0), ValueError,
         r"average_weight \(α\).*1\.0"),
    Case("entropy_sgd.init-int-params",
         lambda: flatjax.entropy_sgd(0.1).init({"w": jnp.zeros(3, jnp.int32)}), TypeError,
         r"floating-point params.*\['w'\].*int32"),
    Case("entropy_sgd.update-no-grad_fn",
         lambda: flatjax.entropy_sgd(0.1).update(None, flatjax.entropy_sgd(0.1).init(
             jnp.zeros(3)), jnp.zeros(3)), ValueError, r"needs grad_fn="),
    Case("entropy_sgd.update-grad_fn-tree-mismatch",
         _esgd_scan_update(lambda p, i: {"w": p}), ValueError,
         r"grad_fn\(params, i\) must have the tree structure of params"),
    Case("entropy_sgd.update-grad_fn-shape-mismatch",
         _esgd_scan_update(lambda p, i: jnp.zeros(1)), ValueError,
         r"grad_fn\(params, i\) has shape \(1,\); the params leaf has shape \(3,\)"),
    Case("entropy_sgd_stepwise.update-grads-shape-mismatch",
         _esgd_stepwise_update(jnp.zeros((3, 1))), ValueError,
         r"updates has shape \(3, 1\); the params leaf has shape \(3,\)"),
    Case("entropy_sgd_stepwise.update-no-params",
         lambda: flatjax.entropy_sgd_stepwise(0.1).update(
             jnp.zeros(3), flatjax.entropy_sgd_stepwise(0.1).init(jnp.zeros(3))),
         ValueError, r"needs params \(the walker x′\)"),
    Case("entropy_sgd_eval_params-not-an-esgd-state",
         lambda: flatjax.entropy_sgd_eval_params(optax.sgd(0.1).init(jnp.zeros(3)), jnp.zeros(3)),
         ValueError, r"exactly one EntropySGDState.*found 0"),
    # ---- Replicated-SGD: replica axis, shapes, ranges, dtypes
    Case("replicate-y<1", _rsgd(num_replicas=0), ValueError, r"num_replicas must be >= 1, got 0"),
    Case("replicate-y-float", _rsgd(num_replicas=2.0), TypeError,
         r"num_replicas must be an int, got 2\.0"),
    Case("replicate-gamma<0", _rsgd(coupling=-0.1), ValueError,
         r"coupling must be >= 0; got -0\.1"),
    Case("replicate-gamma=inf", _rsgd(coupling=float("inf")), ValueError,
         r"coupling must be finite; got inf"),
    Case("replicate-gamma-schedule<0", _rsgd(coupling=lambda t: -2.0), ValueError,
         r"coupling must be >= 0; got -2\.0 \(the schedule's value at step 0\)"),
    Case("replicate-lr<0", _rsgd(learning_rate=-1.0), ValueError,
         r"learning_rate must be >= 0; got -1\.0"),
    Case("replicate-lr-string", _rsgd(learning_rate="0.1"), TypeError,
         r"learning_rate must be a non-negative float.*'0\.1'"),
    Case("replicate-proximal-adam-without-lr",
         _rsgd(base_optimizer=optax.adam(1e-3), learning_rate=None, coupling_step="proximal"),
         ValueError, r'coupling_step="proximal" needs.*not SGD-type.*learning_rate'),
    Case("replicate-lr-mismatch", _rsgd(learning_rate=0.3), ValueError,
         r"learning_rate=0\.3.*does not match the base optimizer's own learning rate 0\.1"),
    Case("replicate-coupling_step-unknown", _rsgd(coupling_step="implicit"), ValueError,
         r"coupling_step must be one of.*'implicit'"),
    Case("replicate-max_coupling<=0", _rsgd(max_coupling=0.0), ValueError,
         r"max_coupling must be positive; got 0\.0"),
    Case("replicate-base_optimizer-not-optax", _rsgd(base_optimizer="sgd"), TypeError,
         r"base_optimizer must be an optax.GradientTransformation, got 'sgd'"),
    Case("replicate.init-replica-axis-mismatch",
         lambda: flatjax.replicate(optax.sgd(0.1), 2, 1.0, learning_rate=0.1).init(
             jnp.zeros((3, 4))), ValueError,
         r"params has leading axis 3 \(shape \(3, 4\)\); .*replica axis of size 2"),
    Case("replicate.init-scalar-leaf",
         lambda: flatjax.replicate(optax.sgd(0.1), 2, 1.0, learning_rate=0.1).init(
             {"b": jnp.zeros(())}), ValueError, r"params\['b'\] has a scalar"),
    Case("replicate.init-int-params",
         lambda: flatjax.replicate(optax.sgd(0.1), 2, 1.0, learning_rate=0.1).init(
             jnp.zeros((2, 3), jnp.int32)), TypeError, r"floating-point params.*int32"),
    Case("replicate.init-y-not-divisible-by-named-axis",
         lambda: jax.vmap(
             lambda p: flatjax.replicate(
                 optax.sgd(0.1), 3, 1.0, axis_name="r", learning_rate=0.1).init(p),
             axis_name="r")(jnp.zeros((2, 1, 2))),
         ValueError, r"num_replicas=3 is not divisible by the size 2 of the named axis 'r'"),
    Case("replicate.update-replica-axis-mismatch",
         _rsgd_update(jnp.zeros((3, 3)), params=jnp.zeros((3, 3))), ValueError,
         r"params has leading axis 3.*size 2"),
    Case("replicate.update-grads-tree-mismatch", _rsgd_update({"w": _Y2}), ValueError,
         r"updates must have the tree structure of params"),
    Case("replicate.update-grads-leaf-shape-mismatch", _rsgd_update(jnp.zeros((2, 1))),
         ValueError, r"updates has shape \(2, 1\); the params leaf has shape \(2, 3\)"),
    Case("replicate.update-no-params",
         lambda: flatjax.replicate(optax.sgd(0.1), 2, 1.0, learning_rate=0.1).update(
             _Y2, flatjax.replicate(optax.sgd(0.1), 2, 1.0, learning_rate=0.1).init(_Y2)),
         ValueError, r"replicate needs params"),
    Case("init_replicas-y<1", lambda: flatjax.init_replicas(lambda k: k, KEY, 0), ValueError,
         r"num_replicas must be >= 1, got 0"),
    Case("replica_center-scalar-leaf", lambda: flatjax.replica_center({"w": jnp.float32(1)}),
         ValueError, r"leading replica axis; found a scalar leaf"),
    Case("replica_center-ragged-replica-axes",
         lambda: flatjax.replica_center({"a": jnp.zeros((2, 3)), "b": jnp.zeros((3,))}),
         ValueError, r"params\['b'\] has leading axis 3.*size 2"),
    Case("balanced_coupling-losses-2d",
         lambda: flatjax.balanced_coupling(jnp.zeros((2, 1)), _Y2), ValueError,
         r"losses must have shape \(num_replicas,\), got shape \(2, 1\)"),
    Case("balanced_coupling-y-mismatch",
         lambda: flatjax.balanced_coupling(jnp.zeros(2), jnp.zeros((3, 2))), ValueError,
         r"params has leading axis 3.*size 2"),
    Case("balanced_coupling-y=1",
         lambda: flatjax.balanced_coupling(jnp.zeros(1), jnp.zeros((1, 2))), ValueError,
         r"needs y >= 2 replicas"),
    Case("replica_map-strategy-unknown",
         lambda: flatjax.replica_map(lambda w: w, strategy="pmap"), ValueError,
         r"strategy must be one of.*'pmap'"),
    Case("replica_map-leading-axes-differ",
         lambda: flatjax.replica_map(lambda a, b: a, strategy="vmap")(
             jnp.zeros((2, 1)), jnp.zeros((3, 1))), ValueError,
         r"same leading replica axis; found leading sizes \[2, 3\]"),
    Case("recompute_batch_stats-no-batch_stats",
         lambda: flatjax.recompute_batch_stats(lambda v, b: (b, v), {"params": {}}, []),
         ValueError, r"'batch_stats' collection.*keys \['params'\]"),
    # ---- flatness: σ grids, num_draws, data shapes and dtypes, ranges
    Case("local_energy-sigma<0", _le(sigmas=[0.0, -0.1]), ValueError,
         r"sigmas must be >= 0, got \[0\.0, -0\.1\]"),
    Case("local_energy-sigma-nan", _le(sigmas=[float("nan")]), ValueError,
         r"sigmas must be finite, got \[nan\]"),
    Case("local_energy-sigma-empty", _le(sigmas=[]), ValueError,
         r"sigmas must be a non-empty.*shape \(0,\)"),
    Case("local_energy-sigma-2d", _le(sigmas=[[0.1, 0.2]]), ValueError,
         r"sigmas must be .*1-D.*shape \(1, 2\)"),
    Case("local_energy-num_draws<1", _le(num_draws=0), ValueError,
         r"num_draws must be an integer >= 1, got 0"),
    Case("local_energy-noise-unknown", _le(noise="gaussian"), ValueError,
         r"noise must be one of.*'gaussian'"),
    Case("local_energy-metric-unknown", _le(metric="accuracy"), ValueError,
         r"metric must be one of.*'accuracy'"),
    Case("local_energy-no-key", _le(key=None), ValueError, r"key is required"),
    Case("local_energy-batch_size<1", _le(batch_size=0), ValueError,
         r"batch_size must be an integer >= 1, got 0"),
    Case("local_energy-perturb-unknown", _le(perturb="weights"), ValueError,
         r"perturb must be one of.*'weights'"),
    Case("local_energy-x-y-length-mismatch", _le(data=(jnp.eye(3), jnp.array([0, 1]))),
         ValueError, r"same length, got 3 inputs and 2 labels"),
    Case("local_energy-empty-dataset",
         _le(data=(jnp.zeros((0, 2)), jnp.zeros(0, jnp.int32))), ValueError,
         r"dataset is empty \(0 examples\)"),
    Case("local_energy-float-labels", _le(data=(jnp.eye(2), jnp.array([0.0, 1.0]))), TypeError,
         r"labels y must be integer class indices, got dtype float32"),
    Case("local_energy-dict-data-missing-label", _le(data={"image": jnp.eye(2)}), ValueError,
         r"needs keys 'image' and 'label', got \['image'\]"),
    Case("local_energy-variables-without-params",
         lambda: flatjax.local_energy(_APPLY, {"w": 1}, _DATA, 0.1, key=KEY), ValueError,
         r"'params' collection.*keys \['w'\]"),
    Case("local_energy_fn-energy-not-callable",
         lambda: flatjax.local_energy_fn(None, jnp.zeros(2), 0.1, key=KEY), TypeError,
         r"energy_fn must be callable, got NoneType"),
    Case("dataset_loss-batch_size<1",
         lambda: flatjax.dataset_loss(_APPLY, _VARS, _DATA, batch_size=-1), ValueError,
         r"batch_size must be an integer >= 1, got -1"),
    Case("hessian_top_eigenvalue-num_iters<1",
         lambda: flatjax.hessian_top_eigenvalue(_quad, jnp.ones(2), key=KEY, num_iters=0),
         ValueError, r"num_iters must be an integer >= 1, got 0"),
    Case("hessian_top_eigenvalue-tol<=0",
         lambda: flatjax.hessian_top_eigenvalue(_quad, jnp.ones(2), key=KEY, tol=-1.0),
         ValueError, r"tol must be a finite number > 0, got -1\.0"),
    Case("hessian_top_eigenvalue-no-key",
         lambda: flatjax.hessian_top_eigenvalue(_quad, jnp.ones(2), key=None),
         ValueError, r"key is required"),
    Case("hessian_trace-num_samples<1",
         lambda: flatjax.hessian_trace(_quad, jnp.ones(2), key=KEY, num_samples=0), ValueError,
         r"num_samples must be an integer >= 1, got 0"),
    Case("hessian_trace-no-key",
         lambda: flatjax.hessian_trace(_quad, jnp.ones(2), key=None), ValueError,
         r"key is required"),
    Case("hvp-v-shape-mismatch",
         lambda: flatjax.hvp(_quad, jnp.ones(2), jnp.ones(3)), ValueError,
         r"v must have the (tree structure and )?shapes? of params.*\(3,\).*\(2,\)"),
    Case("sam_sharpness-rho<=0", lambda: flatjax.sam_sharpness(_quad, jnp.ones(2), 0.0),
         ValueError, r"rho must be a finite number > 0, got 0\.0"),
    Case("sam_sharpness-rho-nan", lambda: flatjax.sam_sharpness(_quad, jnp.ones(2), float("nan")),
         ValueError, r"rho must be a finite number > 0, got nan"),
    Case("sam_sharpness-num_steps<1",
         lambda: flatjax.sam_sharpness(_quad, jnp.ones(2), 0.1, num_steps=0), ValueError,
         r"num_steps must be an integer >= 1, got 0"),
    Case("local_entropy-gamma<=0",
         lambda: flatjax.local_entropy(_quad, jnp.ones(2), -1.0, key=KEY), ValueError,
         r"coupling must be a finite number > 0, got -1\.0"),
    Case("local_entropy-num_rungs<2",
         lambda: flatjax.local_entropy(_quad, jnp.ones(2), 1.0, key=KEY, num_rungs=1),
         ValueError, r"num_rungs must be >= 2, got 1"),
    Case("local_entropy-gamma_max<=gamma",
         lambda: flatjax.local_entropy(_quad, jnp.ones(2), 1.0, key=KEY, gamma_max=0.5,
                                       curvature=1.0),
         ValueError, r"gamma_max must exceed coupling=1\.0, got 0\.5"),
    Case("local_entropy-step_fraction>=2",
         lambda: flatjax.local_entropy(_quad, jnp.ones(2), 1.0, key=KEY, step_fraction=2.5),
         ValueError, r"step_fraction must be in \(0, 2\).*2\.5"),
    Case("local_entropy-burn_in>=num_steps",
         lambda: flatjax.local_entropy(_quad, jnp.ones(2), 1.0, key=KEY, num_steps=10,
                                       burn_in=10),
         ValueError, r"burn_in must be an integer in \[0, num_steps=10\), got 10"),
    Case("local_entropy-sampler-unknown",
         lambda: flatjax.local_entropy(_quad, jnp.ones(2), 1.0, key=KEY, sampler="hmc"),
         ValueError, r"sampler must be one of.*'hmc'"),
    # ---- theory: α, Δ, ρ, N, shapes, labels
    Case("bayes_optimal_error-alpha<=0", lambda: theory.bayes_optimal_error(0.0), ValueError,
         r"alpha \(α\) must be a positive number, got 0\.0"),
    Case("bayes_optimal_error-delta<=0", lambda: theory.bayes_optimal_error(1.0, delta=-1.0),
         ValueError, r"delta \(Δ\) must be a positive number, got -1\.0"),
    Case("bayes_optimal_error-rho=1", lambda: theory.bayes_optimal_error(1.0, rho=1.0),
         ValueError, r"rho = P\(y = \+1\) must be a number in \(0, 1\), got 1\.0"),
    Case("bayes_optimal_error-rho=0", lambda: theory.bayes_optimal_error(1.0, rho=0.0),
         ValueError, r"rho.*\(0, 1\), got 0\.0"),
    Case("gaussian_mixture-alpha-nan", lambda: theory.gaussian_mixture(KEY, 3, float("nan")),
         ValueError, r"alpha \(α\) must be a positive number, got nan"),
    Case("gaussian_mixture-N<1", lambda: theory.gaussian_mixture(KEY, 0, 1.0), ValueError,
         r"dim \(N\) must be an integer >= 1, got 0"),
    Case("sample_mixture-delta<=0",
         lambda: theory.sample_mixture(KEY, jnp.ones(2), 3, delta=0.0), ValueError,
         r"delta \(Δ\) must be a positive number, got 0\.0"),
    Case("sample_mixture-v-2d", lambda: theory.sample_mixture(KEY, jnp.ones((2, 2)), 3),
         ValueError, r"v must be a vector \[N\], got shape \(2, 2\)"),
    Case("generalization_error-w-v-shapes",
         lambda: theory.generalization_error(jnp.ones(3), 0.0, jnp.ones(4)), ValueError,
         r"w and v must be vectors of one shape, got \(3,\) and \(4,\)"),
    Case("generalization_error-rho>1",
         lambda: theory.generalization_error(jnp.ones(2), 0.0, jnp.ones(2), rho=1.5),
         ValueError, r"rho.*\(0, 1\), got 1\.5"),
    Case("hebbian-labels-not-pm1", lambda: theory.hebbian(_GM_X, np.array([1, 0, 1, 0])),
         ValueError, r"labels y must be \+1 or -1, found values \[0, 1\]"),
    Case("hebbian-x-y-length-mismatch", lambda: theory.hebbian(_GM_X, _GM_Y[:3]), ValueError,
         r"x of shape \[P, N\] and y of shape \[P\].*x \(4, 2\) and y \(3,\)"),
    Case("erm-loss-unknown", lambda: theory.erm(_GM_X, _GM_Y, loss="l2"), ValueError,
         r"loss must be one of \['hinge', 'logistic', 'square'\], got 'l2'"),
    Case("erm-ridge<0", lambda: theory.erm(_GM_X, _GM_Y, loss="square", ridge=-1.0), ValueError,
         r"ridge must be a number >= 0, got -1\.0"),
    Case("select_ridge-empty-grid",
         lambda: theory.select_ridge(KEY, _GM_X, _GM_Y, loss="square", ridges=[]), ValueError,
         r"ridges must hold at least one value"),
    Case("classifier_local_energy-sigma<0",
         lambda: theory.classifier_local_energy(jnp.ones(2), 0.0, _GM_X, _GM_Y, [-0.1]),
         ValueError, r"sigmas must be a 1-d sequence of numbers >= 0, got \[-0\.1\]"),
    Case("replicated_sgd_fit-temperature<=0",
         lambda: theory.replicated_sgd_fit(KEY, _GM_X, _GM_Y, loss="error", temperature=0.0),
         ValueError, r"temperature must be positive, got 0\.0"),
    Case("entropy_sgd_fit-L<1",
         lambda: theory.entropy_sgd_fit(KEY, _GM_X, _GM_Y, inner_steps=0), ValueError,
         r"inner_steps must be an integer >= 1, got 0"),
    Case("training_error-w-x-shapes",
         lambda: theory.training_error(jnp.ones(3), 0.0, _GM_X, _GM_Y), ValueError,
         r"w.*\(3,\).*x.*\(4, 2\)"),
    # ---- models: names, ranges, image shapes, dtypes
    Case("get_model-unknown-name", lambda: models.get_model("resnet19", 10), ValueError,
         r"unknown model 'resnet19'; valid names are \[.*'lenet5'.*\]"),
    Case("get_model-num_classes<1", lambda: models.get_model("lenet5", 0), ValueError,
         r"num_classes must be a positive integer, got 0"),
    Case("get_model-unknown-field", lambda: models.get_model("lenet5", 10, width=3), TypeError,
         r"unexpected keyword argument 'width'"),
    Case("MLP-hidden_sizes<=0", lambda: models.get_model("mlp_tiny", 10, hidden_sizes=(0,)),
         ValueError, r"hidden_sizes must be positive integers, got \(0,\)"),
    Case("ResNet-shortcut-unknown", lambda: models.get_model("resnet_tiny", 10, shortcut="x"),
         ValueError, r"shortcut must be one of.*got 'x'"),
    Case("WideResNet-depth", lambda: models.get_model("wrn_tiny", 10, depth=11), ValueError,
         r"depth must be an integer ≥ 10 with \(depth - 4\) divisible by 6, got 11"),
    Case("PyramidNet-alpha<0", lambda: models.get_model("pyramidnet_tiny", 10, alpha=-1.0),
         ValueError, r"alpha must be non-negative, got -1\.0"),
    Case("EfficientNet-dropout_rate=1",
         lambda: models.get_model("efficientnet_tiny", 10, dropout_rate=1.0), ValueError,
         r"dropout_rate must be in \[0, 1\), got 1\.0"),
    Case("LeNet5-flat-input", _eval_shape_init("lenet5", (2, 784)), ValueError,
         r"LeNet5 expects NHWC images \[B, H, W, C\], got shape \(2, 784\)"),
    Case("ResNet-unbatched-image", _eval_shape_init("resnet_tiny", (32, 32, 3)), ValueError,
         r"ResNet expects NHWC images.*got shape \(32, 32, 3\)"),
    Case("LeNet5-applied-to-other-channels", _lenet_applied_to((1, 28, 28, 3)),
         flax.errors.ScopeParamShapeError,
         r'"kernel" in "/Conv_0".*\(5, 5, 3, 6\).*\(5, 5, 1, 6\)'),
    Case("LeNet5-image-too-small", _eval_shape_init("lenet5", (1, 8, 8, 1)), ValueError,
         r"LeNet5 needs images of at least 12×12 pixels.*got shape \(1, 8, 8, 1\)"),
    # ---- data: dataset names, not-prepared datasets, ranges
    Case("get_info-unknown-dataset", lambda: data.get_info("cifar11"), ValueError,
         r"Unknown dataset 'cifar11'; known datasets: \[.*'cifar10'.*'mnist5k'.*\]"),
    Case("train_batches-unknown-dataset",
         lambda: data.train_batches("imagenet", batch_size=8, seed=0, data_dir=NO_DIR),
         ValueError, r"Unknown dataset 'imagenet'; known datasets"),
    Case("load_arrays-official-not-prepared",
         lambda: data.load_arrays("cifar10", "train", data_dir=NO_DIR),
         data.DatasetNotPreparedError,
         r"(?s)'cifar10'.*not prepared in data_dir '/nonexistent.*flatjax never downloads"
         r".*tfds build cifar10 --file_format=array_record"),
    Case("eval_batches-alias-not-prepared", lambda: data.eval_batches("svhn", data_dir=NO_DIR),
         data.DatasetNotPreparedError, r"'svhn'.*tfds 'svhn_cropped'.*not prepared"),
    Case("prepare-tiny_imagenet-not-prepared",
         lambda: data.prepare("tiny_imagenet", NO_DIR), data.DatasetNotPreparedError,
         r"'tiny_imagenet' is not prepared in data_dir"),
    Case("prepare_tiny_imagenet-missing-source",
         lambda: data.prepare_tiny_imagenet(NO_DIR, NO_DIR), FileNotFoundError,
         r"'/nonexistent.*' does not contain tiny-imagenet-200/wnids\.txt"),
    Case("train_batches-batch_size<1",
         lambda: data.train_batches("digits", batch_size=0, seed=0, data_dir=NO_DIR),
         ValueError, r"batch_size must be an integer >= 1; got 0"),
    Case("train_batches-seed<0",
         lambda: data.train_batches("digits", batch_size=8, seed=-1, data_dir=NO_DIR),
         ValueError, r"seed must be an integer >= 0; got -1"),
    Case("train_batches-num_replicas<1",
         lambda: data.train_batches("digits", batch_size=8, seed=0, num_replicas=0,
                                    data_dir=NO_DIR),
         ValueError, r"num_replicas must be an integer >= 1; got 0"),
    Case("train_batches-stack-without-drop_remainder",
         lambda: data.train_batches("digits", batch_size=8, seed=0, stack=2,
                                    drop_remainder=False, data_dir=NO_DIR),
         ValueError, r"stack=L needs drop_remainder=True"),
    Case("train_batches-augment-on-vectors",
         lambda: data.train_batches("mnist1d", batch_size=8, seed=0, augment=True,
                                    data_dir=NO_DIR),
         ValueError, r"augment/cutout need image data.*'mnist1d' has input shape \(40,\)"),
    Case("load_arrays-validation_fraction=1",
         lambda: data.load_arrays("digits", "train", data_dir=NO_DIR, validation_fraction=1.0),
         ValueError, r"validation_fraction must be in \[0, 1\); got 1\.0"),
    Case("load_arrays-split-unknown", lambda: data.load_arrays("digits", "valid", NO_DIR),
         ValueError, r"split must be 'train', 'validation', 'test'.*got 'valid'"),
    Case("steps_per_epoch-batch_size<1", lambda: data.steps_per_epoch("digits", 0), ValueError,
         r"batch_size must be an integer >= 1; got 0"),
    Case("gaussian_mixture_arrays-dim<1", lambda: data.gaussian_mixture_arrays(dim=0),
         ValueError, r"dim \(N\) must be an integer >= 1; got 0"),
    Case("gaussian_mixture_arrays-delta<0",
         lambda: data.gaussian_mixture_arrays(dim=3, delta=-1.0), ValueError,
         r"delta \(Δ, noise variance\) must be a finite number > 0; got -1\.0"),
    Case("gaussian_mixture_arrays-alpha<=0",
         lambda: data.gaussian_mixture_arrays(dim=3, alpha=0.0), ValueError,
         r"alpha \(α = P/N\) must be a finite number > 0; got 0\.0"),
    Case("normalize-std-nan",
         lambda: data.normalize(np.zeros((2, 2, 3)), (0, 0, 0), (np.nan, 1, 1)), ValueError,
         r"std must be > 0 and finite everywhere; got \[nan, 1\.0, 1\.0\]"),
    Case("normalize-channel-count",
         lambda: data.normalize(np.zeros((2, 2, 3)), (0.5, 0.5), (1, 1)), ValueError,
         r"mean must be a scalar or one value per channel; got 2 values.*\(2, 2, 3\)"),
    Case("random_crop-padding-float",
         lambda: data.random_crop(np.zeros((4, 4, 1)), np.random.default_rng(0), 1.5),
         ValueError, r"padding must be an integer >= 0; got 1\.5"),
    Case("cutout-size<1",
         lambda: data.cutout(np.zeros((4, 4, 1)), np.random.default_rng(0), 0), ValueError,
         r"cutout size must be an integer >= 1; got 0"),
    Case("random_flip-not-an-image",
         lambda: data.random_flip(np.zeros((4, 4)), np.random.default_rng(0)), ValueError,
         r"random_flip expects one image.*\[H, W, C\].*shape \(4, 4\)"),
    # ---- config: keys and values
    Case("config-algorithm-unknown", _config(algorithm="adam"), ValueError,
         r"config\.algorithm must be one of 'sgd', 'entropy_sgd', 'replicated_sgd', got 'adam'"),
    Case("config-batch_size<=0", _config(batch_size=0), ValueError,
         r"config\.batch_size must be an integer > 0, got 0"),
    Case("config-batch_size-float", _config(batch_size=1.5), TypeError,
         r"'batch_size'.*1\.5.*cannot be casted"),
    Case("config-num_epochs<=0", _config(num_epochs=0.0), ValueError,
         r"config\.num_epochs must be a number > 0, got 0\.0"),
    Case("config-learning_rate<0", _config(learning_rate=-0.1), ValueError,
         r"config\.learning_rate must be a number > 0, got -0\.1"),
    Case("config-momentum=1", _config(momentum=1.0), ValueError,
         r"config\.momentum must be a number in \[0, 1\), got 1\.0"),
    Case("config-nan_policy-unknown", _config(nan_policy="ignore"), ValueError,
         r"config\.nan_policy must be one of 'stop', 'skip', got 'ignore'"),
    Case("config-esgd.inner_steps<1", _config(esgd__inner_steps=0), ValueError,
         r"config\.esgd\.inner_steps must be an integer > 0, got 0"),
    Case("config-esgd.average=1", _config(esgd__average=1.0), ValueError,
         r"config\.esgd\.average must be a number in \[0, 1\), got 1\.0"),
    Case("config-esgd.coupling_factor<1", _config(esgd__coupling_factor=0.5), ValueError,
         r"config\.esgd\.coupling_factor must be a number >= 1, got 0\.5"),
    Case("config-rsgd.num_replicas<1", _config(rsgd__num_replicas=0), ValueError,
         r"config\.rsgd\.num_replicas must be an integer > 0, got 0"),
    Case("config-rsgd.coupling<0", _config(rsgd__coupling=-1.0), ValueError,
         r"config\.rsgd\.coupling must be a number > 0 or None, got -1\.0"),
    Case("config-rsgd.strategy-unknown", _config(rsgd__strategy="pmap"), ValueError,
         r"config\.rsgd\.strategy must be one of 'auto', 'vmap', 'unroll', got 'pmap'"),
    Case("config-budget-unknown", _config(budget="flops"), ValueError,
         r"config\.budget must be one of 'epochs', 'gradients', got 'flops'"),
    Case("config-dataset-unknown", _config(dataset="cifar11"), ValueError,
         r"config\.dataset.*'cifar11'.*mnist5k"),
    Case("config-model-unknown", _config(model="resnet19"), ValueError,
         r"config\.model.*'resnet19'.*lenet5"),
    Case("config-esgd.coupling_max<coupling",
         _config(esgd__coupling=0.03, esgd__coupling_max=0.01), ValueError,
         r"config\.esgd\.coupling_max.*0\.01.*coupling.*0\.03"),
    Case("config-unknown-key", _config_with_unknown_key, AttributeError,
         r'learnig_rate.*Did you mean "learning_rate"'),
    Case("plan_steps-data_steps_per_epoch<1",
         lambda: training.plan_steps(training.base_config(), 0), ValueError,
         r"data_steps_per_epoch must be an integer >= 1.*got 0"),
    Case("make_train_step-algorithm-unknown",
         lambda: training.make_train_step(_unvalidated(algorithm="adam")),
         ValueError, r"config\.algorithm must be one of.*'adam'"),
    # ---- training library: data sources, evaluation, checkpoints, workdirs
    Case("train_and_evaluate-invalid-config",
         lambda: training.train_and_evaluate(_unvalidated(batch_size=0), NO_DIR), ValueError,
         r"config\.batch_size must be an integer > 0, got 0"),
    Case("array_source-batch_size>n",
         lambda: training.array_source((_X4, _Y4), (_X4, _Y4), num_classes=2, batch_size=5),
         ValueError, r"batch_size=5 exceeds the 4 training examples"),
    Case("array_source-batch_size<1",
         lambda: training.array_source((_X4, _Y4), (_X4, _Y4), num_classes=2, batch_size=0),
         ValueError, r"batch_size must be an integer >= 1, got 0"),
    Case("array_source-x-y-length-mismatch",
         lambda: training.array_source((_X4, _Y4[:3]), (_X4, _Y4), num_classes=2,
                                       batch_size=2),
         ValueError, r"x with 4 rows and y with 3 labels"),
    Case("array_source-num_classes<1",
         lambda: training.array_source((_X4, _Y4), (_X4, _Y4), num_classes=0, batch_size=2),
         ValueError, r"num_classes must be an integer >= 1, got 0"),
    Case("evaluate-empty-dataset", _evaluate(x=_X4[:0], y=_Y4[:0]), ValueError,
         r"Cannot evaluate on an empty dataset"),
    Case("evaluate-x-y-length-mismatch", _evaluate(x=_X4[:3]), ValueError,
         r"x and y must hold the same number of examples, got x with 3 and y with 4"),
    Case("evaluate-float-labels", _evaluate(y=_Y4.astype(np.float32)), TypeError,
         r"labels y must be integer class indices, got dtype float32"),
    Case("evaluate_replicas-no-replica-axis",
         lambda: training.evaluate_replicas(
             _TINY.apply, jax.tree.map(jnp.zeros_like, _TINY.init(KEY, _X4)), _X4, _Y4),
         ValueError, r"variables.*leading replica axis"),
    Case("evaluate-batch_size<1", _evaluate(batch_size=0), ValueError,
         r"batch_size must be an integer >= 1, got 0"),
    Case("Checkpointer-keep<1", lambda: training.Checkpointer(_empty_dir(), keep=0), ValueError,
         r"keep must be an integer >= 1, got 0"),
    Case("eval_variables-center_batch_stats-unknown",
         lambda: training.eval_variables(None, center_batch_stats="median"), ValueError,
         r"center_batch_stats must be 'average' or 'recompute', got 'median'"),
    # ---- command line: config files, overrides, workdirs
    Case("cli-eval-nonexistent-workdir", lambda: _cli("eval", "--workdir", NO_DIR), CLIFailed,
         r"exit 2: flatjax eval: error: workdir '/nonexistent/flatjax-bad-inputs' does not exist"),
    Case("cli-flatness-nonexistent-workdir",
         lambda: _cli("flatness", "--workdir", NO_DIR), CLIFailed,
         r"flatjax flatness: error: workdir '/nonexistent.*' does not exist"),
    Case("cli-eval-workdir-without-run", lambda: _cli("eval", "--workdir", _empty_dir()),
         CLIFailed, r"flatjax eval: error: no checkpoint in /.*flatjax-bad-inputs-.*config\.json"),
    Case("cli-train-config-not-found",
         lambda: _cli("train", "--config", NO_DIR + ".py", "--workdir", _empty_dir()),
         CLIFailed, r"config file not found: '/nonexistent/flatjax-bad-inputs\.py'"),
    Case("cli-train-unknown-override-key",
         lambda: _cli("train", "--config", MNIST5K_CONFIG, "--workdir", _empty_dir(),
                      "--set", "learnig_rate=0.2"),
         CLIFailed, r"unknown config key 'learnig_rate'; did you mean: learning_rate"),
    Case("cli-train-bad-override-value",
         lambda: _cli("train", "--config", MNIST5K_CONFIG, "--workdir", _empty_dir(),
                      "--set", "batch_size=0"),
         CLIFailed, r"config\.batch_size must be an integer > 0, got 0"),
    Case("cli-train-unknown-dataset",
         lambda: _cli("train", "--config", MNIST5K_CONFIG, "--workdir", _empty_dir(),
                      "--set", "dataset=cifar11"),
         CLIFailed, r"Unknown dataset 'cifar11'; known datasets"),
    Case("apply_overrides-int-field-given-float",
         lambda: cli.apply_overrides(training.base_config(), ["batch_size=0.5"]), ValueError,
         r"--set batch_size=0\.5: expected an integer \(the field is 128\)"),
    # ---- multi-device: replica axis vs device count
    Case("make_mesh-replica-not-dividing-devices",
         lambda: flatjax.make_mesh(replica=3, devices=jax.devices()[:4]), ValueError,
         r"replica=3 does not divide the 4 devices"),
    Case("make_mesh-replica<1", lambda: flatjax.make_mesh(replica=0), ValueError,
         r"replica must be >= 1, got 0"),
    Case("make_mesh-replica*data!=devices",
         lambda: flatjax.make_mesh(replica=2, data=1, devices=jax.devices()[:4]), ValueError,
         r"replica \* data = 2 \* 1 = 2 must equal the number of devices, 4"),
    Case("batch_sharding-layout-unknown", lambda: flatjax.batch_sharding(_mesh(), "rows"),
         ValueError, r"layout must be one of.*got 'rows'"),
    Case("shard_batch-y-not-divisible",
         lambda: flatjax.shard_batch({"image": np.zeros((3, 4, 2))}, _mesh(), "replicas"),
         ValueError, r"batch\['image'\] has y \(replicas\) = 3 on axis 0, not divisible by the "
         r"mesh's 'replica' size 2"),
    Case("rsgd_shard_map_step-y-not-divisible",
         lambda: flatjax.rsgd_shard_map_step(lambda w, b: 0.0, _mesh(), optax.sgd(0.1), 3, 1.0,
                                             learning_rate=0.1),
         ValueError, r"num_replicas=3 is not divisible by the mesh's replica axis of size 2"),
]  # fmt: skip


def _unvalidated(**fields):
    """base_config() with ``fields`` set, not validated (for functions that validate it)."""
    config = training.base_config()
    for key, value in fields.items():
        config[key] = value
    return config


def _ids(rows):
    return [row if not isinstance(row, Case) else pytest.param(row, id=row.name) for row in rows]


def test_case_names_are_unique():
    names = [(row.values[0] if not isinstance(row, Case) else row).name for row in CASES]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert len(names) >= 60


@pytest.mark.parametrize("case", _ids(CASES))
def test_bad_input(case: Case):
    with pytest.raises(case.error, match=case.match):
        case.call()


# -- non-finite numbers in the optimizers ------------------------------------------------------


def _with_nan(tree, value=jnp.nan):
    """``tree`` with its first entry of replica 0 set to ``value``."""
    return jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(value), tree)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
@pytest.mark.parametrize("coupling_step", ["proximal", "explicit"])
def test_replicate_non_finite_gradients_stay_visible(bad, coupling_step):
    """A NaN/inf gradient in one replica is never turned into a finite update.

    The training loop's NaN policy reads the updated params and
    ``center_distance``; the optimizer must pass the non-finite value on.
    """
    opt = flatjax.replicate(
        optax.sgd(0.1), 2, 1.0, learning_rate=0.1, coupling_step=coupling_step
    )
    params = jnp.array([[0.0, 1.0], [1.0, 0.0]])
    state = opt.init(params)
    updates, state = opt.update(_with_nan(jnp.ones_like(params), bad), state, params)
    params = optax.apply_updates(params, updates)
    assert not bool(jnp.all(jnp.isfinite(params)))
    _, state = opt.update(jnp.zeros_like(params), state, params)
    assert not bool(jnp.isfinite(state.center_distance))


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_entropy_sgd_non_finite_gradients_stay_visible(bad):
    """NaN/inf in one inner gradient reaches the anchor update, in both modes."""
    params = jnp.array([1.0, -1.0])
    scan = flatjax.entropy_sgd(0.1, inner_steps=2, noise=0.0)
    grad_fn = lambda w, i: jnp.where(i == 1, jnp.full_like(w, bad), w)  # noqa: E731
    updates, _ = scan.update(None, scan.init(params), params, grad_fn=grad_fn)
    assert not bool(jnp.all(jnp.isfinite(updates)))

    stepwise = flatjax.entropy_sgd_stepwise(0.1, inner_steps=2, noise=0.0)
    state = stepwise.init(params)
    walker = params
    for grads in (jnp.full_like(params, bad), jnp.zeros_like(params)):  # lands at call 2
        step, state = stepwise.update(grads, state, walker)
        walker = optax.apply_updates(walker, step)
    assert int(state.count) == 1
    assert not bool(jnp.all(jnp.isfinite(flatjax.entropy_sgd_eval_params(state, walker))))


def test_explicit_coupling_past_the_bound_is_clamped_not_divergent():
    """lr·γ = 5 > 2: unclamped, plain SGD's explicit coupling step would multiply
    wᵃ − c by (1 − ηγ) = −4 per step. γ is clamped to half the bound read from
    the base optimizer (ηγ = 1: the step lands on the centre), visibly."""
    params0 = jnp.array([[0.0, 1.0], [1.0, 0.0]])  # mean_a ‖wᵃ − c‖² = 0.5
    grads = jnp.zeros_like(params0)
    opt = flatjax.replicate(optax.sgd(1.0), 2, 5.0, coupling_step="explicit")
    update = jax.jit(opt.update)
    params, state = params0, opt.init(params0)
    distances = []
    for _ in range(40):
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        distances.append(float(state.center_distance))
    assert np.all(np.isfinite(distances)) and distances[-1] <= 0.5
    assert float(state.coupling) == pytest.approx(1.0)
    assert float(state.requested_coupling) == pytest.approx(5.0)


@pytest.mark.parametrize("calibrate", [False, True])
def test_entropy_sgd_zero_gradients_give_no_nan(calibrate):
    """Zero gradients at a point that never moves (noise 0): updates are 0, never NaN.

    With ``calibrate_coupling`` the γ_0 calibration divides by ½‖x − x′‖² = 0
    here; it must keep γ finite (optax#1743 is the NaN this guards against).
    """
    params = {"w": jnp.zeros(3), "b": jnp.ones(2)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    scan = flatjax.entropy_sgd(0.1, inner_steps=3, noise=0.0, inner_weight_decay=0.0,
                               calibrate_coupling=calibrate)
    grad_fn = (lambda w, i: (zeros, 0.0)) if calibrate else (lambda w, i: zeros)  # noqa: E731
    state = scan.init(params)
    for _ in range(2):
        updates, state = scan.update(None, state, params, grad_fn=grad_fn)
        for leaf in jax.tree.leaves(updates):
            np.testing.assert_array_equal(leaf, 0.0)
    assert bool(jnp.isfinite(flatjax.entropy_sgd_coupling(state)))

    stepwise = flatjax.entropy_sgd_stepwise(0.1, inner_steps=2, noise=0.0,
                                            inner_weight_decay=0.0, calibrate_coupling=calibrate)
    state = stepwise.init(params)
    for _ in range(4):
        step, state = stepwise.update(zeros, state, params, value=0.0)
        for leaf in jax.tree.leaves(step):
            np.testing.assert_array_equal(leaf, 0.0)
    assert bool(jnp.isfinite(flatjax.entropy_sgd_coupling(state)))


@pytest.mark.parametrize("coupling_step", ["proximal", "explicit"])
@pytest.mark.parametrize("explicit_center", [False, True])
def test_replicate_zero_gradients_at_the_centre_give_no_nan(coupling_step, explicit_center):
    """Identical replicas (‖wᵃ − c‖ = 0) and zero gradients: nothing moves, nothing is NaN."""
    opt = flatjax.replicate(
        optax.sgd(0.1, momentum=0.9, nesterov=True), 3, 1.0, learning_rate=0.1,
        coupling_step=coupling_step,
        center_optimizer=optax.sgd(0.1) if explicit_center else None,
    )
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros((3,))}
    zeros = jax.tree.map(jnp.zeros_like, params)
    state = opt.init(params)
    for _ in range(2):
        updates, state = opt.update(zeros, state, params)
        for leaf in jax.tree.leaves(updates):
            np.testing.assert_array_equal(leaf, 0.0)
    assert float(state.center_distance) == 0.0


def test_balanced_coupling_of_coinciding_replicas_is_inf_not_nan():
    """γ₀ = mean loss / mean ‖wᵃ − c‖² with coinciding replicas is documented as inf.

    With zero losses too it was 0/0 = NaN; it must be inf either way, so the
    caller's finiteness check reports it instead of a NaN coupling.
    """
    params = jnp.ones((2, 3))
    for losses in (jnp.array([1.0, 2.0]), jnp.zeros(2)):
        assert float(flatjax.balanced_coupling(losses, params)) == np.inf
