"""Smoke test of ``experiments/study.py --quick`` and checks of its summaries.

No claim about which algorithm wins: the quick run is far too short for that.
The summaries are checked against numbers computed by hand.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from experiments import study

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
    settings = study.study_settings(quick=True)
    # Grid: algorithms × lrs × seeds; main: the same again plus eSGD/rSGD at equal epochs.
    n_seeds, n_lrs = len(settings["seeds"]), len(settings["learning_rates"])
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
    assert curves["sigmas"] == settings["sigmas"]
    for budget in study.BUDGETS:
        for alg in ALGS:
            c = curves["datasets"]["digits"][budget][alg]
            per_seed = np.asarray(c["per_seed"])
            assert per_seed.shape == (len(settings["seeds"]), len(settings["sigmas"]))
            np.testing.assert_allclose(c["mean"], per_seed.mean(0), rtol=1e-6, atol=1e-9)
    with open(os.path.join(quick_out, "summary.json")) as f:
        summary = json.load(f)
    assert set(summary["kendall"]) == {"digits"}
    assert len(summary["table"]) == len(study.BUDGETS) * len(ALGS)
    report = open(os.path.join(quick_out, "RESULTS.md")).read()
    assert "Kendall" in report and "not run here" in report
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


def test_summarize_by_hand():
    settings = {"datasets": ["digits"], "sigmas": [0.0, 0.05], "table_sigmas": [0.05],
                "num_draws": 1}
    records = []
    # Grid networks whose test error increases with local energy: Kendall's τ = 1.
    for i, alg in enumerate(ALGS):
        for seed in range(2):
            e = 10.0 * i + seed
            records.append(_record(alg, "gradients", e, e / 10, seed))
            records.append(_record(alg, "gradients", e, e / 10, seed, main=True))
            if alg != "sgd":
                records.append(_record(alg, "epochs", 50.0 + e, 5.0 + e / 10, seed, main=True))
    summary, curves = study.summarize(records, settings)
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


def test_hand_written_block_is_kept(tmp_path):
    path = tmp_path / "RESULTS.md"
    block = f"{study.BEGIN_HAND}\nSGD wins here.\n{study.END_HAND}"
    path.write_text(f"# old\n\n{block}\n\nold tables\n")
    assert study._hand_written(str(path)) == block
    assert "goes here" in study._hand_written(str(tmp_path / "missing.md"))


def test_unknown_dataset_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown datasets"):
        study.run_study(str(tmp_path), quick=True, datasets=["imagenet"])
