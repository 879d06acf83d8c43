"""The pairs CSV of ``guided-flow match --pairs PAIRS.csv``: read and check it whole, before any
model is loaded.

The file is UTF-8 (a byte-order mark is allowed) with a header line naming the columns
``source,target`` and, optionally, ``kps`` (a JSON file of source keypoints, as ``--kps``), in
any order. Paths are absolute or relative to the CSV's folder. Blank lines are skipped; **row
numbers** count the data rows, the first line after the header being row 1, and each pair's
results go to the folder ``<row number, zero-padded to 4 digits>_<source stem>_<target stem>``
(``0001_cat_dog``; rows past 9999 take more digits).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

from guided_flow.errors import DataError

COLUMNS = ("source", "target")
OPTIONAL_COLUMNS = ("kps",)
ROW_DIGITS = 4
"""Row numbers in folder names are zero-padded to this many digits."""


@dataclass(frozen=True)
class PairRow:
    """One data row of a pairs CSV: its 1-based ``row`` number, its ``line`` in the file, the
    absolute paths of its files (``kps`` None without keypoints) and the texts as written."""

    row: int
    line: int
    source: Path
    target: Path
    kps: Path | None
    written: tuple[str, str, str]

    @property
    def folder(self) -> str:
        """The name of the pair's results folder: ``<row>_<source stem>_<target stem>``."""
        return f"{self.row:0{ROW_DIGITS}d}_{self.source.stem}_{self.target.stem}"


def _header(path: Path, fields: list[str]) -> dict[str, int]:
    """The column of each name of the header ``fields``; raises :class:`DataError` unless they
    are ``source``, ``target`` and optionally ``kps``, each once."""
    names = [field.strip() for field in fields]
    expected = f"expected the header {','.join(COLUMNS)}[,{','.join(OPTIONAL_COLUMNS)}]"
    unknown = sorted(set(names) - {*COLUMNS, *OPTIONAL_COLUMNS})
    missing = [name for name in COLUMNS if name not in names]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if unknown or missing or repeated:
        found = ",".join(names) or "an empty line"
        raise DataError(f"{path}: line 1: {expected}, got {found!r}")
    return {name: names.index(name) for name in names}


def _resolve(folder: Path, text: str) -> Path:
    """A path of the CSV: absolute, or relative to the CSV's ``folder``."""
    path = Path(text).expanduser()
    return Path(os.path.abspath(path if path.is_absolute() else folder / path))


def _check_row(
    path: Path, columns: dict[str, int], fields: list[str], row: int, line: int
) -> PairRow:
    """One data row as a :class:`PairRow`; raises :class:`DataError` naming the file, row and
    line when it has the wrong number of fields, an empty source or target, or a path that is
    not an existing file."""
    where = f"{path}: row {row} (line {line})"
    if len(fields) != len(columns):
        raise DataError(f"{where}: {len(fields)} fields, but the header names {len(columns)}")
    cells = {name: fields[index].strip() for name, index in columns.items()}
    resolved: dict[str, Path | None] = {}
    for name in (*COLUMNS, *OPTIONAL_COLUMNS):
        text = cells.get(name, "")
        if not text:
            if name in COLUMNS:
                raise DataError(f"{where}: the {name} column is empty")
            resolved[name] = None
            continue
        file = _resolve(path.parent, text)
        if not file.is_file():
            what = "no such file" if not file.exists() else "not a file"
            raise DataError(f"{where}: {name} {text!r}: {what} ({file})")
        resolved[name] = file
    source, target = resolved["source"], resolved["target"]
    assert source is not None and target is not None  # checked above
    written = (cells["source"], cells["target"], cells.get("kps", ""))
    return PairRow(row, line, source, target, resolved["kps"], written)


def read_pairs(path: str | os.PathLike) -> list[PairRow]:
    """Read and check a pairs CSV (module docstring): its header, the fields of every row and
    that every path names an existing file. Raises :class:`DataError` with one line naming the
    file and the first bad row (and how many more there are)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as error:
        raise DataError(f"{path}: no such pairs file") from error
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read the pairs CSV ({error})") from error
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[PairRow] = []
    problems: list[str] = []
    try:
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty: expected the header source,target[,kps] and rows")
        columns = _header(path, header)
        for fields in reader:
            if not any(field.strip() for field in fields):
                continue  # a blank line
            number = len(rows) + len(problems) + 1
            try:
                rows.append(_check_row(path, columns, fields, number, reader.line_num))
            except DataError as error:
                problems.append(str(error))
    except csv.Error as error:
        raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({error})") from error
    if problems:
        others = len(problems) - 1
        more = f" (and {others} more bad row{'s' if others > 1 else ''})" if others else ""
        raise DataError(problems[0] + more)
    if not rows:
        raise DataError(f"{path}: no pairs: the header is followed by no row")
    return rows
