"""Pair lists: a benchmark's csv list of image pairs read and validated into a :class:`PairList`
(through a :class:`PairListBuilder`), and its pairs served from the image cache as batch items
(:func:`to_tensor`, :func:`pair_meta`; :class:`KeypointPairsDataset` for keypoint lists).

A list lies at the top of the benchmark's root or in ``image_pairs/`` (:func:`find_pair_list`);
its image paths are relative to the root. Every row error is a
:class:`~guided_flow.errors.DataError` naming the file and line (:func:`row_error`).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from data_modules.augment import View, flip_view, hflip_points
from data_modules.bad_pairs import ImageSizes, point_problem
from data_modules.cache import ImageCache, cached_image
from guided_flow.errors import DataError
from guided_flow.io.images import normalise
from guided_flow.model.geometry import rescale_points, resize_scale

PAIR_LIST_FOLDERS = ("", "image_pairs")
KEYPOINT_ALPHAS = (0.05, 0.1, 0.15)
"""The PCK thresholds of PF-PASCAL and PF-WILLOW."""


def download_hint(benchmark: str, root: Path) -> str:
    """The command that fetches ``benchmark`` into ``root``."""
    return f"`guided-flow download {benchmark} --root {root}`"


def row_error(path: Path, line: int, message: str) -> DataError:
    """A :class:`DataError` naming a pair list's file and line."""
    return DataError(f"{path}, line {line}: {message}")


def find_pair_list(root: Path, names: Sequence[str], benchmark: str) -> Path:
    """The first of ``names`` found at the top of ``root`` or in ``root/image_pairs``; raises
    :class:`DataError` with the places looked at and the download command."""
    if not root.is_dir():
        raise DataError(
            f"{root}: the {benchmark} folder does not exist. Download it with "
            f"{download_hint(benchmark, root)}"
        )
    candidates = [root / folder / name for name in names for folder in PAIR_LIST_FOLDERS]
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(
        f"{root}: no {benchmark} pair list (looked for {', '.join(map(str, candidates))}). "
        f"Download it with {download_hint(benchmark, root)}"
    )


def read_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """A csv pair list: its header and its non-blank rows with their 1-based line numbers, every
    cell stripped."""
    try:
        with path.open(newline="", encoding="utf-8") as file:
            reader = csv.reader(file)
            header = [cell.strip() for cell in next(reader, [])]
            rows = [
                (reader.line_num, [cell.strip() for cell in row])
                for row in reader
                if any(cell.strip() for cell in row)
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}: cannot read the pair list ({error})") from error
    if not header or not rows:
        raise DataError(f"{path}: expected a header line and at least one pair")
    return header, rows


def check_column_count(path: Path, line: int, row: list[str], header: list[str]) -> None:
    """Raise :class:`DataError` unless ``row`` has as many cells as ``header``."""
    if len(row) != len(header):
        raise row_error(
            path, line, f"{len(row)} columns, expected {len(header)} ({','.join(header)})"
        )


def parse_numbers(path: Path, line: int, column: str, text: str) -> np.ndarray:
    """A ``;``-, ``,``- or space-separated list of numbers as a float64 array."""
    parts = [part for part in re.split(r"[;,\s]+", text) if part]
    try:
        return np.array([float(part) for part in parts], dtype=np.float64)
    except ValueError as error:
        message = f"column {column}: {text!r} is not a list of numbers"
        raise row_error(path, line, message) from error


def parse_class(path: Path, line: int, text: str, count: int) -> int:
    """A 1-based class number in ``1..count`` (ASCII digits) as a 0-based category id."""
    if not re.fullmatch(r"[0-9]{1,9}", text) or not 1 <= int(text) <= count:
        raise row_error(path, line, f"class {text!r} is not a number in 1..{count}")
    return int(text) - 1


def paired_points(
    path: Path,
    line: int,
    xs: tuple[str, np.ndarray],
    ys: tuple[str, np.ndarray],
    what: str = "keypoint",
) -> np.ndarray:
    """Stack x and y coordinate lists (``(column name, values)``) of ``what`` (keypoints,
    vertices) into ``K x 2``; their lengths must agree."""
    (x_name, x), (y_name, y) = xs, ys
    if len(x) != len(y):
        message = f"{what} count mismatch: {x_name} has {len(x)}, {y_name} has {len(y)}"
        raise row_error(path, line, message)
    return np.stack((x, y), axis=-1)


