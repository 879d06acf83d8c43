"""Checks that every benchmark loader applies to a pair, and what it does with a pair that fails
them (:class:`BadPairPolicy`).

A pair is bad when its list row or annotation is malformed, when one of its images is missing,
unreadable or truncated, or when one of its keypoints (or polygon vertices) is not finite or lies
outside its original image. By default a bad pair raises :class:`~guided_flow.errors.DataError`
naming the file (and the line of a csv list); with ``--data.skip_bad=true`` it is dropped with a
warning and counted, so that a metric never silently includes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from pytorch_lightning.utilities import rank_zero_warn

from guided_flow.errors import DataError
from guided_flow.io.images import load_image

POINT_TOLERANCE = 1.0
"""Pixels a keypoint or vertex may lie beyond ``[0, W-1] x [0, H-1]`` of its original image:
enough for annotations with 1-based or box-edge coordinates (``x = W``), not for a wrong image."""


class BadPairPolicy:
    """Raise on a bad pair (default), or with ``skip`` warn once, drop it and record it.

    Wrap the work on one pair in :meth:`guard`; :attr:`skipped` holds the message of every
    dropped pair, in the order met."""

    def __init__(self, skip: bool = False) -> None:
        self.skip = skip
        self.skipped: list[str] = []

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Run the block for one pair; a :class:`DataError` raised in it propagates, or, when
        skipping, becomes a warning (on process 0) and an entry of :attr:`skipped`, and the rest
        of the block is not run."""
        try:
            yield
        except DataError as error:
            if not self.skip:
                raise
            self.skipped.append(str(error))
            rank_zero_warn(f"skipped a bad pair (--data.skip_bad): {error}")


class ImageSizes:
    """``(H, W)`` of image files, each decoded in full once (so that a truncated file is found
    before any model work). ``sizes(path)`` raises :class:`DataError` for a missing, unreadable
    or truncated file, every time it is asked about it."""

    def __init__(self) -> None:
        self.known: dict[Path, tuple[int, int] | str] = {}

    def __call__(self, path: Path) -> tuple[int, int]:
        if path not in self.known:
            try:
                if not path.is_file():
                    raise DataError(f"image {path} does not exist")
                image = load_image(path, upright=False)  # annotations: stored frame
                self.known[path] = (image.shape[0], image.shape[1])
            except DataError as error:
                self.known[path] = str(error)
        found = self.known[path]
        if isinstance(found, str):
            raise DataError(found)
        return found


def point_problem(points: np.ndarray, size: tuple[int, int], what: str = "keypoint") -> str | None:
    """What is wrong with ``points`` (``N x 2`` (x, y) original pixels of an image of ``size =
    (H, W)``; rows that are all NaN are absent and ignored), or None: every other row must be
    finite and lie within :data:`POINT_TOLERANCE` pixels of ``[0, W-1] x [0, H-1]``. Points are
    numbered from 1 in the message."""
    height, width = size
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    given = ~np.isnan(points).all(axis=1)
    high = np.array([width - 1, height - 1]) + POINT_TOLERANCE
    inside = ((points >= -POINT_TOLERANCE) & (points <= high)).all(axis=1)  # False for NaN, inf
    bad = np.flatnonzero(given & ~inside)
    if not len(bad):
        return None
    x, y = points[bad[0]]
    where = f"{what} {bad[0] + 1} at ({x:g}, {y:g})"
    if np.isnan(points[bad[0]]).any():
        return f"{where} lacks a coordinate"
    if not np.isfinite(points[bad[0]]).all():
        return f"{where} is not finite"
    return (
        f"{where} lies outside its {width} x {height} image (more than {POINT_TOLERANCE:g} px "
        f"beyond [0, {width - 1}] x [0, {height - 1}])"
    )


class SkippedPairsReport:
    """Mixin of the benchmark data modules, which validate their pairs through ``self.policy``
    (a :class:`BadPairPolicy`): what ``--data.skip_bad`` dropped, for the results."""

    policy: BadPairPolicy

    @property
    def skipped(self) -> list[str]:
        """The message of every pair dropped as bad, in the order met (each split is validated
        once per data module)."""
        return self.policy.skipped

    @property
    def skipped_pairs(self) -> int:
        """How many pairs were dropped as bad (0 unless ``skip_bad``)."""
        return len(self.policy.skipped)
