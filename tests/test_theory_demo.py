"""The Gaussian-mixture demo: its table against the closed forms it reports, its checks."""

import math

import jax
import numpy as np
import pytest

from flatjax import theory

N, ALPHAS, SEEDS = 60, (1.0, 3.0), 2


def _value(cell: str) -> float:
    return float(cell.split("±")[0])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("mixture")
    lines = []
    table, figures = theory.mixture_demo(out, n=N, alphas=ALPHAS, seeds=SEEDS, q=0.3,
                                         progress=lines.append)
    head, _, *rows = table.splitlines()
    columns = [c.strip() for c in head.strip("|").split("|")]
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    return {"out": out, "table": table, "figures": figures, "progress": lines,
            "columns": columns, "rows": [dict(zip(columns, r, strict=True)) for r in cells]}


def test_demo_writes_the_table_and_the_figure(demo):
    md = (demo["out"] / "mixture.md").read_text()
    assert demo["table"] in md
    assert f"N = {N}" in md and f"{SEEDS} training sets" in md and "q = 0.3" in md
    assert demo["figures"] == [str(demo["out"] / "mixture.png")]
    assert (demo["out"] / "mixture.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(demo["progress"]) == len(ALPHAS)


def test_demo_has_one_row_per_alpha(demo):
    assert [float(r["α"]) for r in demo["rows"]] == list(ALPHAS)


def test_demo_reports_the_closed_form_bayes_error(demo):
    # ρ = ½: ε_BO = H(√(α / (Δ(α + Δ)))), Δ = 1
    for r in demo["rows"]:
        a = float(r["α"])
        h = 0.5 * math.erfc(math.sqrt(a / (a + 1.0)) / math.sqrt(2.0))
        assert _value(r["ε_BO"]) == pytest.approx(h, abs=1e-4)


def test_plug_in_column_is_the_bayes_rule_on_the_documented_training_sets(demo):
    for ai, r in enumerate(demo["rows"]):
        errors = []
        for s in range(SEEDS):
            k_data, _ = jax.random.split(jax.random.fold_in(jax.random.key(s), ai))
            d = theory.gaussian_mixture(k_data, N, ALPHAS[ai])
            w, b = theory.bayes_optimal_classifier(d.x, d.y)
            errors.append(float(theory.generalization_error(w, b, d.v)))
        assert _value(r["Bayes plug-in ε_g"]) == pytest.approx(np.mean(errors), abs=1e-4)


def test_the_plug_in_is_the_reference_without_a_paired_column(demo):
    assert "Bayes plug-in − plug-in" not in demo["columns"]
    assert {"ridge logistic (val.) − plug-in", "shell centre − plug-in"} <= set(demo["columns"])


def test_every_estimator_is_above_the_bayes_error(demo):
    # Per training set no unbiased classifier beats w = v: ε_g >= H(1/√Δ) exactly;
    # the plug-in's overlap fluctuates by O(1/√N) about the N → ∞ one, hence the tolerance.
    names = [c[: -len(" ε_g")] for c in demo["columns"] if c.endswith(" ε_g")]
    assert len(names) == 3
    for r in demo["rows"]:
        for name in names:
            eg = _value(r[f"{name} ε_g"])
            assert eg >= 0.5 * math.erfc(1 / math.sqrt(2))
            assert eg >= _value(r["ε_BO"]) - 0.02
            if name != "Bayes plug-in":
                diff = _value(r[f"{name} − plug-in"])
                assert diff == pytest.approx(eg - _value(r["Bayes plug-in ε_g"]), abs=2e-4)


def test_held_out_bias_is_fit_bias_of_the_refit_on_the_held_out_part():
    d = theory.gaussian_mixture(jax.random.key(3), 30, 4.0, rho=0.25)
    fit, val = theory.train_validation_split(jax.random.key(4), d.x.shape[0])
    w = theory.hebbian(d.x[fit], d.y[fit])
    b = theory.held_out_bias(3.0 * w, d.x, d.y, fit, val, theory.hebbian)
    # the threshold of the refit (here: w itself) on x[val], carried to 3w at the same b/‖w‖
    assert b == pytest.approx(3.0 * float(theory.fit_bias(w, d.x[val], d.y[val])), rel=1e-5)


@pytest.mark.parametrize("kwargs, name", [
    ({"q": 0.0}, "q"), ({"q": 1.0}, "q"), ({"q": 1.5}, "q"), ({"q": "0.1"}, "q"),
    ({"seeds": 0}, "seeds"), ({"seeds": 2.5}, "seeds"),
    ({"n": 1}, "n"), ({"alphas": ()}, "alphas"), ({"alphas": (1.0, -2.0)}, "alphas"),
    ({"rho": 1.0}, "rho"), ({"delta": 0.0}, "delta"),
])
def test_demo_rejects_bad_arguments_naming_them(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        theory.mixture_demo(tmp_path, **{"n": 20, "alphas": (1.0,), "seeds": 1, **kwargs},
                            progress=None)
    assert not (tmp_path / "mixture.md").exists()


def test_unbalanced_demo_stays_above_the_oracle_rule(tmp_path):
    # With ρ ≠ ½ every classifier has a bias; none beats w = v with the Bayes threshold
    # b* = (Δ/2) log(ρ/(1 − ρ)), whose error is ρ H(1 + b*) + (1 − ρ) H(1 − b*) at Δ = 1.
    rho = 0.25
    table, _ = theory.mixture_demo(tmp_path, n=40, alphas=(2.0,), seeds=2, rho=rho,
                                   progress=None)
    head, _, row = table.splitlines()
    cells = dict(zip([c.strip() for c in head.strip("|").split("|")],
                     [c.strip() for c in row.strip("|").split("|")], strict=True))
    b = 0.5 * math.log(rho / (1 - rho))
    floor = rho * 0.5 * math.erfc((1 + b) / math.sqrt(2)) + (
        1 - rho) * 0.5 * math.erfc((1 - b) / math.sqrt(2))
    assert _value(cells["ε_BO"]) == pytest.approx(theory.bayes_optimal_error(2.0, 1.0, rho),
                                                  abs=1e-4)
    assert _value(cells["ε_BO"]) > floor
    for name in ("Bayes plug-in", "ridge logistic (val.)", "shell centre"):
        assert _value(cells[f"{name} ε_g"]) >= floor
    assert "held-out bias" in (tmp_path / "mixture.md").read_text()
