"""Meshes, shardings and the sharded training step (flatjax/_distributed.py).

The suite runs with 4 emulated CPU devices (root conftest.py). The claim
tested: the same config gives the same numbers, to float tolerance, on one
device (the plain step) and sharded over 2 or 4 devices, for Replicated-SGD
(replicas × data), SGD and Entropy-SGD (data parallel), BatchNorm included.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import flatjax
from flatjax.models.mlp import MLPTiny
from flatjax.training import base_config, create_train_state, make_train_step
from tests.helpers import TinyBNMLP, blobs, tiny_mlp_problem

DIM, NUM_TRAIN, BATCH = 3, 256, 8


def _devices(n):
    return jax.devices()[:n]


# --------------------------------------------------------------------- mesh


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(), (1, 4)),
        (dict(replica=2), (2, 2)),
        (dict(data=1), (4, 1)),
        (dict(replica=2, data=2), (2, 2)),
        (dict(replica=1, devices=_devices(1)), (1, 1)),
        (dict(data=2, devices=_devices(2)), (1, 2)),
    ],
)
def test_make_mesh_shapes(kwargs, shape):
    mesh = flatjax.make_mesh(**kwargs)
    assert mesh.axis_names == ("replica", "data")
    assert (mesh.shape["replica"], mesh.shape["data"]) == shape
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    devices = kwargs.get("devices", jax.devices())
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(replica=3), ValueError, "replica=3 does not divide the 4 devices"),
        (dict(data=3), ValueError, "data=3 does not divide the 4 devices"),
        (dict(replica=2, data=1), ValueError, r"replica \* data = 2 \* 1 = 2 must equal"),
        (dict(replica=4, data=4), ValueError, "must equal the number of devices, 4"),
        (dict(replica=0), ValueError, "replica must be >= 1, got 0"),
        (dict(data=2.0), TypeError, "data must be a positive int or None"),
        (dict(replica=True), TypeError, "replica must be a positive int"),
        (dict(devices=[]), ValueError, "devices is empty"),
    ],
)
def test_make_mesh_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        flatjax.make_mesh(**kwargs)


# --------------------------------------------------------------------- shardings


def _config(algorithm, *, replicas=2, inner=2):
    config = base_config()
    config.algorithm = algorithm
    config.batch_size = BATCH
    config.learning_rate = 0.1
    config.rsgd.num_replicas = replicas
    config.rsgd.coupling = 0.5
    config.rsgd.strategy = "vmap"
    config.esgd.inner_steps = inner
    config.esgd.coupling = 0.1
    config.esgd.noise = 1e-3
    return config


def _state(config, model):
    info = {"input_shape": (DIM,), "num_train": NUM_TRAIN}
    return create_train_state(config, model, info, jax.random.PRNGKey(0))


def _batches(config, steps):
    """Deterministic numpy batches in the layout the config's step takes."""
    x, y = blobs(n=NUM_TRAIN, dim=DIM, seed=1)
    layout = flatjax.training.batch_layout(config)
    lead = {"replicas": (config.rsgd.num_replicas,), "batch": (),
            "stacked": (config.esgd.inner_steps,)}[layout]
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        idx = rng.integers(0, NUM_TRAIN, size=(*lead, BATCH))
        out.append({"image": x[idx], "label": y[idx]})
    return out


def test_train_state_sharding_rsgd_specs():
    config = _config("replicated_sgd", replicas=4)
    state = _state(config, TinyBNMLP())
    mesh = flatjax.make_mesh(replica=2, data=2)
    s = flatjax.training.train_state_sharding(state, mesh)
    assert all(x.spec == P("replica") for x in jax.tree.leaves(s.params))
    assert all(x.spec == P("replica") for x in jax.tree.leaves(s.batch_stats))
    rep = s.opt_state
    assert isinstance(rep, flatjax.ReplicateState)
    assert rep.count.spec == P() and rep.coupling.spec == P() and rep.center_distance.spec == P()
    assert all(x.spec == P("replica") for x in jax.tree.leaves(rep.base_state))
    assert s.step.spec == P() and s.rng.spec == P()
    placed = flatjax.training.shard_train_state(state, mesh)
    kernel = placed.params["Dense_0"]["kernel"]
    assert kernel.sharding.shard_shape(kernel.shape) == (2, DIM, 16)  # 4 replicas / 2
    np.testing.assert_array_equal(kernel, state.params["Dense_0"]["kernel"])


