"""SPair-71k (Min et al. 2019) as a test benchmark.

Layout under ``root`` (the unpacked ``SPair-71k`` folder)::

    Layout/large/{trn,val,test}.txt         one pair name per line
    PairAnnotation/<split>/<name>.json      keypoints, boxes, sizes, difficulty flags
    JPEGImages/<category>/<image>.jpg
    Segmentation/<category>/<image>.png     optional; non-zero pixels are foreground

Every annotation of the split is validated once per data module, in
:meth:`SPairDataModule.prepare_data` or :meth:`SPairDataModule.setup` (:func:`read_split`: a
missing key, a keypoint count mismatch, a keypoint that is not finite or lies more than 1 px
outside its image, a missing, unreadable or truncated image, or one whose size disagrees with the
annotation raises :class:`~guided_flow.errors.DataError` naming the file; with ``skip_bad`` the
pair is dropped with a warning and counted in ``skipped_pairs`` instead). The split's images (and
masks when the ``Segmentation`` folder exists) are resized once into an HDF5 cache
(:mod:`data_modules.cache`); the pair annotations are read from the JSON files, whose fingerprint
the cache carries.

Batches follow the project's schema (DESIGN.md); ``meta`` holds the original-pixel annotations
that :mod:`guided_flow.evaluation.keypoints` scores against:

- ``pair_name``, ``source_file``, ``target_file``: str (files relative to ``JPEGImages``);
- ``category_id``: int64, the index in :data:`CATEGORIES`;
- ``source_size``, ``target_size``: ``2`` int64, (H, W) of the original images;
- ``source_kps``, ``target_kps``: ``K x 2`` float32 (x, y) original pixels, zero-padded to the
  split's largest keypoint count (``kps_valid`` marks the real ones, annotation order kept);
- ``source_bbox``, ``target_bbox``: ``4`` float32 (x1, y1, x2, y2) original pixels;
- ``difficulty``: ``4`` int64, the flags of :data:`DIFFICULTY_NAMES`.

The PCK bound (``pck_bound = "trg_bbox"``: L = max(w, h) of the target box) is computed by the
evaluator alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from data_modules.bad_pairs import BadPairPolicy, ImageSizes, point_problem
from data_modules.cache import ImageCache
from data_modules.pairs import download_hint, pair_meta, to_tensor
from data_modules.pairs_module import PairsDataModule
from guided_flow.errors import DataError
from guided_flow.io.images import load_image
from guided_flow.model.geometry import rescale_points, resize_scale

CATEGORIES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "train", "tvmonitor",
)  # fmt: skip
DIFFICULTY_NAMES = ("viewpoint_variation", "scale_variation", "truncation", "occlusion")
SPLITS = ("trn", "val", "test")
REQUIRED_KEYS = (
    "src_imname", "trg_imname", "src_imsize", "trg_imsize", "src_bndbox", "trg_bndbox",
    "category", "src_kps", "trg_kps", *DIFFICULTY_NAMES,
)  # fmt: skip


@dataclass(frozen=True)
class SPairSplit:
    """The validated annotations of one split (``N`` pairs, ``I`` distinct images, ``K`` the
    largest keypoint count).

    ``path``: the split's layout file; ``images``: ``I`` paths relative to ``JPEGImages``
    (``<category>/<file>``) with their ``image_sizes`` (``I x 2`` (H, W)); per pair: ``names``,
    ``category_ids`` (``N``), ``image_ids`` (``N x 2``, source and target rows of ``images``),
    ``kps`` (``N x 2 x K x 2`` float32, source then target, zero-padded), ``kps_count`` (``N``),
    ``boxes`` (``N x 2 x 4`` float32), ``difficulty`` (``N x 4`` int64); ``sources``: the ``N``
    annotation files, relative to the root."""

    path: Path
    names: list[str]
    images: list[str]
    image_sizes: np.ndarray
    category_ids: np.ndarray
    image_ids: np.ndarray
    kps: np.ndarray
    kps_count: np.ndarray
    boxes: np.ndarray
    difficulty: np.ndarray
    sources: tuple[str, ...]


def _number_array(path: Path, record: Mapping, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """``record[key]`` as a float64 array of ``shape`` (``-1`` matches any length)."""
    try:
        array = np.asarray(record[key], dtype=np.float64)
    except (TypeError, ValueError, OverflowError) as error:
        raise DataError(f"{path}: '{key}' is not numeric ({error})") from error
    if array.ndim != len(shape) or any(
        s not in (-1, a) for s, a in zip(shape, array.shape, strict=True)
    ):
        raise DataError(f"{path}: '{key}' has shape {array.shape}, expected {shape}")
    if not np.isfinite(array).all():
        raise DataError(f"{path}: '{key}' has non-finite values")
    return array


def _image_size(path: Path, record: Mapping, key: str) -> tuple[int, int]:
    """``record[key]`` (SPair's ``[W, H, C]``) as (H, W)."""
    size = _number_array(path, record, key, (-1,))
    if size.size < 2 or (size[:2] < 1).any() or (size[:2] != size[:2].round()).any():
        raise DataError(f"{path}: '{key}' must start with a positive integer width and height")
    return int(size[1]), int(size[0])


class _Pair(NamedTuple):
    """One validated annotation: its category, its (source, target) images (relative to
    ``JPEGImages``) and their ``(H, W)``, keypoints (two ``K x 2``), boxes (two ``4``) and
    difficulty flags."""

    category_id: int
    images: tuple[str, str]
    sizes: tuple[tuple[int, int], tuple[int, int]]
    kps: list[np.ndarray]
    boxes: list[np.ndarray]
    flags: list[int]


def _flag(path: Path, record: Mapping, key: str) -> int:
    """``record[key]``, a difficulty flag: a non-negative integer."""
    value = float(_number_array(path, record, key, ()))
    if value != round(value) or not 0 <= value < 2**31:
        raise DataError(f"{path}: '{key}' must be a non-negative integer, got {value:g}")
    return int(value)


def _read_pair(root: Path, path: Path, with_masks: bool, sizes: ImageSizes) -> _Pair:
    """Read and validate the annotation ``path``: keys, shapes, matching keypoint counts, a known
    category, boxes of positive size, flags, keypoints inside their images, and images (and
    masks when ``with_masks``) that exist, decode and have the annotated sizes. Raises
    :class:`DataError` naming the file."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        raise DataError(f"{path}: cannot read the annotation ({error})") from error
    if not isinstance(record, dict):
        raise DataError(f"{path}: not a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)}")
    category = record["category"]
    if category not in CATEGORIES:
        raise DataError(f"{path}: unknown category {category!r}")
    kps = [_number_array(path, record, key, (-1, 2)) for key in ("src_kps", "trg_kps")]
    if len(kps[0]) != len(kps[1]):
        raise DataError(
            f"{path}: keypoint count mismatch: src_kps has {len(kps[0])}, trg_kps has {len(kps[1])}"
        )
    if len(kps[0]) == 0:
        raise DataError(f"{path}: no keypoints")
    boxes = [_number_array(path, record, key, (4,)) for key in ("src_bndbox", "trg_bndbox")]
    for key, box in zip(("src_bndbox", "trg_bndbox"), boxes, strict=True):
        if not (box[0] < box[2] and box[1] < box[3]):
            raise DataError(f"{path}: '{key}' {box.tolist()} is not a box (x1 < x2, y1 < y2)")
    flags = [_flag(path, record, key) for key in DIFFICULTY_NAMES]
    images, image_sizes = [], []
    for side, points in zip(("src", "trg"), kps, strict=True):
        name = record[f"{side}_imname"]
        if not isinstance(name, str) or not name:
            raise DataError(f"{path}: '{side}_imname' is not a file name")
        relative = f"{category}/{name}"
        size = _image_size(path, record, f"{side}_imsize")
        image_path = root / "JPEGImages" / relative
        try:
            found = sizes(image_path)
        except DataError as error:
            raise DataError(f"{path}: {error}") from error
        if found != size:
            raise DataError(
                f"{path}: image {image_path} is {found[1]} x {found[0]} pixels but "
                f"'{side}_imsize' says {size[1]} x {size[0]}"
            )
        mask_path = _mask_path(root, relative)
        if with_masks and not mask_path.is_file():
            raise DataError(
                f"{path}: mask {mask_path} does not exist (pass masks=False to ignore "
                "the Segmentation folder)"
            )
        problem = point_problem(points, size)
        if problem is not None:
            raise DataError(f"{path}: {side}_kps: {problem}")
        images.append(relative)
        image_sizes.append(size)
    return _Pair(CATEGORIES.index(category), tuple(images), tuple(image_sizes), kps, boxes, flags)


def read_split(
    root: Path, split: str, with_masks: bool, policy: BadPairPolicy | None = None
) -> SPairSplit:
    """Read and validate every annotation of ``split`` (:func:`_read_pair`, each image decoded
    once). Raises :class:`DataError` naming the offending file; ``policy`` (default: raise)
    decides what a bad pair does."""
    policy = policy or BadPairPolicy()
    layout = root / "Layout" / "large" / f"{split}.txt"
    if not layout.is_file():
        raise DataError(
            f"{root}: SPair-71k not found ({layout} is missing). Download it with "
            f"{download_hint(SPairDataModule.benchmark, root)}"
        )
    try:
        lines = layout.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{layout}: cannot read the pair list ({error})") from error
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise DataError(f"{layout}: lists no pairs")
    sizes = ImageSizes()
    kept: list[str] = []
    pairs: list[_Pair] = []
    for name in names:
        annotation = root / "PairAnnotation" / split / f"{name}.json"
        with policy.guard():
            pairs.append(_read_pair(root, annotation, with_masks, sizes))
            kept.append(name)
    if not pairs:
        raise DataError(f"{layout}: no usable pair is left (every pair was skipped as bad)")
    image_rows: dict[str, int] = {}
    image_sizes: list[tuple[int, int]] = []
    for pair in pairs:
        for relative, size in zip(pair.images, pair.sizes, strict=True):
            if relative not in image_rows:
                image_rows[relative] = len(image_rows)
                image_sizes.append(size)
    most = max(len(pair.kps[0]) for pair in pairs)
    kps = np.zeros((len(pairs), 2, most, 2), dtype=np.float32)
    for row, pair in enumerate(pairs):
        kps[row, :, : len(pair.kps[0])] = pair.kps
    return SPairSplit(
        path=layout,
        names=kept,
        images=list(image_rows),
        image_sizes=np.asarray(image_sizes, dtype=np.int64),
        category_ids=np.asarray([pair.category_id for pair in pairs], dtype=np.int64),
        image_ids=np.asarray(
            [[image_rows[relative] for relative in pair.images] for pair in pairs], dtype=np.int64
        ),
        kps=kps,
        kps_count=np.asarray([len(pair.kps[0]) for pair in pairs], dtype=np.int64),
        boxes=np.asarray([pair.boxes for pair in pairs], dtype=np.float32),
        difficulty=np.asarray([pair.flags for pair in pairs], dtype=np.int64),
        sources=tuple(f"PairAnnotation/{split}/{name}.json" for name in kept),
    )


def _mask_path(root: Path, relative: str) -> Path:
    """The ``Segmentation`` mask of the image ``<category>/<file>.jpg``."""
    return (root / "Segmentation" / relative).with_suffix(".png")


class SPairDataset(Dataset):
    """The pairs of one split, read from its image cache (or any sequence of such items: ``image``
    ``H x W x 3`` uint8 and, with masks, ``mask`` ``H x W``, non-zero foreground); items follow
    the batch schema (module docstring)."""

    def __init__(self, annotations: SPairSplit, cache: ImageCache) -> None:
        self.annotations = annotations
        self.cache = cache

    def __len__(self) -> int:
        return len(self.annotations.names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        a = self.annotations
        rows = a.image_ids[index]
        source, target = (self.cache[int(row)] for row in rows)
        sizes = torch.from_numpy(a.image_sizes[rows])  # 2 x (H, W)
        kps = torch.from_numpy(a.kps[index])  # 2 x K x 2 original pixels
        scale = resize_scale(sizes, source["image"].shape[:2]).unsqueeze(1)  # 2 x 1 x (x, y)
        valid = torch.arange(kps.shape[1]) < int(a.kps_count[index])
        kps_input = (rescale_points(kps.double(), scale) * valid.unsqueeze(-1)).float()
        boxes = torch.from_numpy(a.boxes[index])
        item = {
            "source_image": to_tensor(source["image"]),
            "target_image": to_tensor(target["image"]),
            "source_kps": kps_input[0],
            "target_kps": kps_input[1],
            "kps_valid": valid,
            "category": CATEGORIES[a.category_ids[index]],
            "index": index,
            "meta": pair_meta(
                a,
                index,
                rows,
                sizes,
                source_kps=kps[0],
                target_kps=kps[1],
                source_bbox=boxes[0],
                target_bbox=boxes[1],
                difficulty=torch.from_numpy(a.difficulty[index]),
            ),
        }
        if "mask" in source:
            item["source_mask"], item["target_mask"] = (
                torch.from_numpy(side["mask"] > 0)[None].float() for side in (source, target)
            )
        return item


class SPairDataModule(PairsDataModule):
    """SPair-71k test pairs (see the module docstring for the layout and the batch ``meta``).

    Args:
        root, image_size, batch_size, num_workers, cache_dir: see
            :class:`~data_modules.pairs_module.PairsDataModule`.
        split: ``trn``, ``val`` or ``test``: the pairs served by the test loader.
        masks: use ``Segmentation`` masks when that folder exists.
        skip_bad: drop each bad pair (see :func:`read_split`) with a warning instead of raising
            :class:`~guided_flow.errors.DataError`; ``skipped_pairs`` counts them.
    """

    evaluation = "keypoints"
    benchmark = "spair"
    cache_name = "spair71k"
    image_folder = "JPEGImages"
    relocatable_cache = True
    categories = CATEGORIES
    difficulty_names = DIFFICULTY_NAMES
    pck_bound = "trg_bbox"
    splits = SPLITS

    def __init__(
        self,
        root: str,
        image_size: int = 320,
        batch_size: int = 8,
        num_workers: int = 0,
        cache_dir: str | None = None,
        split: str = "test",
        masks: bool = True,
        skip_bad: bool = False,
    ) -> None:
        super().__init__(root, image_size, batch_size, num_workers, cache_dir, split, skip_bad)
        self.masks = masks

    @property
    def with_masks(self) -> bool:
        """Whether masks are read (``masks`` is on and ``Segmentation`` exists)."""
        return self.masks and (self.root / "Segmentation").is_dir()

    def read_pairs(self, split: str) -> SPairSplit:
        if not self.root.is_dir():
            raise DataError(
                f"{self.root}: the SPair-71k folder does not exist. Download it with "
                f"{download_hint(self.benchmark, self.root)}"
            )
        return read_split(self.root, split, self.with_masks, self.policy)

    def mask_files(self, split: str) -> Callable[[str], Path | None] | None:
        if not self.with_masks:
            return None
        return lambda relative: _mask_path(self.root, relative)

    def load_mask(self, path: Path) -> np.ndarray:
        """A ``Segmentation`` PNG as ``H x W`` uint8: 255 where any channel is non-zero, else 0."""
        return (load_image(path, upright=False).max(axis=-1) > 0).astype(np.uint8) * 255

    def make_dataset(self, split: str, pairs: SPairSplit, cache: ImageCache) -> Dataset:
        return SPairDataset(pairs, cache)
