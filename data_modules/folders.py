"""Weak fine-tuning on folders of your own images: every ordered pair of images of one category.

Layout under ``root`` (one sub-folder per category; images found recursively inside it, any of
:data:`~data_modules.synthetic.IMAGE_SUFFIXES`, sorted by path)::

    root/car/a.jpg
    root/car/b.png
    root/car/more/c.jpg
    root/duck/x.png
    root/duck/y.png

Optional foreground masks live under ``mask_dir`` with the same relative paths and a ``.png``
suffix (``mask_dir/car/a.png`` for ``root/car/a.jpg``): greyscale, bilevel or palette PNGs the
size of their image, foreground where the value is > 0. Images and masks are read upright (their
EXIF orientation applied, as an image viewer shows them), so a mask matches its image as seen.
An image without a mask file is all foreground (which leaves the masked losses unrestricted);
``meta["source_has_mask"]`` / ``meta["target_has_mask"]`` flag it.

The training pairs are all ordered pairs ``(a, b)``, ``a != b``, of images of one category
(``n (n - 1)`` for a category of ``n`` images), categories in sorted order. A category with fewer
than two images is skipped with a warning. There is no ground truth, so the module serves only
``train_dataloader``: a fit config using it must set ``trainer.limit_val_batches: 0``.

Images (resized to ``image_size`` squared, masks with nearest-neighbour interpolation) are cached
in HDF5 (:mod:`data_modules.cache`) at ``<cache_dir>/folders-<hash of the root>-<size>px.h5``,
rebuilt when a file, the list of images or masks, or an option changes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from itertools import permutations
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from data_modules import by_category
from data_modules.augment import AugmentConfig, PairAugmenter, View
from data_modules.cache import CacheItem, ImageCache, ensure_cache, fingerprint, masked_cache_item
from data_modules.pairs import to_tensor
from data_modules.sampling import EpochShuffleSampler
from data_modules.synthetic import IMAGE_SUFFIXES
from guided_flow.errors import ConfigError, DataError
from guided_flow.io.images import load_image, upright_image

_RESIZE_RECIPE = "pil-bilinear-square+nearest-mask+exif-upright"  # part of the fingerprint
MASK_MODES = frozenset({"1", "L", "P"})


@dataclass(frozen=True)
class FolderPairs:
    """What :func:`scan_folders` found: the kept ``categories`` (sorted folder names),
    ``images`` (``I`` paths relative to ``root``, grouped by category), ``image_categories``
    (``I``, index into ``categories``) and ``image_ids`` (``N x 2`` int64 rows of ``images``: every
    ordered pair within a category)."""

    root: Path
    categories: tuple[str, ...]
    images: tuple[str, ...]
    image_categories: np.ndarray
    image_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.image_ids)


def _category_images(root: Path, folder: Path) -> list[str]:
    """The image files under ``folder`` (recursively) as sorted paths relative to ``root``."""
    return sorted(
        path.relative_to(root).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    )


def scan_folders(root: str | Path) -> FolderPairs:
    """List the categories and images under ``root`` (module docstring) and their pairs.

    Warns about (and skips) each category folder with fewer than two images. Raises
    :class:`~guided_flow.errors.DataError` naming ``root`` when it does not exist, holds no
    category folder, or no category has two images."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: the image folder does not exist")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root}: no category folders (expected <root>/<category>/<image>)")
    categories: list[str] = []
    images: list[str] = []
    image_categories: list[int] = []
    pairs: list[tuple[int, int]] = []
    for folder in folders:
        names = _category_images(root, folder)
        if len(names) < 2:
            rank_zero_warn(f"{folder}: skipped, it holds {len(names)} image(s) and pairs need 2")
            continue
        rows = range(len(images), len(images) + len(names))
        pairs.extend(permutations(rows, 2))
        image_categories.extend([len(categories)] * len(names))
        images.extend(names)
        categories.append(folder.name)
    if not categories:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DataError(
            f"{root}: no category folder holds two or more images ({suffixes}), so there is no "
            "pair to train on"
        )
    return FolderPairs(
        root=root,
        categories=tuple(categories),
        images=tuple(images),
        image_categories=np.array(image_categories, dtype=np.int64),
        image_ids=np.array(pairs, dtype=np.int64).reshape(-1, 2),
    )


