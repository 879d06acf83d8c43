"""PASCAL VOC 2012 segmentation masks as the foreground of PF-PASCAL's training pairs: where an
image's mask is (:func:`voc_mask_file`), its label map (:func:`voc_label_map`) and the augmented
training pairs masked by it (:class:`MaskedPairsDataset`).

A label map is ``SegmentationClass`` as it is (0 background, 1..20 the VOC classes, 255 void) or,
for an image with only ``SegmentationObject``, :data:`ANY_OBJECT` on every object. A pair's
foreground is its class or :data:`ANY_OBJECT`; void pixels are background.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from data_modules.augment import PairAugmenter, View
from data_modules.cache import ImageCache, cached_image
from data_modules.pairs import PairList, original_sizes, pair_meta, to_tensor
from guided_flow.errors import DataError

ANY_OBJECT = 254
"""Label of the cached VOC label maps for "an object of any class" (``SegmentationObject``)."""
VOC_VOID = 255
VOC_MASK_FOLDERS = ("SegmentationClass", "SegmentationObject")


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
    are (0 background, 1..20 :data:`~data_modules.pf_pascal.VOC_CATEGORIES`, 255 void);
    ``SegmentationObject`` objects become :data:`ANY_OBJECT`, the rest 0."""
    labels = _read_label_png(path)
    if path.parent.name == "SegmentationObject":
        labels = np.where((labels > 0) & (labels < VOC_VOID), ANY_OBJECT, 0).astype(np.uint8)
    return labels


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
