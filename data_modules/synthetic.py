"""Synthetic pairs: real photographs and random affine + TPS warps (the embedded default).

The images (resized to ``image_size`` squared and cached in HDF5) come from one of three
sources: the colour photographs bundled with scikit-image (default, offline), a folder of the
user's own images, or the training images of PF-PASCAL (METHOD.md section 11). Each image is
the TARGET of its pairs; the SOURCE is its random warp, made on the device in
:meth:`SyntheticPairsDataModule.on_after_batch_transfer` with the exact ground-truth flow.

Images are split by image: the last ``val_images + test_images`` of the ordered list are held
out (proposed formulation, like the choice of scikit-image's photographs as the default images).
Warps are a pure function of ``(seed, key)``: a validation or test pair's key is its index, so
those pairs are identical in every run; a training pair's key is ``warp_key(epoch, index)``, so
every epoch sees new warps.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytorch_lightning as pl
import skimage
import skimage.data
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from data_modules import by_photograph
from data_modules.cache import CacheItem, ImageCache, ensure_cache, fingerprint
from data_modules.pairs import find_pair_list, read_rows, to_tensor
from data_modules.pf_pascal import PFPascalDataModule
from data_modules.sampling import EpochShuffleSampler
from data_modules.warps import (
    WarpConfig,
    sample_warp_params,
    synthesize_pairs,
    warp_key,
)
from guided_flow.errors import ConfigError, DataError
from guided_flow.io.images import load_image, resize_image

# The photographs that ship with scikit-image (no download; greyscale ones as RGB). Held-out
# images come from the end of this order: with the defaults, validation uses chelsea and camera,
# test astronaut and coffee, and training never sees any of the four.
SKIMAGE_PHOTOS: tuple[str, ...] = (
    "motorcycle_left",
    "motorcycle_right",
    "rocket",
    "coins",
    "clock",
    "immunohistochemistry",
    "chelsea",
    "camera",
    "astronaut",
    "coffee",
)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp"})
_RESIZE_RECIPE = "pil-bilinear-square"  # part of the fingerprint: change it when resizing changes


def _skimage_photo(name: str) -> np.ndarray:
    """One of :data:`SKIMAGE_PHOTOS` as ``H x W x 3`` uint8."""
    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        return left if name == "motorcycle_left" else right
    image = getattr(skimage.data, name)()
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image


@dataclass(frozen=True)
class ImageSource:
    """An ordered list of images: scikit-image names (``root`` None) or file paths relative to
    ``root``. ``kind`` names the source in the cache file name."""

    kind: str
    names: tuple[str, ...]
    root: Path | None = None
    excluded: int = 0  # images left out of the source (the test pairs' images)

    def load(self, name: str) -> np.ndarray:
        """Image ``name`` as ``H x W x 3`` uint8."""
        return _skimage_photo(name) if self.root is None else load_image(self.root / name)

    def fingerprint(self, image_size: int) -> str:
        """Changes when a file, the list, the image size or the resizing recipe changes."""
        if self.root is None:
            return fingerprint(
                kind=self.kind, names=self.names, skimage=skimage.__version__,
                image_size=image_size, recipe=_RESIZE_RECIPE,
            )
        return fingerprint(
            self.names, root=self.root, kind=self.kind, image_size=image_size, recipe=_RESIZE_RECIPE
        )

    def cache_file(self, cache_dir: str | Path, image_size: int) -> Path:
        """``<cache_dir>/synthetic-<kind>[-<hash of the root>]-<size>px.h5``."""
        stem = f"synthetic-{self.kind}"
        if self.root is not None:
            digest = hashlib.sha1(str(self.root.resolve()).encode("utf-8")).hexdigest()[:10]
            stem = f"{stem}-{digest}"
        return Path(cache_dir) / f"{stem}-{image_size}px.h5"

    def items(self, image_size: int) -> Iterator[CacheItem]:
        """The cache items: every image resized to ``image_size`` squared."""
        for name in self.names:
            image = self.load(name)
            resized = resize_image(image, (image_size, image_size))
            yield CacheItem(name=name, image=resized, original_size=image.shape[:2])


def skimage_source() -> ImageSource:
    """The colour photographs bundled with scikit-image, :data:`SKIMAGE_PHOTOS`."""
    return ImageSource("skimage", SKIMAGE_PHOTOS)


def folder_source(image_dir: str | Path) -> ImageSource:
    """Every image file under ``image_dir`` (recursively), sorted by relative path."""
    root = Path(image_dir)
    if not root.is_dir():
        raise DataError(f"{root}: the image folder does not exist")
    names = sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob("*")
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    )
    if not names:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DataError(f"{root}: no image files ({suffixes}) in the image folder")
    return ImageSource("folder", tuple(names), root)


def _pair_list_images(root: Path, names: tuple[str, ...]) -> set[str]:
    """Image paths named by the first of the PF-PASCAL lists ``names`` found at ``root`` or in
    ``image_pairs/`` (columns ``source_image``, ``target_image``); DataError names the file, or
    the places looked at and the download command."""
    path = find_pair_list(root, names, "pf-pascal")
    header, rows = read_rows(path)
    columns = ("source_image", "target_image")
    if any(column not in header for column in columns):
        raise DataError(f"{path}: expected a header with columns {columns}")
    positions = [header.index(column) for column in columns]
    return {row[i] for _, row in rows for i in positions if i < len(row)}


def pf_pascal_source(root: str | Path, exclude_test_images: bool = False) -> ImageSource:
    """The images of PF-PASCAL's ``train_pairs.csv`` (at the root or in ``image_pairs/``;
    columns ``source_image``, ``target_image``, paths relative to ``root``), sorted; with
    ``exclude_test_images``, without the images of the test pairs (``excluded`` counts them)."""
    root = Path(root)
    names = _pair_list_images(root, ("train_pairs.csv",))
    excluded = 0
    if exclude_test_images:
        test = _pair_list_images(root, ("test_pairs.csv", "test_pairs_pf_pascal.csv"))
        excluded = len(names & test)
        names -= test
    kind = "pf-pascal-no-test" if exclude_test_images else "pf-pascal"
    return ImageSource(kind, tuple(sorted(names)), root, excluded)


class SyntheticImages(Dataset):
    """Pair ``k`` of a split uses image ``image_ids[k % len(image_ids)]`` of the cache as target.

    Item: ``image`` (``3 x H x W`` float, ImageNet-normalised), ``index`` (k, int64),
    ``category`` (``"synthetic"``), ``image_name`` (str). The warp is made after the batch
    reaches the device.
    """

    def __init__(self, cache: ImageCache, image_ids: list[int], length: int) -> None:
        self.cache, self.image_ids, self.length = cache, image_ids, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.image_ids[index % len(self.image_ids)]
        return {
            "image": to_tensor(self.cache[image_id]["image"]),
            "index": index,
            "category": "synthetic",
            "image_name": self.cache.names[image_id],
        }


class SyntheticPairsDataModule(pl.LightningDataModule):
    """Photographs and random warps as image pairs with dense ground truth (the embedded default).

    Args:
        image_dir: a folder of your own images; None with ``root`` None: scikit-image's photos.
        root: a PF-PASCAL root: use the images of its ``train_pairs.csv``.
        exclude_test_images: with ``root``, leave the images of PF-PASCAL's test pairs out of
            every split (the count is reported at set-up).
        keypoint_validation: with ``root``, validate on PF-PASCAL's validation pairs and their
            keypoints (PCK, the benchmark's protocol) instead of synthetic warps; the module's
            ``val_evaluation`` is then ``keypoints``.
        cache_dir: where the HDF5 image cache goes.
        image_size: side of the square network input, pixels.
        batch_size, num_workers: DataLoader settings.
        seed: seed of the warps (pairs are a pure function of seed, key and the warp options).
        val_images, test_images: number of held-out images (the last ones of the sorted list).
        train_pairs_per_epoch, val_pairs, test_pairs: pairs per split; pair k of validation and
            test uses held-out image ``k % n``.
        max_translation, translation_sigma, max_rotation_deg, min_scale, max_scale,
        tps_grid_size, max_tps_offset: warp ranges, see
            :class:`~data_modules.warps.WarpConfig`.

    Batches after :meth:`on_after_batch_transfer`: ``source_image``, ``target_image``
    (``B x 3 x H x W`` normalised), ``flow_s2t`` (``B x 2 x H x W`` pixels), ``flow_valid``
    (``B x 1 x H x W`` bool), ``index`` (B int64), ``category`` (list of str) and ``meta``:
    ``warp_key`` (B int64), ``image_name`` (list of str), ``original_size`` (``B x 2`` (H, W):
    the input size, since synthetic pairs are made at the input resolution).
    """

    evaluation: ClassVar[str] = "dense_flow"
    negative_labels = staticmethod(by_photograph)

    def __init__(
        self,
        image_dir: str | None = None,
        root: str | None = None,
        exclude_test_images: bool = False,
        keypoint_validation: bool = False,
        cache_dir: str = "outputs/cache",
        image_size: int = 320,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        val_images: int = 2,
        test_images: int = 2,
        train_pairs_per_epoch: int = 1000,
        val_pairs: int = 64,
        test_pairs: int = 128,
        max_translation: float = 0.15,
        translation_sigma: float = 0.05,
        max_rotation_deg: float = 10.0,
        min_scale: float = 0.8,
        max_scale: float = 1.2,
        tps_grid_size: int = 3,
        max_tps_offset: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if image_dir is not None and root is not None:
            raise ConfigError("give image_dir (your own images) or root (PF-PASCAL), not both")
        for option, value in (
            ("exclude_test_images", exclude_test_images),
            ("keypoint_validation", keypoint_validation),
        ):
            if value and root is None:
                raise ConfigError(f"{option}=true needs root (a PF-PASCAL root)")
        positive = {
            "image_size": image_size, "batch_size": batch_size, "val_images": val_images,
            "test_images": test_images, "train_pairs_per_epoch": train_pairs_per_epoch,
            "val_pairs": val_pairs, "test_pairs": test_pairs,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
        self.warp_config = WarpConfig(
            max_translation=max_translation,
            translation_sigma=translation_sigma,
            max_rotation_deg=max_rotation_deg,
            min_scale=min_scale,
            max_scale=max_scale,
            tps_grid_size=tps_grid_size,
            max_tps_offset=max_tps_offset,
        )
        self.cache: ImageCache | None = None
        self.datasets: dict[str, SyntheticImages] = {}
        self.validation_pairs: PFPascalDataModule | None = None
        if keypoint_validation:
            self.validation_pairs = PFPascalDataModule(
                root, image_size, batch_size, num_workers, cache_dir, split="val", masks=False
            )
            # the stage scores validation as the benchmark's keypoints, with its protocol, read
            # from the attached data module (the test pairs stay synthetic warps)
            self.val_evaluation = "keypoints"
            self.pck_bound = PFPascalDataModule.pck_bound
            self.alphas = PFPascalDataModule.alphas
            self.categories = self.validation_pairs.categories

    def source(self) -> ImageSource:
        """The configured image source (lists the files; raises DataError when missing)."""
        if self.hparams.root is not None:
            return pf_pascal_source(self.hparams.root, self.hparams.exclude_test_images)
        if self.hparams.image_dir is not None:
            return folder_source(self.hparams.image_dir)
        return skimage_source()

    def _cache_file_and_fingerprint(self) -> tuple[ImageSource, Path, str]:
        source = self.source()
        size = self.hparams.image_size
        return source, source.cache_file(self.hparams.cache_dir, size), source.fingerprint(size)

    def prepare_data(self) -> None:
        """Build the image cache when it is absent or stale (Lightning: once per node)."""
        source, path, expected = self._cache_file_and_fingerprint()
        ensure_cache(path, expected, lambda: source.items(self.hparams.image_size))
        if self.validation_pairs is not None:
            self.validation_pairs.prepare_stage("validate")

    def setup(self, stage: str | None = None) -> None:
        """Open the cache (validated against the current source) and split it by image."""
        source, path, expected = self._cache_file_and_fingerprint()
        if source.excluded:
            rank_zero_info(
                f"PF-PASCAL: {source.excluded} training images also appear in the test pairs "
                f"and are left out; {len(source.names)} images remain"
            )
        if self.validation_pairs is not None and stage in ("fit", "validate", None):
            self.validation_pairs.setup("validate")
        self.cache = ImageCache(path, expected)
        count, held_out = len(self.cache), self.hparams.val_images + self.hparams.test_images
        if held_out >= count:
            raise ConfigError(
                f"{path}: {count} images cannot give {self.hparams.val_images} validation and "
                f"{self.hparams.test_images} test images and keep one for training"
            )
        train_end, val_end = count - held_out, count - self.hparams.test_images
        splits = {
            "train": (range(train_end), self.hparams.train_pairs_per_epoch),
            "val": (range(train_end, val_end), self.hparams.val_pairs),
            "test": (range(val_end, count), self.hparams.test_pairs),
        }
        self.datasets = {
            split: SyntheticImages(self.cache, list(ids), pairs)
            for split, (ids, pairs) in splits.items()
        }

    def teardown(self, stage: str | None = None) -> None:
        if self.cache is not None:
            self.cache.close()

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError("call prepare_data() and setup() before asking for a dataloader")
        workers = self.hparams.num_workers
        dataset = self.datasets[split]
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.hparams.seed) if shuffle else None,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        if self.validation_pairs is not None:
            return self.validation_pairs.val_dataloader()
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def warp_keys(self, index: torch.Tensor) -> torch.Tensor:
        """Keys of a batch's warps: ``warp_key(current epoch, index)`` for training batches (the
        trainer is fitting and not validating), the pair index otherwise. Derived here, on the
        main process, so DataLoader workers never need to know the epoch."""
        trainer = self.trainer
        if trainer is not None and trainer.training:
            return warp_key(trainer.current_epoch, index)
        return index

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Warp the batch's images on their device into the pair schema (see the class doc);
        keypoint validation batches pass unchanged."""
        if "image" not in batch:
            return batch
        images, index = batch["image"], batch["index"]
        keys = self.warp_keys(index)
        params = sample_warp_params(self.hparams.seed, keys, self.warp_config, device=images.device)
        pair = synthesize_pairs(images, params)
        meta = {
            "warp_key": keys,
            "image_name": list(batch["image_name"]),
            "original_size": index.new_tensor(images.shape[-2:]).expand(images.shape[0], 2),
        }
        return {
            "source_image": pair.source,
            "target_image": pair.target,
            "flow_s2t": pair.flow_s2t,
            "flow_valid": pair.flow_valid,
            "index": index,
            "category": list(batch["category"]),
            "meta": meta,
        }
