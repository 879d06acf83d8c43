"""PF-PASCAL (Ham et al. 2018): stage-2 training pairs with VOC masks and keypoint evaluation,
plus the csv pair-list machinery that PF-WILLOW and Caltech-101 share.

Layout under ``root`` (each list at the top or in ``image_pairs/``, as in the public releases;
the lists' image paths are relative to ``root``)::

    test_pairs.csv    source_image,target_image,class,XA,YA,XB,YB   (299 pairs)
    val_pairs.csv     source_image,target_image,class,flip   (or the test list's columns)
    train_pairs.csv   source_image,target_image,class,flip
    PF-dataset-PASCAL/JPEGImages/<image>.jpg
    PF-dataset-PASCAL/Annotations/<class>/<image>.mat   keypoints of lists without XA..YB
    VOCdevkit/VOC2012/SegmentationClass/<image>.png     training masks (or SegmentationObject)

``test_pairs_pf_pascal.csv`` and ``val_pairs_pf_pascal.csv`` (the names of another public
release) are accepted too. Coordinates are ``;``-separated lists (x in XA/XB, y in YA/YB) in the
original image's pixels; ``class`` is 1..20 in the PASCAL VOC order (:data:`VOC_CATEGORIES`);
``flip`` = 1 mirrors both images of the pair (and their keypoints and masks). A list without
keypoint columns takes each pair's keypoints from the images' PF-PASCAL annotation files
(``kps``, ``K x 2``, NaN rows for invisible points): the slots visible in both images.

Training masks come from PASCAL VOC 2012 where the image has one: the pixels of the pair's class
in ``SegmentationClass`` or, without it, every object of ``SegmentationObject`` (void pixels are
background). Pairs whose image has no mask are kept; that image's mask is all foreground (which
leaves the masked losses unrestricted) and ``meta["source_has_mask"]`` /
``meta["target_has_mask"]`` flag it. The PCK bound is max(H, W) of the target image. The train
and test lists share pairs (95 in the public release): :meth:`PFPascalDataModule.setup` reports
how many.

Every bad row (wrong column count, keypoint count mismatch, unknown class, a missing, unreadable
or truncated image, a keypoint that is not finite or lies more than 1 px outside its original
image: :mod:`data_modules.bad_pairs`) raises :class:`~guided_flow.errors.DataError` naming the
file and line, before any model work; with ``skip_bad`` the pair is dropped with a warning and
counted instead (``skipped_pairs``, which ``test`` writes into ``run.json``).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import scipy.io
import torch
from PIL import Image
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from data_modules.augment import AugmentConfig, PairAugmenter, View, flip_view, hflip_points
from data_modules.bad_pairs import BadPairPolicy, ImageSizes, SkippedPairsReport, point_problem
from data_modules.cache import CacheItem, ImageCache, ensure_cache, fingerprint
from data_modules.sampling import EpochShuffleSampler
from guided_flow.errors import ConfigError, DataError
from guided_flow.io.images import load_image, normalise, resize_image
from guided_flow.model.geometry import rescale_points, resize_scale

VOC_CATEGORIES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip
PAIR_LIST_FOLDERS = ("", "image_pairs")
KEYPOINT_ALPHAS = (0.05, 0.1, 0.15)
ANY_OBJECT = 254
"""Label of the cached VOC label maps for "an object of any class" (``SegmentationObject``)."""
VOC_VOID = 255
VOC_MASK_FOLDERS = ("SegmentationClass", "SegmentationObject")
CACHE_VERSION = 1
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",)}


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


def cached_image(cache: ImageCache, row: int) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """Image ``row`` of ``cache``: ``H x W x 3`` uint8, its label map ``H x W`` uint8 (None when
    the cache has no masks) and whether the image has a mask."""
    item = cache[row]
    has_mask = bool(item["has_mask"]) if "has_mask" in item else item.get("mask") is not None
    return item["image"], item.get("mask"), has_mask


def masked_cache_item(
    root: Path,
    relative: str,
    image: np.ndarray,
    size: tuple[int, int],
    labels: np.ndarray | None,
    mask_path: Path | None,
) -> CacheItem:
    """The cache item of image ``root / relative`` (``H x W x 3`` uint8) resized to ``size``,
    with its label map ``labels`` (``H x W`` uint8, resized nearest; None: the split has no
    masks) and ``has_mask`` (whether it came from ``mask_path``, a file). A map of another size
    than its image raises DataError naming both files."""
    mask, extra = None, {}
    if labels is not None:
        if labels.shape != image.shape[:2]:
            raise DataError(
                f"{mask_path}: mask size {labels.shape[::-1]} differs from its image "
                f"{root / relative} ({image.shape[1]} x {image.shape[0]})"
            )
        mask = resize_image(labels, size, interpolation="nearest")
        extra = {"has_mask": np.array(mask_path is not None, dtype=np.uint8)}
    return CacheItem(
        name=relative,
        image=resize_image(image, size),
        original_size=(image.shape[0], image.shape[1]),
        mask=mask,
        extra=extra,
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
    """The ``meta`` every pair-list item carries: name, source and target files (image rows
    ``rows``, in serving order), category id and original sizes ``sizes`` (``2 x 2`` (H, W)),
    plus the benchmark's ``extra`` fields."""
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