@dataclass(frozen=True)
class PairList:
    """The validated rows of one pair list (``N`` pairs, ``I`` distinct images).

    ``images``: ``I`` paths relative to the root, in order of first mention; ``image_ids``
    (``N x 2``, source and target rows of ``images``), ``category_ids`` (``N``), ``flips``
    (``N`` bool), ``names`` (``N``, ``<number>-<source>-<target>:<category>``); keypoint lists:
    ``kps`` (``N x 2 x K x 2`` float32 (x, y) original pixels, source then target, zero where
    invalid) and ``kps_valid`` (``N x K`` bool); polygon lists: ``polygons`` (``N x 2 x P x 2``
    float32, NaN-padded). ``sources``: extra annotation files read (for the cache fingerprint)."""

    path: Path
    names: list[str]
    images: list[str]
    image_ids: np.ndarray
    category_ids: np.ndarray
    flips: np.ndarray
    kps: np.ndarray | None = None
    kps_valid: np.ndarray | None = None
    polygons: np.ndarray | None = None
    sources: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.names)


def _pad(arrays: list[np.ndarray], fill: float) -> np.ndarray:
    """Stack ``2 x K_n x 2`` arrays into ``N x 2 x K x 2`` float32, padded with ``fill``."""
    most = max(array.shape[1] for array in arrays)
    out = np.full((len(arrays), 2, most, 2), fill, dtype=np.float32)
    for row, array in enumerate(arrays):
        out[row, :, : array.shape[1]] = array
    return out


