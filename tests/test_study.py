"""Smoke test of ``python -m experiments.study --quick`` and checks of its summaries.

No claim about which algorithm wins: the quick run is far too short for that.
The summaries are checked against numbers computed by hand.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from experiments import study
from experiments.study import report, runner
from flatjax.data import CATALOGUE
from flatjax.models import MODELS

ALGS = study.ALGORITHMS


@pytest.fixture(scope="module")
def quick_out(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("study"))
    assert study.main(["--quick", "--out", out]) == 0
    return out


@pytest.mark.slow
def test_quick_writes_every_output(quick_out):
    expected = [
        "runs.json", "meta.json", "summary.json", "local_energy_curves.json",
        "results_table.csv", "RESULTS.md", "local_energy_curves_digits.png",
        "test_error_vs_local_energy_digits.png", "test_error.png",
    ]
    for name in expected:
        path = os.path.join(quick_out, name)
        assert os.path.getsize(path) > 0, name
        if name.endswith(".png"):
            assert os.path.getsize(path) < 200_000, name
    with open(os.path.join(quick_out, "runs.json")) as f:
        runs = json.load(f)
    testbed = study.study_settings(quick=True)["testbeds"]["digits"]
    # Grid: algorithms × lrs × seeds; main: the same again plus eSGD/rSGD at equal epochs.
    n_seeds, n_lrs = len(testbed["seeds"]), len(testbed["learning_rates"])
    assert len(runs) == 3 * n_lrs * n_seeds + 3 * n_seeds + 2 * n_seeds
    assert {r["algorithm"] for r in runs} == set(ALGS)
    # Equal gradients: every algorithm gets ~ the same gradient evaluations; equal epochs:
    # eSGD L = 5 times and rSGD y = 3 times as many.
    grads = {(r["algorithm"], r["budget"]): r["grad_evals"] for r in runs if r["main"]}
    sgd = grads["sgd", "gradients"]
    for alg in ("esgd", "rsgd"):
        assert abs(grads[alg, "gradients"] - sgd) <= 5
    assert grads["esgd", "epochs"] == 5 * sgd
    assert grads["rsgd", "epochs"] == 3 * sgd
    for r in runs:
        if r["finite"]:
            assert 0.0 <= r["test_error"] <= 100.0
            le = r["local_energy"]
            if le["sigmas"][0] == 0.0:  # δE(w, 0) = E(w) − E(w)
                assert le["delta_e"][0] == pytest.approx(0.0, abs=1e-4)


@pytest.mark.slow
def test_quick_curves_and_report(quick_out):
    with open(os.path.join(quick_out, "local_energy_curves.json")) as f:
        curves = json.load(f)
    settings = study.study_settings(quick=True)
    n_seeds = len(settings["testbeds"]["digits"]["seeds"])
    assert curves["sigmas"] == settings["sigmas"]
    for budget in study.BUDGETS:
        for alg in ALGS:
            c = curves["datasets"]["digits"][budget][alg]
            per_seed = np.asarray(c["per_seed"])
            assert per_seed.shape == (n_seeds, len(settings["sigmas"]))
            np.testing.assert_allclose(c["mean"], per_seed.mean(0), rtol=1e-6, atol=1e-9)
    with open(os.path.join(quick_out, "summary.json")) as f:
        summary = json.load(f)
    assert set(summary["kendall"]) == {"digits"}
    assert len(summary["table"]) == len(study.BUDGETS) * len(ALGS)
    assert len(summary["paired"]) == len(study.BUDGETS) * 2  # eSGD and rSGD against SGD
    report_md = open(os.path.join(quick_out, "RESULTS.md")).read()
    assert "Kendall" in report_md and "not run here" in report_md and "Wilcoxon" in report_md
    # --report-only rebuilds the same tables from runs.json without training.
    before = open(os.path.join(quick_out, "summary.json")).read()
    assert study.main(["--quick", "--out", quick_out, "--report-only"]) == 0
    assert open(os.path.join(quick_out, "summary.json")).read() == before


def _record(alg, budget, test_error, delta_e, seed, main=False, lr=0.1):
    return {"dataset": "digits", "algorithm": alg, "budget": budget, "learning_rate": lr,
            "seed": seed, "finite": True, "main": main, "grad_evals": 10,
            "effective_epochs": 1.0, "test_error": test_error, "validation_error": test_error,
            "train_error": 0.0,
            "local_energy": {"sigmas": [0.0, 0.05], "delta_e": [0.0, delta_e]}}


def _hand_records():
    records = []
    # Grid networks whose test error increases with local energy: Kendall's τ = 1.
    for i, alg in enumerate(ALGS):
        for seed in range(2):
            e = 10.0 * i + seed
            records.append(_record(alg, "gradients", e, e / 10, seed))
            records.append(_record(alg, "gradients", e, e / 10, seed, main=True))
            if alg != "sgd":
                records.append(_record(alg, "epochs", 50.0 + e, 5.0 + e / 10, seed, main=True))
    return records


SETTINGS = {"datasets": ["digits"], "sigmas": [0.0, 0.05], "table_sigmas": [0.05],
            "num_draws": 1}


def test_summarize_by_hand():
    summary, curves = study.summarize(_hand_records(), SETTINGS)
    k = summary["kendall"]["digits"]
    assert k["tau"] == pytest.approx(1.0)
    assert k["num_networks"] == 6 + 4  # grid + equal-epoch networks, main copies not counted
    cell = next(c for c in summary["table"]
                if c["algorithm"] == "esgd" and c["budget"] == "gradients")
    assert cell["test_error"]["mean"] == pytest.approx(10.5)
    assert cell["test_error"]["std"] == pytest.approx(np.std([10.0, 11.0], ddof=1))
    assert cell["local_energy_0.05"]["mean"] == pytest.approx(1.05)
    # SGD's equal-epoch cell is its equal-gradient run.
    sgd = [c for c in summary["table"] if c["algorithm"] == "sgd"]
    assert sgd[0]["test_error"] == sgd[1]["test_error"]
    assert curves["datasets"]["digits"]["epochs"]["rsgd"]["mean"] == pytest.approx([0.0, 7.05])
    # Paired by seed: rSGD − SGD at equal epochs is 50 + 20 = 70 points on both seeds.
    paired = next(c for c in summary["paired"]
                  if c["algorithm"] == "rsgd" and c["budget"] == "epochs")
    assert paired["test_error"]["mean"] == pytest.approx(70.0)
    assert paired["test_error"]["se"] == pytest.approx(0.0)
    assert paired["test_error"]["wins"] == 0
    # Every network has training error 0: every band holds all ten.
    assert [b["num_networks"] for b in k["train_error_bands"]] == [10] * 4


def test_equal_epoch_runs_against_sgd_with_the_same_gradients():
    records = _hand_records()
    for seed in range(2):  # SGD with eSGD's equal-epoch gradients: 40 + seed % test error
        records.append({**_record("sgd", "matched", 40.0 + seed, 0.5, seed, main=True),
                        "matched_to": "esgd"})
    summary, _ = study.summarize(records, SETTINGS)
    row = next(c for c in summary["table"] if c["budget"] == "matched")
    assert (row["algorithm"], row["matched_to"]) == ("sgd", "esgd")
    assert row["test_error"]["mean"] == pytest.approx(40.5)
    # eSGD at equal epochs: 50 + 10 + seed, i.e. 20 points above matched SGD on both seeds.
    cell = next(c for c in summary["paired"] if c["budget"] == "matched")
    assert cell["algorithm"] == "esgd"
    assert cell["test_error"]["mean"] == pytest.approx(20.0)
    assert cell["local_energy_0.05"]["mean"] == pytest.approx(5.0 + 1.05 - 0.5)
    assert not any(c["budget"] == "matched" and c["algorithm"] == "rsgd"
                   for c in summary["paired"])
    assert summary["kendall"]["digits"]["num_networks"] == 6 + 4 + 2


def test_paired_difference_matches_closed_forms():
    # d = (−0.5, −1, −0.5): mean −2/3, sd = 1/√12, se = sd/√3 = 1/6, t = −4 on 2 degrees of
    # freedom, where P(|T| > t) = 1 − t/√(t² + 2) = 1 − 4/√18. All three differences have
    # the same sign: the exact Wilcoxon p-value is 2 / 2³.
    r = study.paired_difference({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.5, 1: 1.0, 2: 2.5})
    assert r["n"] == 3 and r["wins"] == 3
    assert r["mean"] == pytest.approx(-2 / 3)
    assert r["se"] == pytest.approx(1 / 6)
    assert r["t_p"] == pytest.approx(1 - 4 / np.sqrt(18))
    assert r["wilcoxon_p"] == pytest.approx(0.25)
    # Only seeds present in both count; one common seed is too few.
    assert study.paired_difference({0: 1.0, 5: 2.0}, {0: 0.0, 7: 1.0}) is None
    same = study.paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert same["mean"] == 0.0 and same["wilcoxon_p"] is None


def test_partial_kendall_by_hand():
    # x = (1, 2, 3, 4), y = (1, 3, 2, 4), z = (4, 1, 2, 3): of the 6 pairs, x and y disagree
    # on 1 (τ_xy = 2/3), x and z on 3 (τ_xz = 0), y and z on 4 (τ_yz = −1/3), so the partial
    # τ is (2/3 − 0) / √(1 · 8/9) = 1/√2.
    x, y, z = [1, 2, 3, 4], [1, 3, 2, 4], [4, 1, 2, 3]
    assert report.partial_kendall(x, y, z) == pytest.approx(1 / np.sqrt(2))
    # Holding fixed a z that orders x exactly leaves nothing to correlate.
    assert np.isnan(report.partial_kendall(x, y, x))


def test_rerunning_one_testbed_keeps_the_others(tmp_path, monkeypatch):
    def fake_run(name, settings):
        return [dict(r, dataset=name) for r in _hand_records()]

    monkeypatch.setattr(runner, "run_dataset", fake_run)
    out = str(tmp_path)
    runner.run_study(out, quick=True, datasets=["digits"], command="first")
    runner.run_study(out, quick=True, datasets=["mnist1d"], command="second")
    runner.run_study(out, quick=True, datasets=["digits"], command="third")
    records, meta = runner.load_runs(out)
    assert sorted(meta["testbeds"]) == ["digits", "mnist1d"]
    assert meta["testbeds"]["digits"]["command"] == "third"
    assert meta["testbeds"]["mnist1d"]["settings"]["datasets"] == ["mnist1d"]
    n = len(_hand_records())
    assert [r["dataset"] for r in records].count("digits") == n
    assert [r["dataset"] for r in records].count("mnist1d") == n


def test_hand_written_block_is_kept(tmp_path):
    path = tmp_path / "RESULTS.md"
    block = f"{study.BEGIN_HAND}\nSGD wins here.\n{study.END_HAND}"
    path.write_text(f"# old\n\n{block}\n\nold tables\n")
    assert report._hand_written(str(path)) == block
    assert "goes here" in report._hand_written(str(tmp_path / "missing.md"))


def test_testbeds_are_consistent():
    for name, t in study.TESTBEDS.items():
        assert t.model in MODELS and t.dataset in CATALOGUE, name
    cnn = study.TESTBEDS["mnist1d_cnn"]
    assert len(cnn.seeds) >= 5


@pytest.mark.slow
def test_mnist1d_10k_is_the_mnist1d_generator_with_more_signals(tmp_path):
    from mnist1d.data import get_dataset_args, make_dataset

    from flatjax import data as fd

    args = get_dataset_args()
    args.num_samples = 12500
    ref = make_dataset(args)
    d = str(tmp_path)
    x, y = fd.load_arrays("mnist1d_10k", "train", data_dir=d, normalize=False)
    xt, yt = fd.load_arrays("mnist1d_10k", "test", data_dir=d, normalize=False)
    np.testing.assert_array_equal(x, ref["x"].astype(np.float32))
    np.testing.assert_array_equal(y, ref["y"])
    np.testing.assert_array_equal(xt, ref["x_test"].astype(np.float32))
    assert (len(y), len(yt)) == (10_000, 2_500)
    # The catalogue's statistics standardise its own training split.
    xn, _ = fd.load_arrays("mnist1d_10k", "train", data_dir=d)
    assert abs(xn.mean()) < 1e-3 and abs(xn.std() - 1.0) < 1e-3


def test_unknown_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown datasets"):
        study.run_study(str(tmp_path), quick=True, datasets=["imagenet"])
