"""Data loading speed: a benchmark DataModule reading its HDF5 cache against decoding and resizing
the image files (a benchmark, not a test).

``python benchmarks/data.py [--root SPAIR_ROOT] [--pairs N] [--image-size PX]
[--batch-size B] [--num-workers W] [--passes P]``

Both paths serve the same :class:`~data_modules.spair.SPairDataset` (keypoints, boxes,
normalisation, masks) through the same DataLoader settings, those of
:meth:`SPairDataModule.test_dataloader`; they differ only in where each image comes from: a row
of the module's HDF5 cache, or its JPEG (and PNG mask) decoded and resized on the fly. Without
``--root`` a SPair-71k-shaped dataset is generated in a temporary folder: JPEG crops of the
photographs bundled with scikit-image at SPair's typical sizes (500 px on the long side), box
masks and valid annotations. After one warm-up pass of each (the files then sit in the page
cache, so disk speed is out of the comparison), the passes alternate between the two paths; the
median pairs per second of each is reported. The last line of standard output is one JSON object
(see :func:`main`); progress goes to standard error.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from skimage import data as skdata
from torch.utils.data import DataLoader

from data_modules.spair import CATEGORIES, DIFFICULTY_NAMES, SPairDataModule, SPairDataset
from guided_flow.io.images import load_image, resize_image

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right")
LONG_SIDE = 500


def log(message: str) -> None:
    """Progress on standard error."""
    print(message, file=sys.stderr, flush=True)


def _photo(name: str) -> np.ndarray:
    """A colour photograph bundled with scikit-image, ``H x W x 3`` uint8."""
    if name.startswith("motorcycle_"):
        left, right, _ = skdata.stereo_motorcycle()
        return left if name == "motorcycle_left" else right
    return getattr(skdata, name)()


def write_dataset(root: Path, pairs: int, seed: int = 0) -> None:
    """A SPair-71k-shaped test split under ``root``: ``pairs`` pairs (of two images of one
    category) over ``pairs // 2`` images (random crops of :data:`PHOTOS`, ``LONG_SIDE`` px on the
    long side, JPEG quality 90), box masks in ``Segmentation`` and one annotation per pair."""
    rng = np.random.default_rng(seed)
    photos = [_photo(name) for name in PHOTOS]
    images = []
    for index in range(max(pairs // 2, 2)):
        photo = photos[index % len(photos)]
        height, width = photo.shape[:2]
        crop_h, crop_w = int(height * rng.uniform(0.6, 1.0)), int(width * rng.uniform(0.6, 1.0))
        top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
        crop = photo[top : top + crop_h, left : left + crop_w]
        scale = LONG_SIDE / max(crop_h, crop_w)
        size = (max(round(crop_h * scale), 1), max(round(crop_w * scale), 1))
        category = CATEGORIES[index % len(CATEGORIES)]
        name = f"{index:06d}.jpg"
        path = root / "JPEGImages" / category / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(resize_image(crop, size)).save(path, quality=90)
        mask = np.zeros(size, dtype=np.uint8)
        mask[size[0] // 4 : 3 * size[0] // 4, size[1] // 4 : 3 * size[1] // 4] = 1
        mask_path = root / "Segmentation" / category / f"{index:06d}.png"
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(mask_path)
        images.append((category, name, size))
    by_category: dict[str, list[int]] = {}
    for index, (category, _, _) in enumerate(images):
        by_category.setdefault(category, []).append(index)
    names = []
    for pair in range(pairs):
        first = int(rng.integers(len(images)))
        second = int(rng.choice(by_category[images[first][0]]))
        (category, source, source_size), (_, target, target_size) = images[first], images[second]
        count = int(rng.integers(3, 12))
        record: dict[str, Any] = {
            "src_imname": source,
            "trg_imname": target,
            "src_imsize": [source_size[1], source_size[0], 3],
            "trg_imsize": [target_size[1], target_size[0], 3],
            "src_bndbox": [0, 0, source_size[1] - 1, source_size[0] - 1],
            "trg_bndbox": [0, 0, target_size[1] - 1, target_size[0] - 1],
            "category": category,
            "src_kps": (rng.uniform(0, 1, (count, 2)) * source_size[::-1]).round().tolist(),
            "trg_kps": (rng.uniform(0, 1, (count, 2)) * target_size[::-1]).round().tolist(),
            **{key: 0 for key in DIFFICULTY_NAMES},
        }
        name = f"{pair:06d}-{source[:-4]}-{target[:-4]}:{category}"
        annotation = root / "PairAnnotation" / "test" / f"{name}.json"
        annotation.parent.mkdir(parents=True, exist_ok=True)
        annotation.write_text(json.dumps(record), encoding="utf-8")
        names.append(name)
    layout = root / "Layout" / "large" / "test.txt"
    layout.parent.mkdir(parents=True, exist_ok=True)
    layout.write_text("".join(f"{name}\n" for name in names), encoding="utf-8")


class DecodedImages:
    """Stands in for the module's :class:`~data_modules.cache.ImageCache`: item ``row`` is image
    ``row`` of the split decoded from its file and resized as the cache build does (bilinear
    image, nearest-neighbour foreground mask)."""

    def __init__(self, root: Path, images: list[str], size: int, masks: bool) -> None:
        self.root, self.images, self.size, self.masks = root, images, (size, size), masks

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, row: int) -> dict[str, np.ndarray]:
        relative = self.images[row]
        image = load_image(self.root / "JPEGImages" / relative, upright=False)  # masks: stored
        item = {"image": resize_image(image, self.size)}
        if self.masks:
            mask_path = (self.root / "Segmentation" / relative).with_suffix(".png")
            labels = load_image(mask_path, upright=False)
            foreground = (labels.max(axis=-1) > 0).astype(np.uint8) * 255
            item["mask"] = resize_image(foreground, self.size, interpolation="nearest")
        return item


def pairs_per_second(loader: DataLoader) -> float:
    """Pairs per second of one full pass over ``loader``."""
    start = time.perf_counter()
    pairs = sum(int(batch["source_image"].shape[0]) for batch in loader)
    return pairs / (time.perf_counter() - start)


def measure(root: Path, cache_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Build the cache, then time both paths (see the module docstring)."""
    module = SPairDataModule(
        str(root),
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        cache_dir=str(cache_dir),
    )
    start = time.perf_counter()
    module.prepare_data()
    build_s = time.perf_counter() - start
    module.setup("test")
    cached = module.test_dataloader()
    annotations = module.pair_lists[module.split]
    files = DataLoader(
        SPairDataset(
            annotations, DecodedImages(root, annotations.images, args.image_size, module.with_masks)
        ),
        batch_size=cached.batch_size,
        shuffle=False,
        num_workers=cached.num_workers,
        persistent_workers=cached.persistent_workers,
        pin_memory=cached.pin_memory,
    )
    loaders = {"cache": cached, "files": files}
    for loader in loaders.values():
        pairs_per_second(loader)  # warm-up: page cache, worker start, cache handle
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    for index in range(args.passes):
        for name, loader in loaders.items():
            rates[name].append(pairs_per_second(loader))
        log(f"pass {index + 1}: " + ", ".join(f"{k} {v[-1]:.1f} pairs/s" for k, v in rates.items()))
    cache_rate, files_rate = statistics.median(rates["cache"]), statistics.median(rates["files"])
    return {
        "datamodule": "SPairDataModule",
        "root": "generated" if args.root is None else str(root),
        "pairs": len(annotations.names),
        "images": len(annotations.images),
        "masks": module.with_masks,
        "image_size": args.image_size,
        "batch_size": cached.batch_size,
        "num_workers": cached.num_workers,
        "passes": args.passes,
        "cache_build_s": round(build_s, 2),
        "cache_pairs_per_s": round(cache_rate, 2),
        "files_pairs_per_s": round(files_rate, 2),
        "ratio_cache_over_files": round(cache_rate / files_rate, 3),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", help="a SPair-71k folder (default: generate one)")
    parser.add_argument("--pairs", type=int, default=400, help="pairs to generate without --root")
    parser.add_argument("--image-size", type=int, default=320, help="network input side, px")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--passes", type=int, default=3, help="timed passes over each path")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; the last line of standard output is its JSON object: the settings,
    ``cache_pairs_per_s``, ``files_pairs_per_s`` and ``ratio_cache_over_files``."""
    args = build_parser().parse_args(argv)
    if args.pairs < 1 or args.passes < 1:
        raise SystemExit("--pairs and --passes must be at least 1")
    with tempfile.TemporaryDirectory(prefix="guided-flow-data-bench-") as scratch:
        if args.root is None:
            root = Path(scratch) / "spair71k"
            log(f"generating {args.pairs} pairs under {root}")
            write_dataset(root, args.pairs)
        else:
            root = Path(args.root)
        result = measure(root, Path(scratch) / "cache", args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
