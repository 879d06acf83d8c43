"""``guided-flow match --pairs PAIRS.csv --out DIR``: many pairs in one run.

The CSV (:mod:`guided_flow.cli.pair_list`) is read and checked whole before the model loads: a
missing file or a malformed line stops the command at once (exit status 2). The model then loads
once and matches the pairs ``--batch-size`` at a time (:meth:`GuidedSemanticFlow.match_many`),
with a progress bar on stderr (pairs done, pairs per second, time left). Each pair writes the
files of ``guided-flow match`` (:mod:`guided_flow.cli.match`) plus ``thumbs/<row>_s.jpg``,
``thumbs/<row>_t.jpg`` and ``pair.json`` (its row, files, sizes and confident-match count) to
``DIR/<row>_<source stem>_<target stem>/``, built in a hidden ``.<name>.partial-*`` folder that
is renamed at the end, so a folder under its final name is always complete.

A pair is **complete** when its ``pair.json`` names the row's source, target and keypoint files
and every file it lists exists; a rerun with the same ``--out`` skips complete pairs and redoes
the others. A pair that cannot be read (an unreadable picture or keypoint file) is listed in
``DIR/failures.csv`` (``row,source,target,reason``, absolute paths) and the others go on; the
command then exits with status 1. ``DIR/index.html`` lists every pair of the CSV.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import sys
import uuid
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from guided_flow.api import MatchResult, as_rgb
from guided_flow.cli.match_steps import load_matcher, read_keypoints, write_results
from guided_flow.cli.pair_list import PairRow, read_pairs
from guided_flow.errors import ConfigError, DataError, GuidedFlowError, MatchFailure, one_line
from guided_flow.io.atomic import atomic_open, write_json
from guided_flow.viz.batch_index import BatchEntry, write_batch_index
from guided_flow.viz.results_page import write_pair_thumbnails

SUMMARY = "pair.json"
FAILURES = "failures.csv"
THUMB_SIZE = 160
"""Longest side, in pixels, of the thumbnails each pair writes."""
BAR = "{l_bar}{bar}| {n_fmt}/{total_fmt} pairs [{elapsed}<{remaining}, {rate_noinv_fmt}]"
"""The progress bar: pairs done of all, time spent and left, pairs per second."""


def complete_entry(out: Path, pair: PairRow) -> BatchEntry | None:
    """The overview entry of ``pair`` when its folder under ``out`` is complete (module
    docstring), else None."""
    folder = out / pair.folder
    try:
        summary = _json_object(folder / SUMMARY)
        expected = [str(pair.source), str(pair.target), None if pair.kps is None else str(pair.kps)]
        if [summary["source"], summary["target"], summary["kps"]] != expected:
            return None
        if not all((folder / name).is_file() for name in summary["files"]):
            return None
        return BatchEntry(
            pair.row,
            pair.written[0],
            pair.written[1],
            pair.folder,
            (summary["thumbnails"][0], summary["thumbnails"][1]),
            (tuple(summary["source_size"]), tuple(summary["target_size"])),
            int(summary["confident_matches"]),
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


def _json_object(path: Path) -> dict:
    """The JSON object of ``path``; raises OSError or ValueError when it is not one."""
    content = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(content, dict):
        raise ValueError(f"{path}: not a JSON object")
    return content


def write_pair(
    out: Path,
    pair: PairRow,
    source: np.ndarray,
    target: np.ndarray,
    result: MatchResult,
    source_kps: np.ndarray | None,
) -> BatchEntry:
    """Write the files of one matched pair (``source``, ``target``: ``H x W x 3`` uint8) into a
    hidden folder under ``out``, then rename it to the pair's folder (replacing an incomplete
    one). Returns its overview entry."""
    final = out / pair.folder
    partial = out / f".{pair.folder}.partial-{uuid.uuid4().hex[:12]}"
    try:
        names = write_results(partial, source, target, result, source_kps)
        thumbnails = write_pair_thumbnails(partial, pair.row, source, target, THUMB_SIZE)
        count = len(result.confident_matches[0])
        sizes = (source.shape[0], source.shape[1]), (target.shape[0], target.shape[1])
        summary = {
            "row": pair.row,
            "source": str(pair.source),
            "target": str(pair.target),
            "kps": None if pair.kps is None else str(pair.kps),
            "confident_matches": count,
            "source_size": list(sizes[0]),
            "target_size": list(sizes[1]),
            "thumbnails": list(thumbnails),
            "files": [*names, *thumbnails],
        }
        write_json(partial / SUMMARY, summary)
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return BatchEntry(pair.row, *pair.written[:2], pair.folder, thumbnails, sizes, count)


def write_failures(path: Path, pairs: list[PairRow], reasons: dict[int, str]) -> None:
    """Write ``row,source,target,reason`` for each failed pair (atomic), or remove the file of
    an earlier run when none failed."""
    if not reasons:
        path.unlink(missing_ok=True)
        return
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["row", "source", "target", "reason"])
    for pair in pairs:
        if pair.row in reasons:
            writer.writerow([pair.row, pair.source, pair.target, reasons[pair.row]])
    with atomic_open(path) as handle:
        handle.write(text.getvalue().encode("utf-8"))


def _prepare_out(out: Path) -> None:
    """Create ``out`` and remove the partial folders an interrupted run left there."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for partial in out.glob(".*.partial-*"):
            if partial.is_dir():
                shutil.rmtree(partial)
    except OSError as error:
        raise DataError(f"{out}: cannot use as the results folder ({error})") from error


