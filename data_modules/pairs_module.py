"""The LightningDataModule base of the benchmarks whose splits are lists of image pairs under one
root (SPair-71k, PF-PASCAL, PF-WILLOW, Caltech-101): it validates each split's pairs once, caches
the split's images (and masks) in HDF5 (:mod:`data_modules.cache`), opens the cache and serves the
loaders."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from data_modules import by_category
from data_modules.bad_pairs import BadPairPolicy, SkippedPairsReport
from data_modules.cache import CacheItem, ImageCache, ensure_cache, fingerprint, masked_cache_item
from data_modules.sampling import EpochShuffleSampler
from guided_flow.errors import ConfigError, DataError
from guided_flow.io.images import load_image

CACHE_VERSION = 1


class Pairs(Protocol):
    """What the base reads of a split's validated pairs (:class:`~data_modules.pairs.PairList`,
    :class:`~data_modules.spair.SPairSplit`): the list file ``path``, ``N`` pair ``names``, ``I``
    ``images`` (relative to the module's image folder, in cache order) and ``sources``, the other
    files read (relative to the root)."""

    path: Path
    names: list[str]
    images: list[str]
    sources: tuple[str, ...]


class PairsDataModule(SkippedPairsReport, pl.LightningDataModule):
    """A benchmark given as pair lists and images under one root. Subclasses read and validate a
    split (:meth:`read_pairs`, handing bad pairs to :attr:`policy`), build its dataset
    (:meth:`make_dataset`) and, for a split with masks, name the mask files (:meth:`mask_files`,
    :meth:`load_mask`). Each split is validated once per data module, in :meth:`prepare_data` or
    :meth:`setup`, whichever comes first in the process; :attr:`pair_lists` and :attr:`datasets`
    then hold it by split.

    Args:
        root: the benchmark's folder.
        image_size: side of the square network input, pixels.
        batch_size: pairs per batch.
        num_workers: DataLoader workers.
        cache_dir: where the HDF5 image caches go (default ``<root>/cache``).
        split: the split served by the test loader, one of :attr:`splits`.
        skip_bad: drop each bad pair (:mod:`data_modules.bad_pairs`) with a warning instead of
            raising :class:`~guided_flow.errors.DataError`; ``skipped_pairs`` counts them.
    """

    evaluation: ClassVar[str]
    """How the batches are scored, one of :data:`data_modules.EVALUATIONS`."""
    negative_labels = staticmethod(by_category)
    benchmark: ClassVar[str] = ""
    """The name in messages and in ``guided-flow download <benchmark>``."""
    cache_name: ClassVar[str] = ""
    """Prefix of the cache files and dataset name in their fingerprint (default: benchmark)."""
    image_folder: ClassVar[str] = ""
    """The folder, relative to the root, that the pairs' image paths are relative to."""
    relocatable_cache: ClassVar[bool] = False
    """Fingerprint the source files by their paths relative to the root (every file lies under
    it, and the cache survives moving it), not by their absolute paths."""
    categories: ClassVar[tuple[str, ...]] = ()
    pck_bound: ClassVar[str | None] = None
    splits: ClassVar[tuple[str, ...]] = ("test",)
    """The choices of ``split``."""
    fit_splits: ClassVar[tuple[str, str] | None] = None
    """The (training, validation) splits of the ``fit`` and ``validate`` stages; None: a test
    benchmark."""

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
        self.pair_lists: dict[str, Pairs] = {}
        self._specs: dict[str, tuple[Pairs, Path, str]] = {}

    # --- what subclasses provide --------------------------------------------------------------
    def read_pairs(self, split: str) -> Pairs:
        """Read and validate ``split``'s pairs, handing bad pairs to :attr:`policy`."""
        raise NotImplementedError

    def make_dataset(self, split: str, pairs: Pairs, cache: ImageCache) -> Dataset:
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
        """The splits a trainer stage needs: ``fit`` both :attr:`fit_splits`, ``validate`` the
        validation split, ``test`` and ``predict`` :attr:`split`."""
        if stage not in ("fit", "validate"):
            return (self.split,)
        if self.fit_splits is None:
            raise ConfigError(
                f"{self.benchmark} is a test benchmark here: it serves `test`, not `{stage}`"
            )
        return self.fit_splits if stage == "fit" else self.fit_splits[1:]

    def _trainer_stage(self) -> str:
        """The attached trainer's stage, ``test`` without a trainer."""
        trainer = self.trainer
        return "test" if trainer is None or trainer.state.fn is None else trainer.state.fn.value

    def _cache_spec(self, split: str) -> tuple[Pairs, Path, str]:
        """The validated pairs of ``split``, its cache file and the fingerprint it must carry
        (computed on the first call, so that each bad pair is reported once)."""
        if split not in self._specs:
            self._specs[split] = self._read_spec(split)
        return self._specs[split]

    def _read_spec(self, split: str) -> tuple[Pairs, Path, str]:
        """:meth:`_cache_spec`, read now."""
        pairs = self.read_pairs(split)
        masks = self.mask_files(split)
        images = self.root / self.image_folder
        files = [
            pairs.path,
            *(self.root / name for name in pairs.sources),
            *(images / name for name in pairs.images),
        ]
        if masks is not None:
            files += [found for found in map(masks, pairs.images) if found is not None]
        root = self.root if self.relocatable_cache else None
        if root is not None:
            files = [file.relative_to(root) for file in files]
        name = self.cache_name or self.benchmark
        key = fingerprint(
            files,
            root=root,
            dataset=name,
            version=CACHE_VERSION,
            split=split,
            image_size=self.image_size,
            masks=masks is not None,
        )
        suffix = "-masks" if masks is not None else ""
        path = self.cache_dir / f"{name}-{split}-{self.image_size}{suffix}.h5"
        return pairs, path, key

    def _cache_items(self, split: str, pairs: Pairs) -> Iterator[CacheItem]:
        """Decode and resize every image of ``split`` (with its label map when the split has
        masks: the resized map, or zeros, and ``has_mask``)."""
        size = (self.image_size, self.image_size)
        images = self.root / self.image_folder
        masks = self.mask_files(split)
        for relative in pairs.images:
            image = load_image(images / relative, upright=False)  # keypoints: stored frame
            labels, mask_path = None, None
            if masks is not None:
                mask_path = masks(relative)
                labels = np.zeros(image.shape[:2], dtype=np.uint8)
                if mask_path is not None:
                    labels = self.load_mask(mask_path)
            yield masked_cache_item(images, relative, image, size, labels, mask_path)

    def prepare_data(self) -> None:
        """:meth:`prepare_stage` for the attached trainer's stage (``test`` without one)."""
        self.prepare_stage(self._trainer_stage())

    def prepare_stage(self, stage: str) -> None:
        """Validate the pairs of ``stage``'s splits, then build their image caches if absent or
        stale (atomically) and check them."""
        for split in self.stage_splits(stage):
            pairs, path, key = self._cache_spec(split)
            items = lambda split=split, pairs=pairs: self._cache_items(split, pairs)
            ensure_cache(path, key, items)

    def setup(self, stage: str | None = None) -> None:
        """Validate the pairs of ``stage``'s splits (default ``test``) and open the caches built
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
        split = self.stage_splits("validate")[0] if stage in ("validate", "val") else self.split
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
