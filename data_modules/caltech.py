"""Caltech-101 (Fei-Fei et al. 2004) mask-transfer pairs as a test benchmark.

Layout under ``root`` (the list at the top or in ``image_pairs/``; image paths relative to
``root``)::

    test_pairs_caltech_with_category.csv   1,515 pairs
    101_ObjectCategories/<category>/image_<number>.jpg

The list's columns, by position: source image, target image, class (1..101 in the order of
:data:`CALTECH_CATEGORIES`, the sorted category folder names), then the source polygon's x and y
vertex lists and the target polygon's x and y lists (numbers separated by ``;`` or by ``,``
inside a quoted cell), in original pixels with pixel centres at integers. A polygon's object
mask is the set of pixels whose centre lies inside it
(:func:`~guided_flow.model.geometry.rasterise_polygon`).

Items: ``source_image``, ``target_image`` (``3 x H x W`` normalised), ``source_mask``,
``target_mask`` (``1 x H x W`` float in {0, 1}: the polygon rasterised on the input grid),
``category``, ``index`` and ``meta``: ``pair_name``, ``source_file``, ``target_file``,
``category_id``, ``source_size``, ``target_size`` (``2`` (H, W)) and ``source_polygon``,
``target_polygon`` (``P x 2`` float32 (x, y) original pixels, NaN-padded), which
:class:`~guided_flow.evaluation.masks.MaskTransferEvaluator` scores (LT-ACC, IoU, LOC-ERR) at the
original resolution. Bad rows (malformed, a missing or truncated image, a vertex that is not finite
or lies more than 1 px outside its original image: :mod:`data_modules.bad_pairs`) raise
:class:`~guided_flow.errors.DataError` naming the file and line, or with ``skip_bad`` are dropped
with a warning and counted in ``skipped_pairs``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from data_modules.bad_pairs import BadPairPolicy
from data_modules.cache import ImageCache, cached_image
from data_modules.pairs import (
    PairList,
    PairListBuilder,
    find_pair_list,
    original_sizes,
    pair_meta,
    paired_points,
    parse_class,
    parse_numbers,
    read_rows,
    row_error,
    to_tensor,
)
from data_modules.pairs_module import PairsDataModule
from guided_flow.model.geometry import rasterise_polygon, rescale_points, resize_scale

CALTECH_CATEGORIES = (
    "Faces", "Faces_easy", "Leopards", "Motorbikes", "accordion", "airplanes", "anchor", "ant",
    "barrel", "bass", "beaver", "binocular", "bonsai", "brain", "brontosaurus", "buddha",
    "butterfly", "camera", "cannon", "car_side", "ceiling_fan", "cellphone", "chair", "chandelier",
    "cougar_body", "cougar_face", "crab", "crayfish", "crocodile", "crocodile_head", "cup",
    "dalmatian", "dollar_bill", "dolphin", "dragonfly", "electric_guitar", "elephant", "emu",
    "euphonium", "ewer", "ferry", "flamingo", "flamingo_head", "garfield", "gerenuk", "gramophone",
    "grand_piano", "hawksbill", "headphone", "hedgehog", "helicopter", "ibis", "inline_skate",
    "joshua_tree", "kangaroo", "ketch", "lamp", "laptop", "llama", "lobster", "lotus", "mandolin",
    "mayfly", "menorah", "metronome", "minaret", "nautilus", "octopus", "okapi", "pagoda", "panda",
    "pigeon", "pizza", "platypus", "pyramid", "revolver", "rhino", "rooster", "saxophone",
    "schooner", "scissors", "scorpion", "sea_horse", "snoopy", "soccer_ball", "stapler",
    "starfish", "stegosaurus", "stop_sign", "strawberry", "sunflower", "tick", "trilobite",
    "umbrella", "watch", "water_lilly", "wheelchair", "wild_cat", "windsor_chair", "wrench",
    "yin_yang",
)  # fmt: skip
COLUMNS = ("source_image", "target_image", "class", "XA", "YA", "XB", "YB")


def _polygon(path: Path, line: int, row: list[str], first: int) -> np.ndarray:
    """The polygon in columns ``first`` (x) and ``first + 1`` (y): ``P x 2``, at least three
    vertices and a non-zero area."""
    xs, ys = (
        (COLUMNS[c], parse_numbers(path, line, COLUMNS[c], row[c])) for c in (first, first + 1)
    )
    vertices = paired_points(path, line, xs, ys, what="vertex")
    if len(vertices) < 3 or not np.isfinite(vertices).all():
        raise row_error(path, line, f"{xs[0]}/{ys[0]}: a polygon needs 3 or more finite vertices")
    x, y = vertices.T
    if np.dot(x, np.roll(y, -1)) == np.dot(y, np.roll(x, -1)):  # twice the area (shoelace)
        raise row_error(path, line, f"{xs[0]}/{ys[0]}: the polygon has no area")
    return vertices


def read_caltech_pairs(root: Path, path: Path, policy: BadPairPolicy | None = None) -> PairList:
    """Read and validate the Caltech-101 list ``path``; errors name the file and line.
    ``policy`` (default: raise) decides what a bad row does."""
    policy = policy or BadPairPolicy()
    _, rows = read_rows(path)
    builder = PairListBuilder(root, path, CALTECH_CATEGORIES, what="vertex")
    for line, row in rows:
        with policy.guard():
            if len(row) != len(COLUMNS):
                raise row_error(
                    path, line, f"{len(row)} columns, expected {len(COLUMNS)} ({','.join(COLUMNS)})"
                )
            category = parse_class(path, line, row[2], len(CALTECH_CATEGORIES))
            source, target = _polygon(path, line, row, 3), _polygon(path, line, row, 5)
            points = np.full((2, max(len(source), len(target)), 2), np.nan)
            points[0, : len(source)], points[1, : len(target)] = source, target
            builder.add(line, row[0], row[1], category, points=points)
    return builder.build("polygons")


class CaltechDataset(Dataset):
    """The mask-transfer pairs (see the module docstring for the items)."""

    def __init__(self, pairs: PairList, cache: ImageCache) -> None:
        if pairs.polygons is None:
            raise ValueError(f"{pairs.path}: the pairs have no polygons")
        self.pairs, self.cache = pairs, cache

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        p = self.pairs
        rows = p.image_ids[index]
        images = [cached_image(self.cache, int(row))[0] for row in rows]
        input_size = images[0].shape[:2]
        sizes = original_sizes(p, self.cache, index)
        scale = resize_scale(sizes, input_size).numpy()  # 2 x (x, y)
        polygons = p.polygons[index]  # 2 x P x 2 original pixels
        masks = [
            torch.from_numpy(
                rasterise_polygon(rescale_points(polygons[side], scale[side]), input_size)
            )[None].float()
            for side in range(2)
        ]
        return {
            "source_image": to_tensor(images[0]),
            "target_image": to_tensor(images[1]),
            "source_mask": masks[0],
            "target_mask": masks[1],
            "category": CALTECH_CATEGORIES[p.category_ids[index]],
            "index": index,
            "meta": pair_meta(
                p,
                index,
                rows,
                sizes,
                source_polygon=torch.from_numpy(polygons[0]),
                target_polygon=torch.from_numpy(polygons[1]),
            ),
        }


class CaltechDataModule(PairsDataModule):
    """Caltech-101 mask-transfer test pairs (see the module docstring); the arguments are those
    of :class:`~data_modules.pairs_module.PairsDataModule` (only ``split="test"``;
    ``skip_bad`` drops bad rows with a warning and counts them in ``skipped_pairs``)."""

    evaluation = "mask_transfer"
    benchmark = "caltech"
    categories = CALTECH_CATEGORIES

    def list_names(self, split: str) -> tuple[str, ...]:
        return ("test_pairs_caltech_with_category.csv",)

    def read_pairs(self, split: str) -> PairList:
        return read_caltech_pairs(
            self.root,
            find_pair_list(self.root, self.list_names(split), self.benchmark),
            self.policy,
        )

    def make_dataset(self, split: str, pairs: PairList, cache: ImageCache) -> Dataset:
        return CaltechDataset(pairs, cache)