def match_pairs(
    args: argparse.Namespace, todo: list[PairRow], out: Path, entries: dict[int, BatchEntry]
) -> dict[int, str]:
    """Load the model once and match the ``todo`` pairs ``--batch-size`` at a time, writing each
    into its folder under ``out`` and its entry into ``entries``, with a progress bar on stderr.
    Returns the reason of each pair that failed, by row."""
    matcher = load_matcher(args)
    reasons: dict[int, str] = {}
    pending: deque[tuple[PairRow, np.ndarray, np.ndarray, np.ndarray | None]] = deque()
    bar = tqdm(total=len(todo), desc="matching", unit="pair", file=sys.stderr, bar_format=BAR)

    def readable() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """The pictures and keypoints of each pair to do; a pair that cannot be read fails."""
        for pair in todo:
            try:
                source = as_rgb(pair.source, args.max_pixels)
                target = as_rgb(pair.target, args.max_pixels)
                kps = None if pair.kps is None else read_keypoints(pair.kps)
            except GuidedFlowError as error:
                reasons[pair.row] = one_line(error)
                bar.update()
                continue
            pending.append((pair, source, target, kps))
            yield source, target, kps

    with bar:
        for result in matcher.match_many(readable(), args.batch_size):
            pair, source, target, kps = pending.popleft()
            if isinstance(result, MatchFailure):
                reasons[pair.row] = str(result)
            else:
                try:
                    entries[pair.row] = write_pair(out, pair, source, target, result, kps)
                except OSError as error:
                    raise DataError(f"{out / pair.folder}: cannot write ({error})") from error
            bar.update()
    return reasons


def run_batch(args: argparse.Namespace) -> int:
    """Run ``guided-flow match --pairs`` (module docstring); returns the exit status: 0, or 1
    when some pair failed. Bad options and a bad CSV raise before the model loads, and the
    model does not load when every pair is already complete."""
    if args.source is not None or args.target is not None:
        raise ConfigError("give SOURCE TARGET or --pairs PAIRS.csv, not both")
    if args.kps is not None:
        raise ConfigError("--kps is for one pair: with --pairs, give keypoints in a kps column")
    pairs = read_pairs(args.pairs)
    out = Path(args.out)
    _prepare_out(out)
    entries = {pair.row: entry for pair in pairs if (entry := complete_entry(out, pair))}
    todo = [pair for pair in pairs if pair.row not in entries]
    print(f"{len(pairs)} pairs in {args.pairs}, {len(entries)} already complete in {out}")
    reasons = match_pairs(args, todo, out, entries) if todo else {}
    for pair in pairs:
        if pair.row in reasons:
            entries[pair.row] = BatchEntry(pair.row, *pair.written[:2], reason=reasons[pair.row])
    write_failures(out / FAILURES, pairs, reasons)
    write_batch_index(out / "index.html", [entries[pair.row] for pair in pairs], FAILURES)
    print(f"{len(pairs) - len(reasons)} of {len(pairs)} pairs matched: {out / 'index.html'}")
    if reasons:
        print(f"{len(reasons)} of {len(pairs)} pairs failed: {out / FAILURES}", file=sys.stderr)
    return 1 if reasons else 0
