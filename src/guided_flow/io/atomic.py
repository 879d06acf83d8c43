"""Atomic writes: a file appears complete or not at all."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open ``path`` for binary writing so that it appears complete or not at all: the data go to
    a hidden temporary file in the same folder, which replaces ``path`` when the block exits
    without error (and is removed otherwise). Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, content: Mapping[str, Any]) -> None:
    """Write ``content`` as indented JSON, atomically (values JSON lacks, as their ``str``)."""
    with atomic_open(path) as handle:
        handle.write((json.dumps(content, indent=2, default=str) + "\n").encode())


def write_jsonl(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write one JSON object per line, atomically."""
    with atomic_open(path) as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in rows).encode())
