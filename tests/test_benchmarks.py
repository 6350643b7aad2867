"""Smoke test of the benchmark driver: it runs in --quick mode and writes valid JSON.

No timing is asserted: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import json
import math

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
    assert auto["resolves_to"] == "unroll"  # the suite runs on CPU
    assert on_disk["machine"]["backend"] == "cpu"
    table = capsys.readouterr().out
    assert "| benchmark | model | ratio (wall; cpu) | target | met? | spread | machine |" in table
    assert "| coupling_whole_step |" in table


def test_summary_reports_a_failed_section(tmp_path):
    summary = run.summarise(str(tmp_path), {"pipeline": "skipped: needs tfds"},
                            {"backend": "cpu"}, ["pipeline"])
    assert summary["rows"] == [{"benchmark": "pipeline", "error": "skipped: needs tfds"}]
    assert "| pipeline | - | - | - | - | skipped: needs tfds |" in run.markdown(summary)
