"""Coupling schedules against their closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flatjax

SCHEDULES = [flatjax.exponential_coupling, flatjax.linear_coupling, flatjax.cosine_coupling]


@pytest.mark.parametrize("make", SCHEDULES)
def test_endpoints(make):
    gamma = make(0.2, total_steps=50, factor=1e3)
    assert float(gamma(0)) == pytest.approx(0.2, rel=1e-6)
    assert float(gamma(50)) == pytest.approx(0.2 * 1e3, rel=1e-5)
    # holds its final value after total_steps
    assert float(gamma(80)) == pytest.approx(0.2 * 1e3, rel=1e-5)


def test_exponential_closed_form():
    gamma0, total, factor = 0.03, 40, 1e4
    gamma1 = factor ** (1 / total) - 1
    gamma = flatjax.exponential_coupling(gamma0, total, factor)
    for t in [0, 1, 7, 20, 39, 40]:
        assert float(gamma(t)) == pytest.approx(gamma0 * (1 + gamma1) ** t, rel=1e-5)


def test_linear_and_cosine_midpoints():
    lin = flatjax.linear_coupling(1.0, 10, factor=5.0)
    assert float(lin(3)) == pytest.approx(1.0 + 4.0 * 0.3, rel=1e-6)
    cos = flatjax.cosine_coupling(2.0, 10, factor=5.0)
    # γ0 + γ0 (factor − 1)(1 − cos(π t/T))/2
    for t in [0, 2, 5, 9]:
        expected = 2.0 + 2.0 * 4.0 * (1 - math.cos(math.pi * t / 10)) / 2
        assert float(cos(t)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("make", SCHEDULES)
def test_cap_respected(make):
    gamma = make(1.0, total_steps=20, factor=100.0, max_value=7.0)
    values = np.array([float(gamma(t)) for t in range(30)])
    assert values.max() == pytest.approx(7.0)
    assert np.all(values <= 7.0 + 1e-6)
    assert np.all(np.diff(values) >= 0)


def test_staircase_per_epoch():
    steps_per_epoch, epochs = 10, 8
    gamma0, factor = 0.5, 256.0
    gamma1 = factor ** (1 / epochs) - 1
    gamma = flatjax.exponential_coupling(
        gamma0, steps_per_epoch * epochs, factor, steps_per_update=steps_per_epoch
    )
    for t in range(steps_per_epoch * epochs + 1):
        expected = gamma0 * (1 + gamma1) ** (t // steps_per_epoch)
        assert float(gamma(t)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("make", SCHEDULES)
def test_traceable_under_jit(make):
    gamma = make(0.1, total_steps=10, factor=10.0)
    out = jax.jit(gamma)(jnp.asarray(10, jnp.int32))
    assert out.dtype == jnp.float32
    assert float(out) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("make", SCHEDULES)
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(init_value=0.0, total_steps=10), "init_value"),
        (dict(init_value=-1.0, total_steps=10), "init_value"),
        (dict(init_value=1.0, total_steps=0), "total_steps"),
        (dict(init_value=1.0, total_steps=2.5), "total_steps"),
        (dict(init_value=1.0, total_steps=10, factor=0.5), "factor"),
        (dict(init_value=1.0, total_steps=10, max_value=0.0), "max_value"),
        (dict(init_value=1.0, total_steps=10, steps_per_update=0), "steps_per_update"),
        (dict(init_value=1.0, total_steps=10, steps_per_update=11), "steps_per_update"),
    ],
)
def test_bad_arguments(make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)
