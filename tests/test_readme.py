"""The README's library snippets run as written, so they cannot rot."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _snippets():
    text = README.read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_snippets():
    assert len(_snippets()) >= 3


@pytest.mark.parametrize("index", range(len(_snippets())))
def test_readme_snippet_runs(index):
    code = _snippets()[index]
    exec(compile(code, f"README.md snippet {index}", "exec"), {"__name__": "__readme__"})
