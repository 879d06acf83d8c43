"""Reading inputs in batches: each item is read (decoded, resized) as it comes, the items read
are grouped into lists, and an item that cannot be read is reported in its place as a
:class:`~guided_flow.errors.MatchFailure`, so that the others go on."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from guided_flow.errors import GuidedFlowError, MatchFailure, one_line

Item = TypeVar("Item")
Read = TypeVar("Read")

READ_ERRORS = (GuidedFlowError, ValueError, TypeError)
"""What reading a bad item raises: a missing or unreadable file, a malformed value."""


def read_in_batches(
    items: Iterable[Item], size: int, read: Callable[[Item], Read]
) -> Iterator[list[Read] | MatchFailure]:
    """``read`` each of ``items`` and yield what it returns in lists of ``size`` (the last one
    may be shorter), in order. An item whose ``read`` raises one of :data:`READ_ERRORS` is
    yielded as a :class:`MatchFailure` with its 0-based index (its ``__cause__`` the error,
    without its traceback), right after the shorter batch read before it, so the order of the
    items is kept. Only one batch is held at a time."""
    if size < 1:
        raise ValueError(f"the batch size must be at least 1, got {size}")
    batch: list[Read] = []
    for index, item in enumerate(items):
        try:
            batch.append(read(item))
        except READ_ERRORS as error:
            failure = MatchFailure(index, one_line(error))
            failure.__cause__ = error.with_traceback(None)  # no frames (and pictures) kept
        else:
            if len(batch) == size:
                yield batch
                batch = []
            continue
        if batch:
            yield batch
            batch = []
        yield failure
    if batch:
        yield batch
