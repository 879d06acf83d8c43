"""Checks that keep the documentation true: links resolve and command lines parse.

- :func:`broken_links` lists every relative link or image of a Markdown file (``[x](path)``,
  ``![x](path#anchor)``) whose file does not exist, or whose anchor names no heading of the file
  it points to (GitHub's heading slugs);
- :func:`command_lines` lists the ``guided-flow ...`` lines of a file's fenced code blocks, with
  ``\\``-continued lines joined and shell comments dropped;
- :func:`command_error` parses one such line with the current CLI, runs nothing, and says what is
  wrong with it (``None`` when it parses).

``python -m tools.doc_checks`` runs both checks on :data:`DOCUMENTS` and prints every problem.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The project's Markdown: the front page, the habits, and the manual.
DOCUMENTS = ("README.md", "CHANGELOG.md", "CONTRIBUTING.md", "docs/*.md")

_FENCE = re.compile(r"^[ \t]*(```|~~~)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t#]*$")
# A code span may wrap onto the next line, never across a blank one.
_INLINE_CODE = re.compile(r"(`+)((?:(?!\n[ \t]*\n).)+?)\1", re.S)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_COMMAND = re.compile(r"^(?:srun\s+)?(guided-flow\s.*)$")


def documents(root: Path = ROOT) -> list[Path]:
    """The Markdown files the checks cover, in a stable order."""
    found: list[Path] = []
    for pattern in DOCUMENTS:
        found += sorted(root.glob(pattern))
    return found


def _split_fences(text: str) -> Iterator[tuple[int, str, bool]]:
    """``(line number, line, inside a fenced code block)`` for every line of ``text``; the fence
    lines themselves count as inside."""
    fence = None
    for number, line in enumerate(text.splitlines(), start=1):
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            yield number, line, True
        elif fence is not None:
            if line.strip().startswith(fence):
                fence = None
            yield number, line, True
        else:
            yield number, line, False


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the text without Markdown, lower case, punctuation dropped
    (letters, digits, ``_`` and ``-`` stay), spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """The anchors of a Markdown text's headings (repeated headings get ``-1``, ``-2``, ...)."""
    seen: dict[str, int] = {}
    found = set()
    for _, line, fenced in _split_fences(text):
        match = None if fenced else _HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(text: str) -> Iterator[tuple[int, str]]:
    """``(line number, target)`` of every link and image outside code (a link's text may wrap
    onto the next line)."""
    prose = "\n".join("" if fenced else line for _, line, fenced in _split_fences(text))
    prose = _INLINE_CODE.sub(lambda code: "\n" * code.group(0).count("\n"), prose)
    for match in _LINK.finditer(prose):
        yield prose.count("\n", 0, match.start()) + 1, match.group(1)


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """Every relative link of the Markdown file ``path`` that does not resolve: a missing file or
    folder, a path outside ``root``, or an anchor without its heading."""
    text = path.read_text(encoding="utf-8")
    problems = []
    for number, target in links(text):
        if _SCHEME.match(target):  # https:, mailto:: not checked (no network)
            continue
        file_part, _, anchor = target.partition("#")
        where = f"{_shown(path, root)}:{number}: {target}"
        destination = (path.parent / file_part).resolve() if file_part else path.resolve()
        if not destination.is_relative_to(root.resolve()):
            problems.append(f"{where}: points outside the repository")
        elif not destination.exists():
            problems.append(f"{where}: no such file")
        elif anchor and destination.suffix == ".md" and destination.is_file():
            if anchor not in anchors(destination.read_text(encoding="utf-8")):
                problems.append(f"{where}: no heading with the anchor #{anchor}")
    return problems


def command_lines(text: str) -> list[tuple[int, str]]:
    """``(line number, command)`` of every ``guided-flow ...`` line (optionally after
    ``srun``) in the fenced code blocks of ``text``, continuation lines joined."""
    commands = []
    lines = list(_split_fences(text))
    index = 0
    while index < len(lines):
        number, line, fenced = lines[index]
        index += 1
        match = _COMMAND.match(line.strip()) if fenced else None
        if not match:
            continue
        command = match.group(1)
        while command.rstrip().endswith("\\") and index < len(lines) and lines[index][2]:
            command = command.rstrip()[:-1] + " " + lines[index][1].strip()
            index += 1
        commands.append((number, command))
    return commands


def command_error(command: str) -> str | None:
    """What is wrong with one ``guided-flow ...`` command line under the current CLI, or
    ``None``. Nothing runs: a Lightning subcommand is parsed with ``--print_config``, a
    project command by its own parser (a sweep's arguments after ``--`` are the trial's);
    options of 0.1 that parse only through the upgrade count as errors."""
    from guided_flow.cli.legacy import upgrade_arguments
    from guided_flow.cli.main import LIGHTNING_COMMANDS, TOOL_COMMANDS, run_lightning

    try:
        argv = shlex.split(command, comments=True)
    except ValueError as error:
        return f"not a shell command line: {error}"
    if not argv or argv[0] != "guided-flow":
        return "does not start with guided-flow"
    argv = argv[1:]
    if argv in ([], ["-h"], ["--help"]):
        return None
    name = argv[0]
    stderr = io.StringIO()
    with (
        warnings.catch_warnings(record=True) as caught,
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(stderr),
    ):
        warnings.simplefilter("always")
        try:
            if name in TOOL_COMMANDS:
                arguments = argv[1:]
                if "--" in arguments:
                    arguments = arguments[: arguments.index("--")]
                importlib.import_module(TOOL_COMMANDS[name]).build_parser().parse_args(arguments)
            elif name in LIGHTNING_COMMANDS:
                if upgrade_arguments(argv) != argv:
                    return "uses 0.1's option names (see docs/upgrading.md)"
                run_lightning([*argv, "--print_config"])
                return "did not stop after --print_config"
            else:
                return f"unknown command {name!r}"
        except SystemExit as stop:
            if stop.code not in (0, None):
                return _last_line(stderr.getvalue()) or f"exit status {stop.code}"
        except Exception as error:  # a configuration the parser refuses while reading it
            return f"{type(error).__name__}: {error}"
    upgrades = [w for w in caught if issubclass(w.category, FutureWarning)]
    if upgrades:
        return f"deprecated: {upgrades[0].message}"
    return None


def _last_line(text: str) -> str:
    """The parser's complaint: from its ``error:`` line on (three lines at most), else the last
    line of its output."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if "error:" in line), len(lines) - 1)
    return " ".join(lines[start : start + 3])


def _shown(path: Path, root: Path) -> str:
    resolved = path.resolve()
    return str(resolved.relative_to(root.resolve())) if resolved.is_relative_to(root) else str(path)


def main() -> int:
    """Check every document; print each problem; exit 1 if there is any."""
    problems = []
    for path in documents():
        problems += broken_links(path)
        for number, command in command_lines(path.read_text(encoding="utf-8")):
            error = command_error(command)
            if error:
                problems.append(f"{_shown(path, ROOT)}:{number}: {command}\n    {error}")
    print("\n".join(problems) or f"{len(documents())} documents: every link and command is sound")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