class MaskedPairsDataset(Dataset):
    """Training pairs (PF-PASCAL ``train_pairs.csv``) with foreground masks and CPU-side
    augmentation (:mod:`data_modules.augment`).

    Items: ``source_image``, ``target_image`` (``3 x H x W`` normalised), ``source_mask``,
    ``target_mask`` (``1 x H x W`` float in {0, 1}; only with masks), ``category``, ``index`` and
    ``meta``: ``pair_name``, ``source_file``, ``target_file``, ``category_id``, ``source_size``,
    ``target_size`` (after the swap), ``flip``, ``swap`` (what the augmentation did),
    ``source_has_mask``, ``target_has_mask`` (bool). Random draws come from torch's generator
    (seeded by ``seed_everything`` in the main process and per worker), so runs repeat.
    """

    def __init__(
        self,
        pairs: PairList,
        cache: ImageCache,
        categories: Sequence[str],
        augmenter: PairAugmenter,
        with_masks: bool,
    ) -> None:
        self.pairs, self.cache, self.categories = pairs, cache, categories
        self.augmenter, self.with_masks = augmenter, with_masks

    def __len__(self) -> int:
        return len(self.pairs)

    def _view(self, row: int, label: int) -> tuple[View, bool]:
        """Image ``row`` with its foreground mask for class ``label`` (1-based VOC index)."""
        image, labels, has_mask = cached_image(self.cache, row)
        if not self.with_masks:
            return View(image), False
        if not has_mask:
            return View(image, np.ones(image.shape[:2], dtype=np.uint8)), False
        foreground = (labels == label) | (labels == ANY_OBJECT)
        return View(image, foreground.astype(np.uint8)), True

    def __getitem__(self, index: int) -> dict[str, Any]:
        p = self.pairs
        rng = np.random.default_rng(int(torch.randint(2**62, ())))
        label = int(p.category_ids[index]) + 1
        rows = [int(row) for row in p.image_ids[index]]
        (source, source_has), (target, target_has) = (self._view(row, label) for row in rows)
        sizes = original_sizes(p, self.cache, index)
        source, target, applied = self.augmenter(source, target, bool(p.flips[index]), rng)
        if applied.swapped:
            rows, sizes = rows[::-1], sizes.flip(0)
            source_has, target_has = target_has, source_has
        item = {
            "source_image": to_tensor(source.image),
            "target_image": to_tensor(target.image),
            "category": self.categories[p.category_ids[index]],
            "index": index,
            "meta": pair_meta(
                p,
                index,
                rows,
                sizes,
                flip=applied.flipped,
                swap=applied.swapped,
                source_has_mask=source_has,
                target_has_mask=target_has,
            ),
        }
        if self.with_masks:
            item["source_mask"] = torch.from_numpy(source.mask.copy())[None].float()
            item["target_mask"] = torch.from_numpy(target.mask.copy())[None].float()
        return item


