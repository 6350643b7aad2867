"""The API reference builds from the docstrings with no warning (as `make docs`)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_api_reference_builds_without_warnings(tmp_path):
    pytest.importorskip("sphinx")
    out = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
         "-d", str(tmp_path / "doctrees"), str(ROOT / "docs" / "api"), str(tmp_path / "html")],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    index = (tmp_path / "html" / "index.html").read_text()
    assert "flatjax API reference" in index
    optimizers = (tmp_path / "html" / "optimizers.html").read_text()
    for name in ("entropy_sgd", "replicated_sgd", "scale_by_entropy_sgd", "replicate"):
        assert f'id="flatjax.{name}"' in optimizers, name
