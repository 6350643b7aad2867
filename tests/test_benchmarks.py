"""Smoke test of the benchmark driver: it runs in --quick mode and writes valid JSON.

No timing is asserted: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import json
import math

import pytest

from experiments.benchmarks import run


def test_quick_run_writes_summary_and_table(tmp_path, capsys):
    summary = run.main(["--quick", "--only", "rsgd", "--out", str(tmp_path)])
    with open(tmp_path / "summary.json") as f:
        on_disk = json.load(f)
    with open(tmp_path / "rsgd.json") as f:
        rsgd = json.load(f)
    assert on_disk["rows"] == json.loads(json.dumps(summary["rows"]))
    names = {r["benchmark"] for r in on_disk["rows"]}
    assert {"rsgd_step_y3/vmap", "rsgd_step_y3/unroll", "rsgd_step_y3/auto",
            "coupling_update_only", "coupling_whole_step"} <= names
    for row in rsgd["rows"]:
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
        assert row["spread"][0] <= row["ratio"] <= row["spread"][1]
    auto = next(r for r in rsgd["rows"] if r["strategy"] == "auto")
    assert auto["resolves_to"] == "vmap"  # the suite runs on CPU; mlp_tiny has no convolution
    assert on_disk["machine"]["backend"] == "cpu"
    table = capsys.readouterr().out
    assert "| benchmark | model | ratio (wall; cpu) | target | met? | spread | machine |" in table
    assert "| coupling_whole_step |" in table


TARGET_KEYS = {"hvp", "top_eig", "trace", "flatness", "eval", "compile_esgd_L1",
               "compile_esgd_L2", "esgd_scan", "esgd_stepwise", "rsgd_y3"}


@pytest.mark.slow
def test_default_quick_run_measures_the_target_table(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# B\n\nbefore\n{run.START}\nold table\n{run.END}\nafter\n")
    report = run.main(["--quick", "--out", str(tmp_path), "--readme", str(readme)])["targets"]
    with open(tmp_path / "targets.json") as f:
        on_disk = json.load(f)
    assert on_disk["rows"] == json.loads(json.dumps(report["rows"]))
    assert on_disk["errors"] == {}
    assert {r["key"] for r in on_disk["rows"]} == TARGET_KEYS
    for row in on_disk["rows"]:
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0 and row["cpu_ratio"] > 0
        assert row["spread"][0] <= row["ratio"] <= row["spread"][1]
        assert row["met"] == (row["ratio"] <= row["target"])
        assert row["reps"] == 2
    assert len(on_disk["git"]["commit"]) == 40 and isinstance(on_disk["git"]["dirty"], bool)
    m = on_disk["machine"]
    assert m["nproc"] >= 1 and len(m["load_avg_before"]) == len(m["load_avg_after"]) == 3
    assert all(m[p] for p in ("cpu", "jax", "jaxlib", "flax", "optax"))
    # The README block is replaced; the text around it is kept.
    text = readme.read_text()
    assert "old table" not in text
    assert text.startswith("# B\n\nbefore\n") and text.endswith(f"{run.END}\nafter\n")
    block = text.split(run.START)[1].split(run.END)[0]
    assert block.count("\n| ") == len(TARGET_KEYS) + 1  # header + one line per row
    assert on_disk["git"]["commit"][:10] in block
    assert block in capsys.readouterr().out


def test_readme_without_markers_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no block\n")
    with pytest.raises(ValueError, match="targets:start"):
        run.rewrite_readme(str(readme), "| table |")
    assert readme.read_text() == "# no block\n"


def test_summary_reports_a_failed_section(tmp_path):
    summary = run.summarise(str(tmp_path), {"pipeline": "skipped: needs tfds"},
                            {"backend": "cpu"}, ["pipeline"])
    assert summary["rows"] == [{"benchmark": "pipeline", "error": "skipped: needs tfds"}]
    assert "| pipeline | - | - | - | - | skipped: needs tfds |" in run.markdown(summary)


def test_profile_bench_attributes_the_langevin_noise_and_the_coupling(tmp_path):
    from experiments.benchmarks import profile_bench

    report = profile_bench.main(["--model", "mlp_tiny", "--batch-size", "8", "--reps", "2",
                                 "--profile-reps", "1", "--inner-steps", "2",
                                 "--num-replicas", "2", "--out", str(tmp_path)])
    with open(tmp_path / "profile_mlp_tiny.json") as f:
        assert json.load(f)["rows"] == json.loads(json.dumps(report["rows"]))
    for row in report["rows"]:
        assert math.isfinite(row["ratio"]) and row["ratio"] > 0
        assert row["spread"][0] <= row["ratio"] <= row["spread"][1]
    prof = report["profiles"]
    # Only Entropy-SGD draws Langevin noise and only the coupled replicas pay
    # for a coupling; every step computes gradients.
    assert prof["esgd_scan"]["thunk_ms"]["noise"] > 0
    assert prof["esgd_stepwise"]["thunk_ms"]["noise"] > 0
    assert "noise" not in prof["sgd_x2"]["thunk_ms"]
    assert prof["rsgd"]["thunk_ms"]["rsgd_coupling"] > 0
    assert "rsgd_coupling" not in prof["rsgd_uncoupled"]["thunk_ms"]
    assert all(p["thunk_ms"]["gradient"] > 0 for p in prof.values())
    # Two noise draws of n normals: the uint32 bits and the float32 normals are
    # each read or written at least once per draw.
    assert prof["esgd_scan"]["param_passes"]["noise"] >= 2 * 2
    # The default Irwin-Hall noise is a sum of bytes: XLA's cost model sees no
    # transcendental per parameter (the Gaussian generators' erf⁻¹ had two).
    assert prof["esgd_scan"]["xla_transcendentals"] < report["n_params"]


def test_categorise_reads_the_innermost_known_frame():
    from experiments.benchmarks.profile_bench import categorise

    noise = [("/x/flatjax/_esgd/_noise.py", "hash_normal"),
             ("/x/flatjax/_esgd/_core.py", "EntropySGDCore.langevin_step")]
    assert categorise(noise) == "noise"
    assert categorise(noise[1:]) == "esgd_langevin"
    assert categorise([("/x/flax/linen/linear.py", "Dense.__call__")]) == "gradient"
    assert categorise([("/x/optax/_src/transform.py", "update_fn")]) == "optax"
    assert categorise([("/x/flatjax/_rsgd/_replicas.py", "replica_map")]) == "rsgd_replicas"
    assert categorise([("/x/flatjax/_rsgd/_axis.py", "_tree_mean")]) == "rsgd_coupling"
    assert categorise([("/x/flax/linen/linear.py", "f")], "copy") == "copies"
    assert categorise([]) == "other"