@dataclass
class PairListBuilder:
    """Collects the rows of a pair list (:meth:`add`), checking that every image exists and
    decodes and that every point lies in its image, and builds the :class:`PairList`. ``what``
    names the points in messages (``keypoint`` or ``vertex``)."""

    root: Path
    path: Path
    categories: Sequence[str]
    what: str = "keypoint"
    images: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict, init=False)
    pairs: list[tuple[list[int], int, bool]] = field(default_factory=list)
    points: list[np.ndarray] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    sizes: ImageSizes = field(default_factory=ImageSizes, init=False)

    def image_size(self, line: int, relative: str) -> tuple[int, int]:
        """``(H, W)`` of image ``relative``, which must exist and decode in full."""
        try:
            return self.sizes(self.root / relative)
        except DataError as error:
            raise row_error(self.path, line, str(error)) from error

    def add(
        self,
        line: int,
        source: str,
        target: str,
        category_id: int,
        flip: bool = False,
        points: np.ndarray | None = None,
    ) -> None:
        """Add a pair after checking it; ``points``: ``2 x K x 2`` (source, target) keypoints or
        polygons in original pixels, all-NaN rows absent, the others within their image
        (:func:`~data_modules.bad_pairs.point_problem`). A bad pair raises before anything is
        recorded."""
        sizes = [self.image_size(line, relative) for relative in (source, target)]
        if points is not None:
            for side, side_points, size in zip(("source", "target"), points, sizes, strict=True):
                problem = point_problem(side_points, size, self.what)
                if problem is not None:
                    raise row_error(self.path, line, f"the {side}'s {problem}")
            self.points.append(points)
        for relative in (source, target):
            if relative not in self.rows:
                self.rows[relative] = len(self.images)
                self.images.append(relative)
        self.pairs.append(([self.rows[source], self.rows[target]], category_id, flip))

    def build(self, kind: str | None = None) -> PairList:
        """The :class:`PairList`; ``kind``: ``"keypoints"`` (NaN entries are invalid slots),
        ``"polygons"`` or None (no per-pair points). Raises :class:`DataError` when no pair was
        added (every row was skipped as bad)."""
        if not self.pairs:
            raise DataError(f"{self.path}: no usable pair is left (every row was skipped as bad)")
        names = []
        for number, ((source, target), category, _) in enumerate(self.pairs, start=1):
            stems = (Path(self.images[source]).stem, Path(self.images[target]).stem)
            names.append(f"{number:06d}-{stems[0]}-{stems[1]}:{self.categories[category]}")
        extra: dict[str, Any] = {}
        if kind == "keypoints":
            kps = _pad(self.points, float("nan"))
            valid = np.isfinite(kps).all(axis=(1, 3))
            extra = {"kps": np.nan_to_num(kps, nan=0.0), "kps_valid": valid}
        elif kind == "polygons":
            extra = {"polygons": _pad(self.points, float("nan"))}
        return PairList(
            path=self.path,
            names=names,
            images=list(self.images),
            image_ids=np.array([pair[0] for pair in self.pairs], dtype=np.int64).reshape(-1, 2),
            category_ids=np.array([pair[1] for pair in self.pairs], dtype=np.int64),
            flips=np.array([pair[2] for pair in self.pairs], dtype=bool),
            sources=tuple(dict.fromkeys(self.sources)),
            **extra,
        )


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``H x W x 3`` uint8 -> ``3 x H x W`` float, ImageNet-normalised."""
    return normalise(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255)


def original_sizes(pairs: PairList, cache: ImageCache, index: int) -> torch.Tensor:
    """``2 x 2`` int64: (H, W) of the original source and target images of pair ``index``."""
    return torch.from_numpy(cache.original_sizes[pairs.image_ids[index]])


def pair_meta(
    pairs: PairList, index: int, rows: Sequence[int], sizes: torch.Tensor, **extra: Any
) -> dict[str, Any]:
    """The ``meta`` every benchmark item carries: name, source and target files (image rows
    ``rows``, in serving order), category id and original sizes ``sizes`` (``2 x 2`` (H, W)),
    plus the benchmark's ``extra`` fields. ``pairs``: a :class:`PairList` or any pairs with
    ``names``, ``images`` and ``category_ids`` (:class:`~data_modules.spair.SPairSplit`)."""
    return {
        "pair_name": pairs.names[index],
        "source_file": pairs.images[rows[0]],
        "target_file": pairs.images[rows[1]],
        "category_id": int(pairs.category_ids[index]),
        "source_size": sizes[0],
        "target_size": sizes[1],
        **extra,
    }


class KeypointPairsDataset(Dataset):
    """Pairs with keypoints for PCK (PF-PASCAL val/test, PF-WILLOW); items follow the batch
    schema, with ``meta``: ``pair_name``, ``source_file``, ``target_file``, ``category_id``,
    ``source_size``, ``target_size`` (``2`` (H, W)), ``source_kps``, ``target_kps`` (``K x 2``
    original pixels, after the pair's flip, zero-padded), ``flip`` (bool). The PCK bound is the
    evaluator's alone (:func:`~guided_flow.evaluation.keypoints.pck_bound`)."""

    def __init__(self, pairs: PairList, cache: ImageCache, categories: Sequence[str]) -> None:
        if pairs.kps is None or pairs.kps_valid is None:
            raise ValueError(f"{pairs.path}: the pairs have no keypoints")
        self.pairs, self.cache, self.categories = pairs, cache, categories

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        p = self.pairs
        flip = bool(p.flips[index])
        sizes = original_sizes(p, self.cache, index)
        valid = torch.from_numpy(p.kps_valid[index])
        kps = p.kps[index].astype(np.float64)  # 2 x K x 2 original pixels
        images = []
        for side in range(2):
            image = cached_image(self.cache, int(p.image_ids[index, side]))[0]
            if flip:
                image = flip_view(View(image)).image
                kps[side] = hflip_points(kps[side], int(sizes[side, 1]))
            images.append(image)
        kps = torch.from_numpy(kps) * valid[None, :, None]
        scale = resize_scale(sizes, images[0].shape[:2]).unsqueeze(1)  # 2 x 1 x (x, y)
        kps_input = (rescale_points(kps, scale) * valid[None, :, None]).float()
        return {
            "source_image": to_tensor(images[0]),
            "target_image": to_tensor(images[1]),
            "source_kps": kps_input[0],
            "target_kps": kps_input[1],
            "kps_valid": valid,
            "category": self.categories[p.category_ids[index]],
            "index": index,
            "meta": pair_meta(
                p,
                index,
                p.image_ids[index],
                sizes,
                source_kps=kps[0].float(),
                target_kps=kps[1].float(),
                flip=flip,
            ),
        }
