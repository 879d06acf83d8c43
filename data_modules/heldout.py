"""Leave-one-class-out folds of a PF-WILLOW layout: train on the images of some classes, evaluate
on the keypoint pairs of the others.

A fold holding out class ``c`` of ``root`` (``root/test_pairs.csv`` and
``root/PF-dataset/<class>/<image>``, :mod:`data_modules.pf_willow`) is written under a work
folder as two trees of symbolic links, so no image is copied:

- ``train/<class>/<image>``: the images of every other class, for
  :class:`~data_modules.folders.ImageFoldersDataModule`, **without any photograph of an
  evaluated class**: PF-WILLOW files one photograph under several classes (the same car in
  ``car(G)`` and ``car(M)``), so an image is left out when its bytes or its file name equal those
  of an image of ``c``;
- ``test/test_pairs.csv`` (the rows whose two images are of ``c``, header kept) and
  ``test/PF-dataset`` (a link to ``root/PF-dataset``), for
  :class:`~data_modules.pf_willow.PFWillowDataModule`.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from data_modules.pairs import read_rows
from guided_flow.errors import DataError

IMAGE_FOLDER = "PF-dataset"
PAIR_LIST = "test_pairs.csv"


@dataclass(frozen=True)
class HeldOutFold:
    """One fold: the evaluated ``held_out`` classes, the folder trees to train and test on, and
    what went into each (image paths relative to ``root/PF-dataset``)."""

    held_out: tuple[str, ...]
    train_root: Path
    test_root: Path
    train_images: tuple[str, ...]
    test_images: tuple[str, ...]
    test_pairs: int


def classes(root: str | Path) -> tuple[str, ...]:
    """The class folders under ``root/PF-dataset``, sorted."""
    images = Path(root) / IMAGE_FOLDER
    if not images.is_dir():
        raise DataError(f"{images}: no such folder (expected <root>/{IMAGE_FOLDER}/<class>/)")
    return tuple(sorted(p.name for p in images.iterdir() if p.is_dir()))


def _digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _class_images(root: Path, name: str) -> list[Path]:
    return sorted(p for p in (root / IMAGE_FOLDER / name).iterdir() if p.is_file())


def make_fold(root: str | Path, held_out: tuple[str, ...], work_dir: str | Path) -> HeldOutFold:
    """Write the fold that evaluates the classes ``held_out`` under ``work_dir`` (replacing what
    was there) and return it. Raises DataError naming the folder or list when a class is
    unknown, or when no pair or no training image is left."""
    root, work_dir = Path(root).resolve(), Path(work_dir)
    known = classes(root)
    unknown = [name for name in held_out if name not in known]
    if unknown:
        raise DataError(f"{root / IMAGE_FOLDER}: no class {unknown[0]!r} (classes: {known})")
    evaluated = [path for name in held_out for path in _class_images(root, name)]
    evaluated_digests = {_digest(path) for path in evaluated}
    evaluated_names = {path.name for path in evaluated}
    if work_dir.exists():
        shutil.rmtree(work_dir)
    train_images = []
    for name in known:
        if name in held_out:
            continue
        for path in _class_images(root, name):
            if path.name in evaluated_names or _digest(path) in evaluated_digests:
                continue
            link = work_dir / "train" / name / path.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
            train_images.append(f"{name}/{path.name}")
    if not train_images:
        raise DataError(f"{root}: holding out {held_out} leaves no image to train on")
    header, rows = read_rows(root / PAIR_LIST)
    prefixes = tuple(f"{IMAGE_FOLDER}/{name}/" for name in held_out)
    kept = [row for _, row in rows if row[0].startswith(prefixes) and row[1].startswith(prefixes)]
    if not kept:
        raise DataError(f"{root / PAIR_LIST}: no pair of the classes {held_out}")
    test_root = work_dir / "test"
    test_root.mkdir(parents=True)
    (test_root / IMAGE_FOLDER).symlink_to(root / IMAGE_FOLDER, target_is_directory=True)
    lines = [",".join(header), *(",".join(row) for row in kept)]
    (test_root / PAIR_LIST).write_text("\n".join(lines) + "\n")
    return HeldOutFold(
        held_out=tuple(held_out),
        train_root=work_dir / "train",
        test_root=test_root,
        train_images=tuple(train_images),
        test_images=tuple(str(path.relative_to(root / IMAGE_FOLDER)) for path in evaluated),
        test_pairs=len(kept),
    )