def test_train_state_sharding_sgd_is_replicated():
    state = _state(_config("sgd"), MLPTiny(num_classes=2))
    s = flatjax.training.train_state_sharding(state, flatjax.make_mesh(data=4))
    assert all(x.spec == P() for x in jax.tree.leaves(s))


def test_train_state_sharding_indivisible_replicas():
    state = _state(_config("replicated_sgd", replicas=3), MLPTiny(num_classes=2))
    with pytest.raises(ValueError, match="num_replicas=3 is not divisible by the mesh's replica"):
        flatjax.training.train_state_sharding(state, flatjax.make_mesh(replica=2))


@pytest.mark.parametrize(
    "layout, shape, spec, shard",
    [
        ("replicas", (2, 8, 3), P("replica", "data"), (1, 4, 3)),
        ("batch", (8, 3), P("data"), (4, 3)),
        ("stacked", (5, 8, 3), P(None, "data"), (5, 4, 3)),
    ],
)
def test_shard_batch_layouts(layout, shape, spec, shard):
    mesh = flatjax.make_mesh(replica=2, data=2)
    if layout != "replicas":
        mesh = flatjax.make_mesh(data=2, devices=_devices(2))
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    out = flatjax.shard_batch({"image": x}, mesh, layout)["image"]
    assert out.sharding.spec == spec
    assert out.sharding.shard_shape(out.shape) == shard
    np.testing.assert_array_equal(out, x)
    assert flatjax.process_batch_slice(mesh, layout, shape) == tuple(slice(0, s) for s in shape)
    local = flatjax.host_batch_to_global({"image": x}, mesh, layout)["image"]
    assert local.sharding.spec == spec
    np.testing.assert_array_equal(local, x)


@pytest.mark.parametrize(
    "batch, layout, error, match",
    [
        ({"image": np.zeros((2, 5, 3))}, "replicas", ValueError, "B = 5 on axis 1, not divisible"),
        ({"image": np.zeros((3, 8, 3))}, "replicas", ValueError, "y \\(replicas\\) = 3 on axis 0"),
        ({"image": np.zeros((8,))}, "replicas", ValueError, "needs at least 2 axes"),
        ({"image": np.zeros((5, 3))}, "batch", ValueError, "B = 5 on axis 0"),
        ({"image": np.zeros((2, 3))}, "stacked", ValueError, "B = 3 on axis 1"),
        ({"image": np.zeros((8, 3))}, "rows", ValueError, "layout must be one of"),
        ([np.zeros((8, 3))], "batch", TypeError, "batch must be a non-empty dict"),
        ({}, "batch", TypeError, "batch must be a non-empty dict"),
    ],
)
def test_shard_batch_errors(batch, layout, error, match):
    with pytest.raises(error, match=match):
        flatjax.shard_batch(batch, flatjax.make_mesh(replica=2, data=2), layout)


def test_host_batch_to_global_rejects_non_dict():
    with pytest.raises(TypeError, match="local_batch must be a non-empty dict"):
        flatjax.host_batch_to_global(np.zeros(4), flatjax.make_mesh(), "batch")


@pytest.mark.parametrize(
    "fn",
    [
        lambda m: flatjax.batch_sharding(m, "batch"),
        lambda m: flatjax.shard_batch({"image": np.zeros(4)}, m, "batch"),
        lambda m: flatjax.training.train_state_sharding(None, m),
    ],
)
def test_functions_reject_foreign_mesh(fn):
    other = jax.make_mesh((4,), ("batch",), axis_types=(AxisType.Auto,))
    with pytest.raises(TypeError, match="axes \\('replica', 'data'\\)"):
        fn(other)


@pytest.mark.parametrize(
    "algorithm, mode, layout",
    [("sgd", "scan", "batch"), ("entropy_sgd", "scan", "stacked"),
     ("entropy_sgd", "stepwise", "batch"), ("replicated_sgd", "scan", "replicas")],
)
def test_batch_layout(algorithm, mode, layout):
    config = base_config()
    config.algorithm, config.esgd.mode = algorithm, mode
    assert flatjax.training.batch_layout(config) == layout


