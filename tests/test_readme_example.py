"""The Python example of the README's "## Python API" section runs as written."""

from __future__ import annotations

import re
from pathlib import Path

from guided_flow.api import MatchResult

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Python API"


def api_section() -> str:
    """The text of the README's "## Python API" section, up to the next heading of its level."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"^{re.escape(SECTION)}[ \t]*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no {SECTION!r} section"
    return match.group(1)


def python_example(section: str) -> str:
    """The first ```python fenced block of ``section``."""
    block = re.search(r"^```python[ \t]*\n(.*?)^```", section, re.M | re.S)
    assert block, f"the {SECTION!r} section has no ```python block"
    return block.group(1)


def test_the_python_api_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(python_example(api_section()), "README.md (Python API)", "exec"), namespace)
    results = [value for value in namespace.values() if isinstance(value, MatchResult)]
    assert results, "the example should call match()"
    assert capsys.readouterr().out  # it shows its results
