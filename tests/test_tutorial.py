"""docs/tutorial.ipynb runs top to bottom (its cells assert what they claim)."""

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "tutorial.ipynb"


@pytest.mark.slow
def test_tutorial_notebook_runs():
    pytest.importorskip("sklearn")
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    namespace: dict = {"__name__": "__tutorial__"}
    for i, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        exec(compile(source, f"{NOTEBOOK.name}[cell {i}]", "exec"), namespace)
    assert set(namespace["results"]) == {"SGD", "Entropy-SGD", "Replicated-SGD"}
