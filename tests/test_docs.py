"""The documentation stays true: links resolve, command lines parse, the API example runs.

The checks themselves live in ``tools/doc_checks.py``; the self-tests below show that they report
a broken link, a missing anchor and a command line the CLI refuses. Nothing here runs training
or touches the network: commands are parsed only.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from guided_flow.api import MatchResult
from tools import doc_checks

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = doc_checks.documents()
COMMANDS = [
    (path, number, command)
    for path in DOCUMENTS
    for number, command in doc_checks.command_lines(path.read_text(encoding="utf-8"))
]
MANUAL = (
    "training",
    "evaluation",
    "learning",
    "decisions",
    "performance",
    "api",
    "grids",
    "upgrading",
    "cli",
    "ARCHITECTURE",
)


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


# --- the project's documents -------------------------------------------------------------------


def test_the_checks_cover_the_front_page_the_habits_and_the_manual():
    names = {_name(path) for path in DOCUMENTS}
    expected = {"README.md", "CHANGELOG.md", "CONTRIBUTING.md"}
    expected |= {f"docs/{page}.md" for page in MANUAL}
    assert expected <= names
    assert {_name(path) for path, _, _ in COMMANDS} >= {"README.md", "docs/training.md"}


@pytest.mark.parametrize("path", DOCUMENTS, ids=_name)
def test_every_relative_link_resolves(path):
    assert doc_checks.broken_links(path) == []


@pytest.mark.parametrize(
    "command",
    [command for _, _, command in COMMANDS],
    ids=[f"{_name(path)}:{number}" for path, number, _ in COMMANDS],
)
def test_every_command_line_parses_with_the_current_cli(command, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs are named relative to the repository
    assert doc_checks.command_error(command) is None


def test_the_front_page_is_short_and_leads_to_every_page_of_the_manual():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    assert "make demo" in readme and "make test" in readme
    linked = {target.partition("#")[0] for _, target in doc_checks.links(readme)}
    assert {f"docs/{page}.md" for page in MANUAL} <= linked
    assert {"CHANGELOG.md", "CONTRIBUTING.md"} <= linked


def test_every_page_of_the_manual_opens_with_a_title_and_what_it_is_for():
    for page in MANUAL:
        text = (ROOT / "docs" / f"{page}.md").read_text(encoding="utf-8")
        title, blank, first = text.splitlines()[:3]
        assert title.startswith("# ") and not blank and first, page


# --- the link check, on broken input -----------------------------------------------------------

PAGE = """\
# Top heading

## What `make demo` writes: figures, 2.0