def test_batch_layout_rejects_unknown_algorithm():
    config = base_config()
    config.algorithm = "adam"
    with pytest.raises(ValueError, match="config.algorithm must be one of"):
        flatjax.training.batch_layout(config)


def test_shard_train_step_rejects_non_callable():
    state = _state(_config("sgd"), MLPTiny(num_classes=2))
    with pytest.raises(TypeError, match="train_step must be callable"):
        flatjax.training.shard_train_step(None, flatjax.make_mesh(), state, "batch")


# --------------------------------------------------------------------- same numbers


def _run(step, state, batches):
    metrics = []
    for t, batch in enumerate(batches):
        state, m = step(state, batch)
        metrics.append(m)
        if t % 2 == 1:  # long queues of collective steps abort XLA:CPU here
            jax.block_until_ready(state)
    return jax.device_get(jax.block_until_ready((state, metrics)))


@functools.cache
def _reference(algorithm, replicas, bn, steps):
    """The plain step on one device: the numbers every mesh must reproduce."""
    config = _config(algorithm, replicas=replicas)
    state = _state(config, TinyBNMLP() if bn else MLPTiny(num_classes=2))
    return _run(make_train_step(config), state, _batches(config, steps))


def _assert_close(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6), a, b)


@pytest.mark.parametrize(
    "algorithm, replicas, bn, replica_devices, data_devices",
    [
        ("replicated_sgd", 2, True, 2, 2),  # 2 replicas x 2 data, BatchNorm over "data"
        ("replicated_sgd", 4, False, 4, 1),  # one replica per device
        ("sgd", 2, True, 1, 4),
        ("sgd", 2, False, 1, 2),
        ("entropy_sgd", 2, False, 1, 4),
        ("entropy_sgd", 2, False, 1, 2),
    ],
)
def test_sharded_step_matches_one_device(algorithm, replicas, bn, replica_devices, data_devices):
    steps = 4
    ref_state, ref_metrics = _reference(algorithm, replicas, bn, steps)
    config = _config(algorithm, replicas=replicas)
    state = _state(config, TinyBNMLP() if bn else MLPTiny(num_classes=2))
    n = replica_devices * data_devices
    mesh = flatjax.make_mesh(replica=replica_devices, data=data_devices, devices=_devices(n))
    layout = flatjax.training.batch_layout(config)
    step = flatjax.training.shard_train_step(make_train_step(config), mesh, state, layout)
    batches = [flatjax.shard_batch(b, mesh, layout) for b in _batches(config, steps)]
    state = flatjax.training.shard_train_state(state, mesh)
    # device_get below drops shardings; check them on the live state first.
    one_step, _ = step(state, batches[0])
    leaf = jax.tree.leaves(one_step.params)[0]
    assert leaf.sharding.num_devices == n
    if algorithm == "replicated_sgd":
        assert leaf.sharding.spec == P("replica")
    got_state, got_metrics = _run(step, state, batches)
    _assert_close(got_state.params, ref_state.params)
    _assert_close(got_state.batch_stats, ref_state.batch_stats)
    _assert_close(got_state.opt_state, ref_state.opt_state)
    for got, ref in zip(got_metrics, ref_metrics, strict=True):
        for k in ("loss", "error", "grad_norm", "param_norm"):
            np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=1e-5)
    if bn:  # statistics moved from their initial values
        assert not np.allclose(jax.tree.leaves(got_state.batch_stats)[0], 0.0)
    if algorithm == "replicated_sgd":
        _assert_close(flatjax.replica_center(got_state.params),
                      flatjax.replica_center(ref_state.params))


# --------------------------------------------------------------------- shard_map variant


def _shard_map_problem(num_replicas):
    _, params, x, y, loss = tiny_mlp_problem(n=64, dim=4, hidden=8)
    keys = jax.random.split(jax.random.key(3), num_replicas)
    params = jax.tree.map(
        lambda p: p + 0.1 * jax.vmap(lambda k: jax.random.normal(k, p.shape))(keys), params
    )
    idx = np.random.default_rng(1).integers(0, 64, size=(3, num_replicas, 8))
    batches = [{"x": x[i], "y": y[i]} for i in idx]
    return params, batches, lambda p, b: loss(p, b["x"], b["y"])


def _rsgd_opt(num_replicas, axis_name=None):
    base = optax.sgd(0.2, momentum=0.9)
    return flatjax.replicate(base, num_replicas, 0.5, axis_name=axis_name, learning_rate=0.2)