class PairsDataModule(SkippedPairsReport, pl.LightningDataModule):
    """A benchmark given by csv pair lists and images under one root, cached per split in HDF5
    (:mod:`data_modules.cache`). Subclasses say which splits exist (:attr:`splits`), read and
    validate a split's list (:meth:`read_pairs`, through :attr:`policy`) and build its dataset
    (:meth:`make_dataset`). Each split is validated once per data module, in
    :meth:`prepare_data` or :meth:`setup`, whichever comes first in the process.

    Args:
        root: the benchmark's folder.
        image_size: side of the square network input, pixels.
        batch_size: pairs per batch.
        num_workers: DataLoader workers.
        cache_dir: where the HDF5 image caches go (default ``<root>/cache``).
        split: the split served by the test loader.
        skip_bad: drop each bad pair (:mod:`data_modules.bad_pairs`) with a warning instead of
            raising :class:`~guided_flow.errors.DataError`; ``skipped_pairs`` counts them.
    """

    benchmark = ""
    categories: tuple[str, ...] = ()
    pck_bound: str | None = None
    splits: tuple[str, ...] = ("test",)

    def __init__(
        self,
        root: str,
        image_size: int = 320,
        batch_size: int = 8,
        num_workers: int = 0,
        cache_dir: str | None = None,
        split: str = "test",
        skip_bad: bool = False,
    ) -> None:
        super().__init__()
        if split not in self.splits:
            raise ConfigError(f"--data.split {split!r} is not one of: {', '.join(self.splits)}")
        if image_size < 16:
            raise ConfigError(f"--data.image_size must be at least 16 pixels, got {image_size}")
        if batch_size < 1 or num_workers < 0:
            raise ConfigError(
                f"--data.batch_size must be >= 1 and --data.num_workers >= 0, got {batch_size} "
                f"and {num_workers}"
            )
        self.root = Path(root)
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.root / "cache"
        self.split = split
        self.policy = BadPairPolicy(skip_bad)
        self.datasets: dict[str, Dataset] = {}
        self.pair_lists: dict[str, PairList] = {}
        self._specs: dict[str, tuple[PairList, Path, str]] = {}

    # --- what subclasses provide --------------------------------------------------------------
    def list_names(self, split: str) -> tuple[str, ...]:
        """File names of ``split``'s pair list, preferred first."""
        raise NotImplementedError

    def read_pairs(self, split: str) -> PairList:
        """Read and validate ``split``'s pair list, handing bad pairs to :attr:`policy`."""
        raise NotImplementedError

    def make_dataset(self, split: str, pairs: PairList, cache: ImageCache) -> Dataset:
        """The dataset of ``split``."""
        raise NotImplementedError

    def mask_files(self, split: str) -> Callable[[str], Path | None] | None:
        """For a split whose cache holds masks: a function from an image (relative path) to its
        mask file, or None where it has none. None: the split has no masks."""
        return None

    def load_mask(self, path: Path) -> np.ndarray:
        """A mask file (from :meth:`mask_files`) as an ``H x W`` uint8 label map."""
        raise NotImplementedError

    # --- splits, caches, datasets -------------------------------------------------------------
    def stage_splits(self, stage: str) -> tuple[str, ...]:
        """The splits a trainer stage needs (``fit``, ``validate``, ``test``, ``predict``)."""
        if stage in STAGE_SPLITS:
            needed = STAGE_SPLITS[stage]
            if any(split not in self.splits for split in needed):
                raise ConfigError(
                    f"{self.benchmark} is a test benchmark here: it serves `test`, not `{stage}`"
                )
            return needed
        return (self.split,)

    def _trainer_stage(self) -> str:
        """The attached trainer's stage, ``test`` without a trainer."""
        trainer = self.trainer
        return "test" if trainer is None or trainer.state.fn is None else trainer.state.fn.value

    def _cache_spec(self, split: str) -> tuple[PairList, Path, str]:
        """The validated pair list of ``split``, its cache file and the fingerprint it must
        carry (computed on the first call, so that each bad pair is reported once)."""
        if split not in self._specs:
            self._specs[split] = self._read_spec(split)
        return self._specs[split]

    def _read_spec(self, split: str) -> tuple[PairList, Path, str]:
        """:meth:`_cache_spec`, read now."""
        pairs = self.read_pairs(split)
        masks = self.mask_files(split)
        files = [pairs.path, *(self.root / name for name in (*pairs.sources, *pairs.images))]
        if masks is not None:
            files += [found for found in map(masks, pairs.images) if found is not None]
        key = fingerprint(
            files,
            dataset=self.benchmark,
            version=CACHE_VERSION,
            split=split,
            image_size=self.image_size,
            masks=masks is not None,
        )
        suffix = "-masks" if masks is not None else ""
        path = self.cache_dir / f"{self.benchmark}-{split}-{self.image_size}{suffix}.h5"
        return pairs, path, key

    def _cache_items(self, split: str, pairs: PairList) -> Iterator[CacheItem]:
        """Decode and resize every image of ``split`` (with its label map when the split has
        masks: the resized map, or zeros, and ``has_mask``)."""
        size = (self.image_size, self.image_size)
        masks = self.mask_files(split)
        for relative in pairs.images:
            image = load_image(self.root / relative)
            labels, mask_path = None, None
            if masks is not None:
                mask_path = masks(relative)
                labels = np.zeros(image.shape[:2], dtype=np.uint8)
                if mask_path is not None:
                    labels = self.load_mask(mask_path)
            yield masked_cache_item(self.root, relative, image, size, labels, mask_path)

    def prepare_data(self) -> None:
        """:meth:`prepare_stage` for the attached trainer's stage (``test`` without one)."""
        self.prepare_stage(self._trainer_stage())

    def prepare_stage(self, stage: str) -> None:
        """Validate the lists of ``stage``'s splits, then build their image caches if absent or
        stale (atomically) and check them."""
        for split in self.stage_splits(stage):
            pairs, path, key = self._cache_spec(split)
            items = lambda split=split, pairs=pairs: self._cache_items(split, pairs)
            ensure_cache(path, key, items)

    def setup(self, stage: str | None = None) -> None:
        """Validate the lists of ``stage``'s splits (default ``test``) and open the caches built
        by :meth:`prepare_data`."""
        for split in self.stage_splits(stage or "test"):
            pairs, path, key = self._cache_spec(split)
            cache = ImageCache(path, key)
            if cache.names != pairs.images:
                raise DataError(f"{path}: its images do not match {pairs.path}")
            self.pair_lists[split] = pairs
            self.datasets[split] = self.make_dataset(split, pairs, cache)

    def pair_names(self, stage: str = "test") -> list[str]:
        """Pair names indexed by the batches' ``index`` for ``stage`` (``test`` or ``validate``)."""
        split = "val" if stage in ("validate", "val") else self.split
        if split not in self.pair_lists:
            raise RuntimeError(f"call setup() for the {split} split before pair_names()")
        return self.pair_lists[split].names

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"call setup() before asking for the {split} dataloader")
        dataset = self.datasets[split]
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            # the order is a pure function of the epoch, so a resumed run repeats it
            sampler=EpochShuffleSampler(len(dataset)) if shuffle else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.split, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.split, shuffle=False)


