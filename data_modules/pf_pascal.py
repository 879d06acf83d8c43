"""PF-PASCAL (Ham et al. 2018): stage-2 training pairs with VOC masks and keypoint evaluation.

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

from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.io
from pytorch_lightning.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from data_modules.augment import AugmentConfig, PairAugmenter
from data_modules.cache import ImageCache
from data_modules.pairs import (
    KEYPOINT_ALPHAS,
    KeypointPairsDataset,
    PairList,
    PairListBuilder,
    check_column_count,
    download_hint,
    find_pair_list,
    paired_points,
    parse_class,
    parse_numbers,
    read_rows,
    row_error,
)
from data_modules.pairs_module import PairsDataModule
from data_modules.voc_masks import (
    VOC_MASK_FOLDERS,
    MaskedPairsDataset,
    voc_label_map,
    voc_mask_file,
)
from guided_flow.errors import ConfigError, DataError

VOC_CATEGORIES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip


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
        root, image_size, batch_size, num_workers, cache_dir: see
            :class:`~data_modules.pairs_module.PairsDataModule`.
        split: the list served by the test loader: ``test`` (default) or ``val``.
        masks: give training pairs their VOC 2012 masks (the VOC folder must exist).
        voc_root: the VOC 2012 folder (holding ``SegmentationClass`` and/or
            ``SegmentationObject``); default ``<root>/VOCdevkit/VOC2012`` or ``<root>/VOC2012``.
        hflip_p, swap_p, jitter_p, brightness, contrast, saturation, hue, blur_p, blur_sigma:
            training augmentation, see :class:`~data_modules.augment.AugmentConfig`.
        skip_bad: see :class:`~data_modules.pairs_module.PairsDataModule`.
    """

    evaluation = "keypoints"
    benchmark = "pf-pascal"
    categories = VOC_CATEGORIES
    pck_bound = "trg_img"
    alphas = KEYPOINT_ALPHAS
    splits = ("train", "val", "test")
    fit_splits = ("train", "val")

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
        """See :meth:`~data_modules.pairs_module.PairsDataModule.setup`; also reports how many
        test pairs the training list contains (in the same order, and as unordered image
        pairs)."""
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