Good: [page](other.md), [anchor](other.md#real-heading), [here](#top-heading),
![picture](img/picture.png), [web](https://example.org/missing), [code-named `x`](other.md),
[a link whose text
wraps](other.md#real-heading), [heading with code](#what-make-demo-writes-figures-20).

Broken: [gone](missing.md), ![no picture](img/none.png), [no anchor](other.md#nope),
[not here](#nothing), [outside](../../outside.md).

`[in code](missing-in-code.md)` is not a link.

```
[in a block](missing-in-block.md)
```
"""


@pytest.fixture
def page(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "picture.png").write_bytes(b"")
    (tmp_path / "other.md").write_text("# Other\n\n## Real heading\n", encoding="utf-8")
    path = tmp_path / "page.md"
    path.write_text(PAGE, encoding="utf-8")
    return path


def test_the_link_check_reports_each_broken_link_and_nothing_else(page):
    problems = doc_checks.broken_links(page, root=page.parent)
    reported = [problem.split(": ", 2)[1] for problem in problems]
    assert reported == [
        "missing.md",
        "img/none.png",
        "other.md#nope",
        "#nothing",
        "../../outside.md",
    ]
    assert "no such file" in problems[0] and "page.md:10" in problems[0]
    assert "no heading with the anchor #nope" in problems[2]
    assert "outside the repository" in problems[4]


def test_a_broken_link_in_the_real_documents_is_reported(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    for name in ("README.md", "CHANGELOG.md", "CONTRIBUTING.md"):
        shutil.copy(ROOT / name, copy / name)
    readme = copy / "README.md"
    text = readme.read_text(encoding="utf-8")
    assert doc_checks.broken_links(readme, root=copy) == []
    readme.write_text(text.replace("(docs/training.md", "(docs/trainig.md", 1), encoding="utf-8")
    assert [p for p in doc_checks.broken_links(readme, root=copy) if "docs/trainig.md" in p]
    (copy / "docs" / "gallery" / "demo_pair0.png").unlink()
    assert any("demo_pair0.png" in p for p in doc_checks.broken_links(readme, root=copy))


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("What training changes: `tools/learning.py`", "what-training-changes-toolslearningpy"),
        ("Optimisation that reaches W_P", "optimisation-that-reaches-w_p"),
        ("The paper configs are METHOD.md's values", "the-paper-configs-are-methodmds-values"),
        ("guided-flow fit | validate | test | predict", "guided-flow-fit--validate--test--predict"),
        ("A [linked](x.md) heading", "a-linked-heading"),
    ],
)
def test_anchors_follow_githubs_slugs(heading, anchor):
    assert doc_checks.slug(heading) == anchor


def test_repeated_headings_get_numbered_anchors():
    assert doc_checks.anchors("# A\n\n## Usage\n\n## Usage\n\n```\n# Usage\n```\n") == {
        "a",
        "usage",
        "usage-1",
    }


# --- the command check, on broken input --------------------------------------------------------


def test_command_lines_are_found_in_code_blocks_joined_and_stripped_of_comments():
    text = (
        "guided-flow fit --not-in-a-block\n\n"
        "```\n"
        "# a comment line\n"
        "guided-flow fit --config experiments/demo.yaml \\\n"
        "    --trainer.max_steps 2   # two steps\n"
        "srun guided-flow fit --config experiments/stage2.yaml\n"
        "python benchmarks/speed.py\n"
        "```\n"
    )
    assert doc_checks.command_lines(text) == [
        (5, "guided-flow fit --config experiments/demo.yaml  --trainer.max_steps 2   # two steps"),
        (7, "guided-flow fit --config experiments/stage2.yaml"),
    ]


@pytest.mark.parametrize(
    "command",
    [
        "guided-flow test --config experiments/test_pfwillow.yaml --ckpt_path X --pck_protocol hpf",
        "guided-flow fit --config experiments/demo.yaml --model.model.rho 0.8   # a comment",
        "guided-flow match a.jpg b.jpg --out DIR",
        "guided-flow download spair --root DIR --offline",
        "guided-flow sweep experiments/sweeps/cp_cm.yaml --out DIR -- --trainer.max_steps=2",
        "guided-flow export --untrained --format onnx --out gsf.onnx",
        "guided-flow --help",
    ],
)
def test_a_sound_command_line_passes(command, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert doc_checks.command_error(command) is None


@pytest.mark.parametrize(
    ("command", "reported"),
    [
        (
            "guided-flow test --config experiments/test_spair.yaml --ckpt_path CKPT --no_such 3",
            "unrecognized arguments: --no_such",
        ),
        ("guided-flow fit --config experiments/no_such.yaml", "no_such.yaml"),
        ("guided-flow test --config experiments/test_spair.yaml --pck_protocol nope", "nope"),
        ("guided-flow fit --config experiments/demo.yaml --model.rho 0.8", "0.1's option names"),
        ("guided-flow match a.jpg b.jpg --out DIR --no-such", "unrecognized arguments: --no-such"),
        ("guided-flow export --format onnx --out x.onnx", "--ckpt"),
        ("guided-flow download spair", "--root"),
        ("guided-flow frobnicate --fast", "unknown command 'frobnicate'"),
        ("guided-flow fit --config 'unclosed", "not a shell command line"),
    ],
)
def test_a_broken_command_line_is_reported(command, reported, monkeypatch):
    monkeypatch.chdir(ROOT)
    error = doc_checks.command_error(command)
    assert error is not None and reported in error


def test_a_broken_command_in_the_real_documents_is_reported(monkeypatch):
    monkeypatch.chdir(ROOT)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    broken = readme.replace("--results_dir outputs/results/spair", "--result_dir x", 1)
    assert broken != readme
    errors = [doc_checks.command_error(c) for _, c in doc_checks.command_lines(broken)]
    assert [e for e in errors if e and "--result_dir" in e]


# --- the Python API example --------------------------------------------------------------------

API_SECTION = "## Python API"


def api_example() -> str:
    """The first ```python block of docs/api.md's "## Python API" section."""
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    section = re.search(rf"^{re.escape(API_SECTION)}[ \t]*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section, f"docs/api.md has no {API_SECTION!r} section"
    block = re.search(r"^```python[ \t]*\n(.*?)^```", section.group(1), re.M | re.S)
    assert block, f"the {API_SECTION!r} section has no ```python block"
    return block.group(1)


def test_the_python_api_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    exec(compile(api_example(), "docs/api.md (Python API)", "exec"), namespace)
    results = [value for value in namespace.values() if isinstance(value, MatchResult)]
    assert results, "the example should call match()"
    assert capsys.readouterr().out  # it shows its results