@pytest.mark.parametrize("num_replicas, replica_devices, data_devices",
                         [(4, 2, 2)])  # 2 replicas per device, each split over 2
def test_shard_map_rsgd_matches_one_device(num_replicas, replica_devices, data_devices):
    params, batches, loss = _shard_map_problem(num_replicas)
    opt = _rsgd_opt(num_replicas)
    grad = flatjax.replica_map(jax.value_and_grad(loss), strategy="vmap")

    @jax.jit
    def plain(params, state, batch):
        _, grads = grad(params, batch)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    ref, ref_state = params, opt.init(params)
    for batch in batches:
        ref, ref_state = plain(ref, ref_state, batch)

    mesh = flatjax.make_mesh(replica=replica_devices, data=data_devices,
                             devices=_devices(replica_devices * data_devices))
    init, step = flatjax.rsgd_shard_map_step(
        loss, mesh, optax.sgd(0.2, momentum=0.9), num_replicas, 0.5, strategy="vmap",
        learning_rate=0.2,
    )
    got, state = params, init(params)
    for batch in batches:
        got, state, value = step(got, state, batch)
        jax.block_until_ready(got)
    assert np.isfinite(float(value))
    _assert_close(got, ref)
    assert float(state.center_distance) == pytest.approx(float(ref_state.center_distance), 1e-4)
    _assert_close(flatjax.replica_center(got), flatjax.replica_center(ref))


def test_shard_map_rsgd_loss_is_global_mean():
    mesh = flatjax.make_mesh(replica=2, data=2)
    init, step = flatjax.rsgd_shard_map_step(
        lambda w, b: jnp.mean(b["x"] * w[0]), mesh, optax.sgd(0.0), 2, 0.0, learning_rate=0.0
    )
    w = jnp.ones((2, 1))
    x = jnp.arange(16.0).reshape(2, 8)  # mean over replicas and examples: 7.5
    _, _, value = step(w, init(w), {"x": x})
    assert float(value) == pytest.approx(7.5)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(axis_name="r"), TypeError, "sets axis_name='replica' itself"),
        (dict(num_replicas=3), ValueError, "num_replicas=3 is not divisible"),
        (dict(loss_fn=None), TypeError, "loss_fn must be callable"),
        (dict(mesh=None), TypeError, "mesh must be a jax.sharding.Mesh"),
    ],
)
def test_shard_map_rsgd_errors(kwargs, error, match):
    args = dict(loss_fn=lambda w, b: 0.0, mesh=flatjax.make_mesh(replica=2),
                base_optimizer=optax.sgd(0.1), num_replicas=2, coupling=1.0)
    extra = {"axis_name": kwargs.pop("axis_name")} if "axis_name" in kwargs else {}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        flatjax.rsgd_shard_map_step(**args, learning_rate=0.1, **extra)


# --------------------------------------------------------------------- initialize_distributed

_ENV = ("FLATJAX_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


@pytest.fixture
def fake_initialize(monkeypatch):
    """Records jax.distributed.initialize calls instead of starting a coordinator."""
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    return calls


@pytest.mark.parametrize(
    "env, kwargs, expected",
    [
        ({}, {}, None),  # nothing says multi-process: a no-op
        ({"JAX_NUM_PROCESSES": "1"}, {}, None),
        (dict(JAX_COORDINATOR_ADDRESS="h:2", JAX_NUM_PROCESSES="4", JAX_PROCESS_ID="3"),
         {}, dict(num_processes=4, process_id=3)),  # JAX reads the address itself
        ({"JAX_NUM_PROCESSES": "4"}, dict(coordinator_address="h:1", process_id=0),
         dict(coordinator_address="h:1", num_processes=4, process_id=0)),
        ({"JAX_PROCESS_ID": "1"}, dict(process_id=0, num_processes=2),
         dict(process_id=0, num_processes=2)),  # arguments win over the environment
        ({"FLATJAX_DISTRIBUTED": "auto"}, {}, {}),
        ({}, dict(initialization_timeout=5), dict(initialization_timeout=5)),
    ],
)
def test_initialize_distributed_reads_environment(fake_initialize, monkeypatch, env, kwargs,
                                                  expected):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    started = flatjax.initialize_distributed(**kwargs)
    assert started == (expected is not None)
    assert fake_initialize == ([] if expected is None else [expected])


@pytest.mark.parametrize(
    "env, match",
    [
        ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' must be an integer"),
        ({"FLATJAX_DISTRIBUTED": "yes"}, "FLATJAX_DISTRIBUTED must be 'auto' or unset"),
    ],
)
def test_initialize_distributed_errors(fake_initialize, monkeypatch, env, match):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        flatjax.initialize_distributed()
    assert fake_initialize == []


def test_initialize_distributed_leaves_incomplete_settings_to_jax(monkeypatch):
    """An incomplete setting reaches jax.distributed.initialize, which names what is missing."""
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    with pytest.raises((ValueError, RuntimeError)):
        flatjax.initialize_distributed(num_processes=2, process_id=0,
                                       cluster_detection_method="deactivate")


def test_initialize_distributed_is_idempotent(monkeypatch):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: pytest.fail("called"))
    assert flatjax.initialize_distributed(coordinator_address="h:1", num_processes=2,
                                          process_id=0) is False


