"""The overview page of a batch of matched pairs (``guided-flow match --pairs``): one table row per
pair of the CSV, with its source and target thumbnails, its confident-match count and a link to
its own page (:mod:`guided_flow.viz.match_page`), or the reason it failed.

The page is static HTML with relative links to the pair folders beside it: it opens from disk
(``file://``), with no script, server or network.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote

from guided_flow.viz.html import fitted_size, img, page, write_text

THUMB_DISPLAY = 120
"""Longest side, in CSS pixels, of each thumbnail on the overview page."""

_INDEX_CSS = """
#pairs td{vertical-align:middle}#pairs img{margin-right:4px}
#pairs tr.failed td{color:#b00;text-align:left}
"""


@dataclass(frozen=True)
class BatchEntry:
    """One pair on the overview page.

    ``row`` is the CSV row number, ``source`` / ``target`` the files as the CSV names them.
    A matched pair has ``folder`` (its results folder, relative to the page), ``thumbnails``
    (source and target thumbnails, relative to ``folder``), ``sizes`` (the pictures' original
    (H, W)) and ``confident_matches``; a failed one has ``reason`` and no folder."""

    row: int
    source: str
    target: str
    folder: str | None = None
    thumbnails: tuple[str, str] = ("", "")
    sizes: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))
    confident_matches: int = 0
    reason: str = ""


def _href(*parts: str) -> str:
    """A relative link to ``parts`` joined by ``/``, each part percent-encoded and escaped."""
    return html.escape("/".join(quote(part) for part in parts))


def _row(entry: BatchEntry) -> str:
    """The table row of one pair."""
    names = "".join(f"<td>{html.escape(text)}</td>" for text in (entry.source, entry.target))
    head = f"<td>{entry.row}</td>{names}"
    if entry.folder is None:
        reason = html.escape(entry.reason)
        return f'<tr class="failed" id="row-{entry.row}">{head}<td colspan="3">{reason}</td></tr>'
    link = _href(entry.folder, "index.html")
    pictures = "".join(
        img(
            f"{kind}-{entry.row}",
            _href(entry.folder, thumb),
            fitted_size(size, THUMB_DISPLAY),
            f'title="{kind}"',
        )
        for kind, thumb, size in zip(
            ("source", "target"), entry.thumbnails, entry.sizes, strict=True
        )
    )
    return (
        f'<tr class="pair" id="row-{entry.row}">{head}<td><a href="{link}">{pictures}</a></td>'
        f'<td>{entry.confident_matches}</td><td><a href="{link}">page</a></td></tr>'
    )


def write_batch_index(
    path: str | os.PathLike, entries: Sequence[BatchEntry], failures: str | None = None
) -> None:
    """Write the overview page of ``entries`` (in the order given) to ``path`` (atomic); the
    links are relative to the page's folder. ``failures``: the name of the failures file beside
    the page, linked when some pair failed."""
    failed = sum(entry.folder is None for entry in entries)
    summary = f"{len(entries)} pairs: {len(entries) - failed} matched, {failed} failed"
    if failures is not None and failed:
        summary += f' (<a href="{_href(failures)}">{html.escape(failures)}</a>)'
    head = "".join(
        f"<th>{name}</th>"
        for name in ("row", "source", "target", "thumbnails", "confident matches", "page")
    )
    body = (
        f'<h1>guided-flow match</h1><p id="summary">{summary}</p>'
        f'<table id="pairs"><thead><tr>{head}</tr></thead><tbody>'
        + "".join(_row(entry) for entry in entries)
        + "</tbody></table>"
    )
    write_text(path, page("guided-flow match: pairs", _INDEX_CSS, body))