def _read_label_png(path: Path) -> np.ndarray:
    """A palette or greyscale PNG's indices as ``H x W`` uint8."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise DataError(
                    f"{path}: expected a palette or greyscale label image, got mode {image.mode}"
                )
            return np.asarray(image, dtype=np.uint8).copy()
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot read the mask ({error})") from error


def voc_mask_file(voc: Path, stem: str) -> Path | None:
    """The VOC 2012 mask of image ``stem``: ``SegmentationClass/<stem>.png`` or, without it,
    ``SegmentationObject/<stem>.png``; None when the image has neither."""
    for folder in VOC_MASK_FOLDERS:
        path = voc / folder / f"{stem}.png"
        if path.is_file():
            return path
    return None


def voc_label_map(path: Path) -> np.ndarray:
    """A VOC 2012 mask as a label map (``H x W`` uint8): ``SegmentationClass`` indices as they
    are (0 background, 1..20 :data:`VOC_CATEGORIES`, 255 void); ``SegmentationObject`` objects
    become :data:`ANY_OBJECT`, the rest 0."""
    labels = _read_label_png(path)
    if path.parent.name == "SegmentationObject":
        labels = np.where((labels > 0) & (labels < VOC_VOID), ANY_OBJECT, 0).astype(np.uint8)
    return labels


def _annotation_keypoints(path: Path, line: int, annotation: Path) -> np.ndarray:
    """``kps`` (``K x 2``, NaN rows invisible) of a PF-PASCAL annotation file."""
    if not annotation.is_file():
        raise row_error(path, line, f"no keypoint columns and no annotation file {annotation}")
    try:
        content = scipy.io.loadmat(annotation)
    except Exception as error:  # scipy's reader fails on a corrupt file with any exception type
        raise DataError(f"{annotation}: cannot read the annotation file ({error!r})") from error
    try:
        kps = np.asarray(content["kps"], dtype=np.float64)
    except (KeyError, ValueError, TypeError, OverflowError) as error:
        raise DataError(f"{annotation}: cannot read 'kps' ({error!r})") from error
    if kps.ndim != 2 or kps.shape[1] != 2:
        raise DataError(f"{annotation}: 'kps' has shape {kps.shape}, expected K x 2")
    return kps


class PFPascalDataModule(PairsDataModule):
    """PF-PASCAL: training pairs with VOC masks (``fit``), keypoint pairs for validation and
    test (see the module docstring for the layout and the batches).

    Args:
        root, image_size, batch_size, num_workers, cache_dir: see :class:`PairsDataModule`.
        split: the list served by the test loader: ``test`` (default) or ``val``.
        masks: give training pairs their VOC 2012 masks (the VOC folder must exist).
        voc_root: the VOC 2012 folder (holding ``SegmentationClass`` and/or
            ``SegmentationObject``); default ``<root>/VOCdevkit/VOC2012`` or ``<root>/VOC2012``.
        hflip_p, swap_p, jitter_p, brightness, contrast, saturation, hue, blur_p, blur_sigma:
            training augmentation, see :class:`~data_modules.augment.AugmentConfig`.
        skip_bad: see :class:`PairsDataModule`.
    """

    benchmark = "pf-pascal"
    categories = VOC_CATEGORIES
    pck_bound = "trg_img"
    alphas = KEYPOINT_ALPHAS
    splits = ("train", "val", "test")

    def __init__(
        self,
        root: str,
        image_size: int = 320,
        batch_size: int = 8,
        num_workers: int = 0,
        cache_dir: str | None = None,
        split: str = "test",
        masks: bool = True,
        voc_root: str | None = None,
        hflip_p: float = 0.5,
        swap_p: float = 0.5,
        jitter_p: float = 0.5,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.2,
        hue: float = 0.05,
        blur_p: float = 0.1,
        blur_sigma: float = 1.0,
        skip_bad: bool = False,
    ) -> None:
        if split == "train":
            raise ConfigError("--data.split 'train' has no keypoints: choose test or val")
        super().__init__(root, image_size, batch_size, num_workers, cache_dir, split, skip_bad)
        self.masks = masks
        self.voc_root = Path(voc_root) if voc_root is not None else None
        self.augment = AugmentConfig(
            hflip_p=hflip_p,
            swap_p=swap_p,
            jitter_p=jitter_p,
            brightness=brightness,
            contrast=contrast,
            saturation=saturation,
            hue=hue,
            blur_p=blur_p,
            blur_sigma=blur_sigma,
        )
        self.train_test_overlap: dict[str, int] | None = None

    def list_names(self, split: str) -> tuple[str, ...]:
        if split == "train":
            return ("train_pairs.csv",)
        return (f"{split}_pairs.csv", f"{split}_pairs_pf_pascal.csv")

    def voc_folder(self) -> Path:
        """The VOC 2012 folder holding the masks; raises DataError when none is found."""
        candidates = (
            [self.voc_root]
            if self.voc_root is not None
            else [self.root / "VOCdevkit" / "VOC2012", self.root / "VOC2012"]
        )
        for folder in candidates:
            if any((folder / name).is_dir() for name in VOC_MASK_FOLDERS):
                return folder
        raise DataError(
            f"no PASCAL VOC 2012 masks for the training pairs: none of "
            f"{', '.join(map(str, candidates))} holds SegmentationClass or SegmentationObject. "
            f"Download them with {download_hint(self.benchmark, self.root)}, give "
            "--data.voc_root, or train without masks (--data.masks false)"
        )

    def mask_files(self, split: str) -> Callable[[str], Path | None] | None:
        if split != "train" or not self.masks:
            return None
        voc = self.voc_folder()
        return lambda relative: voc_mask_file(voc, Path(relative).stem)

    def load_mask(self, path: Path) -> np.ndarray:
        return voc_label_map(path)

    def read_pairs(self, split: str) -> PairList:
        """Read and validate ``split``'s list (keypoints for ``val`` and ``test``)."""
        path = find_pair_list(self.root, self.list_names(split), self.benchmark)
        header, rows = read_rows(path)
        if len(header) not in (4, 7):
            raise DataError(
                f"{path}, line 1: header {','.join(header)!r} has {len(header)} columns, expected "
                "source_image,target_image,class,flip or source_image,target_image,class,XA,YA,"
                "XB,YB"
            )
        needs_kps = split != "train"
        builder = PairListBuilder(self.root, path, VOC_CATEGORIES)
        for line, row in rows:
            with self.policy.guard():
                self._add_row(builder, line, row, header, needs_kps)
        return builder.build("keypoints" if needs_kps else None)

    def _add_row(
        self, builder: PairListBuilder, line: int, row: list[str], header: list[str], kps: bool
    ) -> None:
        """Check row ``line`` of a list and add its pair to ``builder`` (with keypoints from
        the row's columns or, when ``kps`` and the list has none, the annotation files)."""
        path = builder.path
        check_column_count(path, line, row, header)
        category = parse_class(path, line, row[2], len(VOC_CATEGORIES))
        flip = False
        if len(header) == 4:
            if row[3] not in ("0", "1"):
                raise row_error(path, line, f"flip {row[3]!r} is not 0 or 1")
            flip = row[3] == "1"
        points = None
        if len(header) == 7:
            numbers = [parse_numbers(path, line, header[c], row[c]) for c in range(3, 7)]
            sides = [
                paired_points(
                    path, line, (header[c], numbers[c - 3]), (header[c + 1], numbers[c - 2])
                )
                for c in (3, 5)
            ]
            points = self._pair_points(path, line, sides)
        elif kps:
            points = self._annotated_points(path, line, row[:2], category, builder)
        builder.add(line, row[0], row[1], category, flip, points)

    @staticmethod
    def _pair_points(path: Path, line: int, sides: list[np.ndarray]) -> np.ndarray:
        """``2 x K x 2`` keypoints from the source and target lists, which must agree in length,
        be finite and not be empty."""
        if len(sides[0]) != len(sides[1]):
            raise row_error(
                path,
                line,
                f"keypoint count mismatch: the source has {len(sides[0])}, the target "
                f"{len(sides[1])}",
            )
        if len(sides[0]) == 0 or not all(np.isfinite(side).all() for side in sides):
            raise row_error(path, line, "keypoints must be finite and not empty")
        return np.stack(sides)

    def _annotated_points(
        self,
        path: Path,
        line: int,
        images: list[str],
        category: int,
        builder: PairListBuilder,
    ) -> np.ndarray:
        """``2 x K x 2`` keypoints of a pair from its images' annotation files (the slots
        visible in both; the others NaN)."""
        kps = []
        for relative in images:
            image = Path(relative)
            annotation = (
                image.parent.parent / "Annotations" / VOC_CATEGORIES[category] / f"{image.stem}.mat"
            )
            kps.append(_annotation_keypoints(path, line, self.root / annotation))
            builder.sources.append(annotation.as_posix())
        if kps[0].shape != kps[1].shape:
            raise row_error(
                path,
                line,
                f"keypoint count mismatch: the annotations hold {len(kps[0])} and {len(kps[1])}",
            )
        both = np.isfinite(kps[0]).all(axis=1) & np.isfinite(kps[1]).all(axis=1)
        if not both.any():
            raise row_error(path, line, "no keypoint is visible in both images")
        points = np.stack(kps)
        points[:, ~both] = np.nan
        return points

    def make_dataset(self, split: str, pairs: PairList, cache: ImageCache) -> Dataset:
        if split == "train":
            return MaskedPairsDataset(
                pairs, cache, VOC_CATEGORIES, PairAugmenter(self.augment), self.masks
            )
        return KeypointPairsDataset(pairs, cache, VOC_CATEGORIES)

    def _pair_keys(self, split: str) -> list[tuple[str, str]] | None:
        """(source, target) of every row of ``split``'s list, or None when it is absent."""
        try:
            path = find_pair_list(self.root, self.list_names(split), self.benchmark)
        except DataError:
            return None
        return [(row[0], row[1]) for _, row in read_rows(path)[1] if len(row) >= 2]

    def setup(self, stage: str | None = None) -> None:
        """See :meth:`PairsDataModule.setup`; also reports how many test pairs the training
        list contains (in the same order, and as unordered image pairs)."""
        super().setup(stage)
        train, test = self._pair_keys("train"), self._pair_keys("test")
        if train is None or test is None:
            return
        ordered = set(train)
        unordered = {frozenset(pair) for pair in train}
        self.train_test_overlap = {
            "test_pairs": len(test),
            "ordered": sum(pair in ordered for pair in test),
            "unordered": sum(frozenset(pair) in unordered for pair in test),
        }
        overlap = self.train_test_overlap
        rank_zero_warn(
            f"PF-PASCAL: {overlap['ordered']} of the {overlap['test_pairs']} test pairs also "
            f"appear in train_pairs.csv ({overlap['unordered']} counting either order); the "
            "public lists share 95"
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)
