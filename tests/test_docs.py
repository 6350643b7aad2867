"""The docs' Python snippets run as written (docs/nnx.md)."""

import pathlib
import re

DOCS = pathlib.Path(__file__).resolve().parent.parent / "docs"


def test_nnx_page_runs():
    text = (DOCS / "nnx.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    exec(compile(code, "docs/nnx.md", "exec"), {"__name__": "__docs__"})