def mask_file(mask_dir: Path, relative: str) -> Path:
    """Where the mask of image ``relative`` would be: ``mask_dir/<relative with .png>``."""
    return mask_dir / Path(relative).with_suffix(".png")


def read_mask(path: Path) -> np.ndarray:
    """A greyscale, bilevel or palette PNG as an ``H x W`` uint8 foreground mask (value > 0),
    upright by its EXIF orientation."""
    try:
        with Image.open(path) as image:
            if image.mode not in MASK_MODES:
                raise DataError(
                    f"{path}: expected a greyscale or palette mask, got mode {image.mode}"
                )
            return (np.asarray(upright_image(image)) > 0).astype(np.uint8)
    except (OSError, ValueError, SyntaxError) as error:
        raise DataError(f"{path}: cannot read the mask ({error})") from error


class FolderPairsDataset(Dataset):
    """The ordered pairs of a :class:`FolderPairs`, read from its image cache, with CPU-side flip
    and swap (:class:`~data_modules.augment.PairAugmenter`). Items follow the batch schema of
    :class:`ImageFoldersDataModule`. Random draws come from torch's generator (seeded by
    ``seed_everything`` in the main process and per worker), as in PF-PASCAL's training pairs."""

    def __init__(
        self, pairs: FolderPairs, cache: ImageCache, augmenter: PairAugmenter, with_masks: bool
    ) -> None:
        self.pairs, self.cache = pairs, cache
        self.augmenter, self.with_masks = augmenter, with_masks

    def __len__(self) -> int:
        return len(self.pairs)

    def _view(self, row: int) -> tuple[View, bool]:
        """Image ``row`` with its mask (when masks are on) and whether it has a mask file."""
        item = self.cache[row]
        if not self.with_masks:
            return View(item["image"]), False
        return View(item["image"], item["mask"]), bool(item["has_mask"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng(int(torch.randint(2**62, ())))
        rows = [int(row) for row in self.pairs.image_ids[index]]
        (source, source_has), (target, target_has) = (self._view(row) for row in rows)
        source, target, applied = self.augmenter(source, target, False, rng)
        if applied.swapped:
            rows = rows[::-1]
            source_has, target_has = target_has, source_has
        sizes = torch.from_numpy(self.cache.original_sizes[rows])
        meta: dict[str, Any] = {
            "source_name": self.pairs.images[rows[0]],
            "target_name": self.pairs.images[rows[1]],
            "source_size": sizes[0],
            "target_size": sizes[1],
            "flip": applied.flipped,
            "swap": applied.swapped,
        }
        item = {
            "source_image": to_tensor(source.image),
            "target_image": to_tensor(target.image),
            "index": index,
            "category": self.pairs.categories[self.pairs.image_categories[rows[0]]],
            "meta": meta,
        }
        if self.with_masks:
            item["source_mask"] = torch.from_numpy(source.mask.copy())[None].float()
            item["target_mask"] = torch.from_numpy(target.mask.copy())[None].float()
            meta.update(source_has_mask=source_has, target_has_mask=target_has)
        return item


class ImageFoldersDataModule(pl.LightningDataModule):
    """Unannotated training pairs from folders of your own images, one folder per category (see
    the module docstring for the layout). Serves ``train_dataloader`` only (no labels:
    :attr:`evaluation` is ``none``): fit configs must set ``trainer.limit_val_batches: 0``.

    Args:
        root: the folder holding one sub-folder per category.
        mask_dir: optional folder of foreground masks (``<mask_dir>/<category>/<name>.png``).
        cache_dir: where the HDF5 image cache goes.
        image_size: side of the square network input, pixels.
        batch_size, num_workers: DataLoader settings.
        seed: seed of the training order (:class:`~data_modules.sampling.EpochShuffleSampler`).
        hflip_p, swap_p: probabilities of mirroring both images of a pair and of exchanging
            source and target, see :class:`~data_modules.augment.AugmentConfig`.

    Batches: ``source_image``, ``target_image`` (``B x 3 x H x W`` float, ImageNet-normalised),
    ``source_mask``, ``target_mask`` (``B x 1 x H x W`` float in {0, 1}; only with ``mask_dir``),
    ``index`` (``B`` int64, the pair's index), ``category`` (list of str) and ``meta``:
    ``source_name``, ``target_name`` (lists of str, paths relative to ``root``, after the swap),
    ``source_size``, ``target_size`` (``B x 2`` int64, (H, W) of the original images), ``flip``,
    ``swap`` (``B`` bool, what the augmentation did) and, with ``mask_dir``,
    ``source_has_mask``, ``target_has_mask`` (``B`` bool: False where the mask file is missing
    and the mask is all ones).
    """

    evaluation: ClassVar[str] = "none"
    negative_labels = staticmethod(by_category)

    def __init__(
        self,
        root: str,
        mask_dir: str | None = None,
        cache_dir: str = "outputs/cache",
        image_size: int = 320,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        hflip_p: float = 0.5,
        swap_p: float = 0.5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for name, value in {"image_size": image_size, "batch_size": batch_size}.items():
            if value < 1:
                raise ConfigError(f"--data.{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ConfigError(f"--data.num_workers must be >= 0, got {num_workers}")
        self.root = Path(root)
        self.mask_dir = Path(mask_dir) if mask_dir is not None else None
        self.cache_dir = Path(cache_dir)
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.augment = AugmentConfig(hflip_p=hflip_p, swap_p=swap_p, jitter_p=0.0, blur_p=0.0)
        self.cache: ImageCache | None = None
        self.dataset: FolderPairsDataset | None = None

    @cached_property
    def folders(self) -> FolderPairs:
        """The scanned folders (scanned once per data module, so each warning shows once)."""
        return scan_folders(self.root)

    def cache_file(self) -> Path:
        """``<cache_dir>/folders-<sha1 of the resolved root, 10 hex>-<size>px.h5``."""
        digest = hashlib.sha1(str(self.root.resolve()).encode("utf-8")).hexdigest()[:10]
        return self.cache_dir / f"folders-{digest}-{self.image_size}px.h5"

    def cache_fingerprint(self) -> str:
        """Changes when an image or mask file, the lists of them, the folders or the image size
        change."""
        masks = None
        if self.mask_dir is not None:
            found = [mask_file(self.mask_dir, name) for name in self.folders.images]
            masks = fingerprint([path for path in found if path.is_file()])
        return fingerprint(
            self.folders.images,
            root=self.root,
            resolved_root=str(self.root.resolve()),
            mask_dir=None if self.mask_dir is None else str(self.mask_dir.resolve()),
            masks=masks,
            image_size=self.image_size,
            recipe=_RESIZE_RECIPE,
        )

    def _cache_items(self) -> Iterator[CacheItem]:
        """Every image resized to ``image_size`` squared, with its mask (all ones without a mask
        file) and ``has_mask`` when ``mask_dir`` is given."""
        size = (self.image_size, self.image_size)
        for relative in self.folders.images:
            image = load_image(self.root / relative)
            labels, path = None, None
            if self.mask_dir is not None:
                path = mask_file(self.mask_dir, relative)
                if path.is_file():
                    labels = read_mask(path)
                else:
                    labels, path = np.ones(image.shape[:2], dtype=np.uint8), None
            yield masked_cache_item(self.root, relative, image, size, labels, path)

    def prepare_data(self) -> None:
        """Scan the folders and build the image cache when it is absent or stale (Lightning: once
        per node)."""
        ensure_cache(self.cache_file(), self.cache_fingerprint(), self._cache_items)

    def setup(self, stage: str | None = None) -> None:
        """Open the cache built by :meth:`prepare_data` (validated against the folders) and make
        the training pairs."""
        path = self.cache_file()
        self.cache = ImageCache(path, self.cache_fingerprint())
        if tuple(self.cache.names) != self.folders.images:
            raise DataError(f"{path}: its images do not match the folders under {self.root}")
        self.dataset = FolderPairsDataset(
            self.folders, self.cache, PairAugmenter(self.augment), self.mask_dir is not None
        )

    def teardown(self, stage: str | None = None) -> None:
        if self.cache is not None:
            self.cache.close()

    def train_dataloader(self) -> DataLoader:
        if self.dataset is None:
            raise RuntimeError("call prepare_data() and setup() before asking for a dataloader")
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(self.dataset), self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
