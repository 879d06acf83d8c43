"""PF-WILLOW (Ham et al. 2016) as a test benchmark.

Layout under ``root`` (the list at the top or in ``image_pairs/``; image paths relative to
``root``)::

    test_pairs.csv                      (or its public name test_pairs_pf.csv), 900 pairs
    PF-dataset/<category>/<image>.png   e.g. PF-dataset/car(G)/car(G)_1.png

The list is read by column position, whatever its header says: source image, target image, then
10 x and 10 y coordinates of the source's keypoints and 10 x and 10 y of the target's (42
columns), in the original images' pixels. A keypoint whose coordinates are empty, NaN or negative
(the public lists' ``-1``) is padding: it is marked invalid in ``kps_valid`` and never enters a
PCK or its bound. A slot must be valid in both images or in neither, and a keypoint is padding in
both coordinates or in neither. The category is the image's folder (:data:`WILLOW_CATEGORIES`).

The PCK bound is L = max(w, h) of the box enclosing the target's valid keypoints (``trg_kps``),
so they must not all coincide. Bad rows (these, wrong counts, infinite coordinates, keypoints more
than 1 px outside their image, missing or truncated images: :mod:`data_modules.bad_pairs`) raise
:class:`~guided_flow.errors.DataError` naming the file and line, or are skipped and counted with
``skip_bad``. Batches and ``meta`` are those of
:class:`~data_modules.pairs.KeypointPairsDataset`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from data_modules.bad_pairs import BadPairPolicy
from data_modules.cache import ImageCache
from data_modules.pairs import (
    KEYPOINT_ALPHAS,
    KeypointPairsDataset,
    PairList,
    PairListBuilder,
    find_pair_list,
    read_rows,
    row_error,
)
from data_modules.pairs_module import PairsDataModule

WILLOW_CATEGORIES = (
    "car(G)", "car(M)", "car(S)", "duck(S)", "motorbike(G)", "motorbike(M)", "motorbike(S)",
    "winebottle(M)", "winebottle(wC)", "winebottle(woC)",
)  # fmt: skip
KEYPOINTS = 10
COLUMNS = 2 + 4 * KEYPOINTS


def _coordinate(path: Path, line: int, column: int, text: str) -> float:
    """A keypoint coordinate; NaN for padding (empty, NaN or negative)."""
    if not text:
        return float("nan")
    try:
        value = float(text)
    except ValueError as error:
        raise row_error(path, line, f"column {column + 1}: {text!r} is not a number") from error
    if math.isinf(value):
        raise row_error(path, line, f"column {column + 1}: {text!r} is not a finite number")
    return value if value >= 0 else float("nan")


def read_willow_pairs(root: Path, path: Path, policy: BadPairPolicy | None = None) -> PairList:
    """Read and validate PF-WILLOW's list ``path`` (see the module docstring); errors name the
    file and line. ``policy`` (default: raise) decides what a bad row does."""
    policy = policy or BadPairPolicy()
    _, rows = read_rows(path)
    builder = PairListBuilder(root, path, WILLOW_CATEGORIES)
    for line, row in rows:
        with policy.guard():
            _add_row(builder, line, row)
    return builder.build("keypoints")


def _add_row(builder: PairListBuilder, line: int, row: list[str]) -> None:
    """Check row ``line`` of the list and add its pair to ``builder``."""
    path = builder.path
    if len(row) != COLUMNS:
        raise row_error(
            path,
            line,
            f"{len(row)} columns, expected {COLUMNS} (source image, target image, then "
            f"{KEYPOINTS} x and {KEYPOINTS} y per image)",
        )
    values = np.array(
        [_coordinate(path, line, column, text) for column, text in enumerate(row[2:], 2)]
    ).reshape(2, 2, KEYPOINTS)  # image, (x, y), slot
    points = values.transpose(0, 2, 1).copy()  # image x slot x (x, y)
    valid = np.isfinite(points).all(axis=-1)
    if (valid[0] != valid[1]).any():
        raise row_error(
            path,
            line,
            f"keypoint count mismatch: the source has {int(valid[0].sum())} valid keypoints, "
            f"the target {int(valid[1].sum())} (slots {np.flatnonzero(valid[0] != valid[1])})",
        )
    if not valid[0].any():
        raise row_error(path, line, "no valid keypoint")
    if np.ptp(points[1][valid[1]], axis=0).max() == 0:
        raise row_error(
            path, line, "the target's valid keypoints all coincide: the PCK bound would be 0"
        )
    category = Path(row[1]).parent.name
    if category not in WILLOW_CATEGORIES:
        raise row_error(
            path,
            line,
            f"the target's folder {category!r} is not a PF-WILLOW category "
            f"({', '.join(WILLOW_CATEGORIES)})",
        )
    builder.add(line, row[0], row[1], WILLOW_CATEGORIES.index(category), points=points)


class PFWillowDataModule(PairsDataModule):
    """PF-WILLOW test pairs (see the module docstring); the arguments are those of
    :class:`~data_modules.pairs_module.PairsDataModule` (only ``split="test"``; ``skip_bad``
    drops bad rows with a warning and counts them in ``skipped_pairs``)."""

    evaluation = "keypoints"
    benchmark = "pf-willow"
    categories = WILLOW_CATEGORIES
    pck_bound = "trg_kps"
    alphas = KEYPOINT_ALPHAS

    def list_names(self, split: str) -> tuple[str, ...]:
        return ("test_pairs.csv", "test_pairs_pf.csv")

    def read_pairs(self, split: str) -> PairList:
        return read_willow_pairs(
            self.root,
            find_pair_list(self.root, self.list_names(split), self.benchmark),
            self.policy,
        )

    def make_dataset(self, split: str, pairs: PairList, cache: ImageCache) -> Dataset:
        return KeypointPairsDataset(pairs, cache, WILLOW_CATEGORIES)