# --------------------------------------------------------------------- docs


def test_docs_snippet_runs_on_the_mesh(capsys):
    """docs/distributed.md's Python snippet runs as written (4 devices: mesh 2 x 2)."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "distributed.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    exec(compile(code, "docs/distributed.md", "exec"), {"__name__": "__docs__"})
    pid, loss, shape = capsys.readouterr().out.split(" ", 2)
    assert pid == "0" and np.isfinite(float(loss))
    assert "'replica': 2" in shape and "'data': 2" in shape


def test_process_batch_slice_rejects_non_contiguous_shards(monkeypatch):
    """A process whose devices hold rows 0-1 and 4-5 of 8 cannot load one slice."""
    import flatjax._mesh as dist

    class Split:
        def addressable_devices_indices_map(self, shape):
            return {0: (slice(0, 2),), 1: (slice(4, 6),)}

    monkeypatch.setattr(dist, "batch_sharding", lambda mesh, layout: Split())
    with pytest.raises(ValueError, match="non-contiguous parts of the batch"):
        flatjax.process_batch_slice(flatjax.make_mesh(), "batch", (8,))


def test_train_and_evaluate_on_a_mesh_matches_one_device(tmp_path):
    """The same config, run by the training loop on a 2 × 2 mesh and on one device."""
    import numpy as np

    from flatjax.models.mlp import MLPTiny
    from flatjax.training import array_source, base_config, train_and_evaluate

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)

    def run(replica, data, workdir):
        config = base_config()
        config.algorithm, config.batch_size, config.num_epochs = "replicated_sgd", 16, 2
        config.rsgd.num_replicas, config.rsgd.coupling = 2, 0.5
        config.rsgd.strategy = "vmap"
        config.progress, config.log_every_steps = False, 2
        config.mesh.replica, config.mesh.data = replica, data
        source = array_source((x, y), (x, y), num_classes=2, batch_size=16)
        return train_and_evaluate(config, str(workdir), model=MLPTiny(num_classes=2), data=source)

    one = run(1, 1, tmp_path / "one")
    four = run(2, 2, tmp_path / "four")
    assert four["step"] == one["step"]
    for key in ("train_loss", "test_loss", "test_error"):
        np.testing.assert_allclose(four[key], one[key], rtol=1e-4, atol=1e-5)


def test_replicate_under_an_explicit_mesh_with_a_sharded_replica_axis():
    # jax.make_mesh defaults to Explicit axes: the replica axis of the params is
    # then part of their type, and the centre must be one collective mean.
    from jax.sharding import NamedSharding

    mesh = jax.make_mesh((2,), ("replica",), axis_types=(AxisType.Explicit,),
                         devices=jax.devices()[:2])
    params = jnp.arange(12.0).reshape(2, 6) / 10
    grads = jnp.cos(params)
    opt = flatjax.replicated_sgd(0.1, 2, coupling=0.5, weight_decay=1e-3)

    def run(p):
        state = jax.jit(opt.init)(p)
        update = jax.jit(opt.update)
        for _ in range(3):
            u, state = update(grads, state, p)
            p = optax.apply_updates(p, u)
        return p

    want = run(params)
    with jax.set_mesh(mesh):
        got = run(jax.device_put(params, NamedSharding(mesh, P("replica"))))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
