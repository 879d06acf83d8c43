"""The HDF5 image cache shared by every data module.

One file holds N images resized to one size, plus per-item data:

- ``images``: ``N x H x W x 3`` uint8; ``masks`` (optional): ``N x H x W`` uint8;
- ``names``: N UTF-8 strings (the source file's relative path or name);
- ``original_sizes``: ``N x 2`` int64, (H, W) of each image before resizing;
- ``extra/<key>``: ``N x ...`` arrays a caller adds (keypoints, ...), one fixed shape per key;
- attributes ``format``, ``schema_version``, ``count`` and ``fingerprint`` (of the source files
  and the options).

Builds are atomic (written to ``<file>.tmp-<pid>``, then renamed), so a file at the final path is
always complete. A file that is unreadable, truncated or not one of ours raises
:class:`~guided_flow.errors.CacheError`; it is never reused silently, and never overwritten
(it may be someone else's data). A file of ours whose fingerprint or schema version differs is
stale: :func:`ensure_cache` rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from guided_flow.errors import CacheError, DataError
from guided_flow.io.images import resize_image

SCHEMA_VERSION = 1
CACHE_FORMAT = "guided-flow image cache"


@dataclass
class CacheItem:
    """One item to store: ``image`` ``H x W x 3`` uint8 (already resized), ``original_size``
    (H, W) of the source file, optional ``mask`` ``H x W`` uint8 and ``extra`` arrays (the same
    keys and shapes for every item of a cache)."""

    name: str
    image: np.ndarray
    original_size: tuple[int, int]
    mask: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def masked_cache_item(
    folder: Path,
    relative: str,
    image: np.ndarray,
    size: tuple[int, int],
    labels: np.ndarray | None,
    mask_path: Path | None,
) -> CacheItem:
    """The cache item of image ``folder / relative`` (``H x W x 3`` uint8) resized to ``size``,
    with its label map ``labels`` (``H x W`` uint8, resized nearest; None: the split has no
    masks) and ``has_mask`` (whether it came from ``mask_path``, a file). A map of another size
    than its image raises DataError naming both files."""
    mask, extra = None, {}
    if labels is not None:
        if labels.shape != image.shape[:2]:
            raise DataError(
                f"{mask_path}: mask size {labels.shape[::-1]} differs from its image "
                f"{folder / relative} ({image.shape[1]} x {image.shape[0]})"
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


@dataclass(frozen=True, eq=False)
class CacheHeader:
    """What :func:`validate_cache` found in a valid cache file."""

    path: Path
    fingerprint: str
    count: int
    image_size: tuple[int, int]
    has_masks: bool
    extra_keys: tuple[str, ...]
    names: tuple[str, ...]
    original_sizes: np.ndarray  # N x 2 int64, (H, W)


def fingerprint(
    files: Iterable[str | Path] = (), root: str | Path | None = None, **config: Any
) -> str:
    """SHA-1 of the sorted ``(relative path, size, mtime_ns)`` of ``files`` (relative to ``root``
    when given) and of the JSON of ``config`` (image size, options, ... any JSON-able values).
    A missing file raises :class:`~guided_flow.errors.DataError` naming it."""
    entries = []
    for file in files:
        path = Path(root, file) if root is not None else Path(file)
        try:
            stat = path.stat()
        except OSError as error:
            raise DataError(f"{path}: cannot read the file ({error})") from error
        relative = path.relative_to(root).as_posix() if root is not None else path.as_posix()
        entries.append((relative, stat.st_size, stat.st_mtime_ns))
    payload = json.dumps({"files": sorted(entries), "config": config}, sort_keys=True, default=str)
    return hashlib.sha1(payload.encode("utf-8")).hexdigest()


_READ_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError, AttributeError)


@contextmanager
def _reading(path: Path) -> Iterator[h5py.File]:
    """Open ``path`` read-only; any failure to open or read it inside the block becomes a
    CacheError naming the file."""
    if not path.is_file():
        raise CacheError(f"{path}: the cache file does not exist")
    try:
        with h5py.File(path, "r", locking=False) as handle:
            yield handle
    except _READ_ERRORS as error:
        raise CacheError(
            f"{path}: cannot be read as an HDF5 cache (truncated or corrupt?): {error}; "
            "delete it to rebuild"
        ) from error


def _check_ours(path: Path, handle: h5py.File) -> None:
    if handle.attrs.get("format") != CACHE_FORMAT:
        raise CacheError(
            f"{path}: a foreign HDF5 file, not a guided-flow image cache; it is left untouched: "
            "move it away or choose another cache directory"
        )


def _is_current(path: Path, expected_fingerprint: str) -> bool:
    """True when ``path`` is a cache of ours with this schema and fingerprint, False when it is
    absent or stale; raises CacheError when it is unreadable or foreign."""
    if not path.exists():
        return False
    with _reading(path) as handle:
        _check_ours(path, handle)
        return (
            handle.attrs.get("schema_version") == SCHEMA_VERSION
            and handle.attrs.get("fingerprint") == expected_fingerprint
        )


def _expect_shape(path: Path, name: str, dataset: Any, shape: tuple[int, ...]) -> None:
    if not isinstance(dataset, h5py.Dataset) or dataset.shape[: len(shape)] != shape:
        found = getattr(dataset, "shape", "missing")
        raise CacheError(f"{path}: dataset '{name}' has shape {found}, expected {shape}")


def validate_cache(path: str | Path, expected_fingerprint: str | None = None) -> CacheHeader:
    """Check a cache file: ours, this schema version, the fingerprint (when given), the image
    count, every dataset's shape, and that its names, sizes and first and last images read back.
    Returns its :class:`CacheHeader`; raises :class:`~guided_flow.errors.CacheError` naming the
    file and the problem."""
    path = Path(path)
    with _reading(path) as handle:
        _check_ours(path, handle)
        version = handle.attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise CacheError(
                f"{path}: schema version {version}, this code reads {SCHEMA_VERSION}: rebuild it"
            )
        stored = str(handle.attrs.get("fingerprint"))
        if expected_fingerprint is not None and stored != expected_fingerprint:
            raise CacheError(f"{path}: stale cache: its source or options changed; rebuild it")
        count = int(handle.attrs.get("count", -1))
        images = handle.get("images")
        if count < 1 or not isinstance(images, h5py.Dataset) or images.ndim != 4:
            raise CacheError(f"{path}: incomplete cache (count {count}, images {images})")
        height, width = images.shape[1:3]
        _expect_shape(path, "images", images, (count, height, width, 3))
        _expect_shape(path, "names", handle.get("names"), (count,))
        _expect_shape(path, "original_sizes", handle.get("original_sizes"), (count, 2))
        has_masks = "masks" in handle
        if has_masks:
            _expect_shape(path, "masks", handle["masks"], (count, height, width))
        extra = handle.get("extra", {})
        for key in extra:
            _expect_shape(path, f"extra/{key}", extra[key], (count,))
        _ = images[0], images[count - 1]  # reading them checks that the data is there
        return CacheHeader(
            path=path,
            fingerprint=stored,
            count=count,
            image_size=(height, width),
            has_masks=has_masks,
            extra_keys=tuple(extra),
            names=tuple(handle["names"].asstr()[()]),
            original_sizes=handle["original_sizes"][()].astype(np.int64),
        )


class _Writer:
    """Appends :class:`CacheItem` s to an open HDF5 file; the first item fixes the layout (mask or
    not, extra keys, every shape)."""

    def __init__(self, path: Path, handle: h5py.File) -> None:
        self.path, self.handle = path, handle
        self.names: list[str] = []
        self.sizes: list[tuple[int, int]] = []
        self.layout: tuple[bool, set[str]] | None = None

    def _append(self, name: str, value: np.ndarray) -> None:
        if name not in self.handle:
            self.handle.create_dataset(
                name,
                shape=(0, *value.shape),
                maxshape=(None, *value.shape),
                dtype=value.dtype,
                chunks=(1, *value.shape),
            )
        dataset = self.handle[name]
        if value.shape != dataset.shape[1:]:
            raise CacheError(
                f"{self.path}: item '{self.names[-1]}': '{name}' has shape {value.shape}, "
                f"earlier items {dataset.shape[1:]}"
            )
        dataset.resize(dataset.shape[0] + 1, axis=0)
        dataset[-1] = value

    def add(self, item: CacheItem) -> None:
        self.names.append(item.name)
        layout = (item.mask is not None, set(item.extra))
        self.layout = self.layout or layout
        if layout != self.layout:
            raise CacheError(
                f"{self.path}: item '{item.name}' has (mask, extra keys) {layout}, "
                f"earlier items {self.layout}"
            )
        if item.image.ndim != 3 or item.image.shape[2] != 3:
            raise CacheError(f"{self.path}: item '{item.name}': image shape {item.image.shape}")
        self._append("images", np.asarray(item.image, dtype=np.uint8))
        if item.mask is not None:
            self._append("masks", np.asarray(item.mask, dtype=np.uint8))
        for key, value in item.extra.items():
            self._append(f"extra/{key}", np.asarray(value))
        self.sizes.append((int(item.original_size[0]), int(item.original_size[1])))

    def finish(self, expected_fingerprint: str) -> None:
        if not self.names:
            raise CacheError(f"{self.path}: the build produced no items")
        self.handle.create_dataset("names", data=self.names, dtype=h5py.string_dtype())
        self.handle.create_dataset("original_sizes", data=np.asarray(self.sizes, dtype=np.int64))
        self.handle.attrs.update(
            format=CACHE_FORMAT,
            schema_version=SCHEMA_VERSION,
            fingerprint=expected_fingerprint,
            count=len(self.names),
        )


def build_cache(
    path: str | Path, expected_fingerprint: str, build_fn: Callable[[], Iterable[CacheItem]]
) -> None:
    """Write the items of ``build_fn()`` to ``path`` atomically: into ``<path>.tmp-<pid>``,
    renamed over ``path`` only when complete; the temporary file is removed on any failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(temporary, "w") as handle:
            writer = _Writer(path, handle)
            for item in build_fn():
                writer.add(item)
            writer.finish(expected_fingerprint)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def ensure_cache(
    path: str | Path, expected_fingerprint: str, build_fn: Callable[[], Iterable[CacheItem]]
) -> CacheHeader:
    """Build the cache at ``path`` when it is absent or stale (another fingerprint or schema
    version), then validate it. A foreign or unreadable file raises
    :class:`~guided_flow.errors.CacheError` and is left in place."""
    path = Path(path)
    if not _is_current(path, expected_fingerprint):
        build_cache(path, expected_fingerprint, build_fn)
    return validate_cache(path, expected_fingerprint)


class ImageCache:
    """Read access to a validated cache. The HDF5 handle is opened lazily on first access in each
    process (DataLoader workers included) and is never pickled.

    ``cache[i]`` is a dict: ``image`` ``H x W x 3`` uint8, ``mask`` ``H x W`` uint8 (when stored)
    and each extra key. ``names`` and ``original_sizes`` (``N x 2`` (H, W)) are loaded up front.
    """

    def __init__(self, path: str | Path, expected_fingerprint: str | None = None) -> None:
        self.header = validate_cache(path, expected_fingerprint)
        self.path = self.header.path
        self.names: list[str] = list(self.header.names)
        self.original_sizes: np.ndarray = self.header.original_sizes
        self._handle: h5py.File | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.header.count

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: index {index} outside [0, {len(self)})")
        try:
            if self._handle is None or self._pid != os.getpid():
                self._handle = h5py.File(self.path, "r", locking=False)
                self._pid = os.getpid()
            item = {"image": self._handle["images"][index]}
            if self.header.has_masks:
                item["mask"] = self._handle["masks"][index]
            for key in self.header.extra_keys:
                item[key] = self._handle["extra"][key][index]
        except _READ_ERRORS as error:
            raise CacheError(f"{self.path}: cannot read item {index} ({error})") from error
        return item

    def close(self) -> None:
        """Close this process's handle (it reopens on the next access)."""
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = self._pid = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = state["_pid"] = None
        return state


def cached_image(cache: ImageCache, row: int) -> tuple[np.ndarray, np.ndarray | None, bool]:
    """Image ``row`` of ``cache``: ``H x W x 3`` uint8, its label map ``H x W`` uint8 (None when
    the cache has no masks) and whether the image has a mask (:func:`masked_cache_item`)."""
    item = cache[row]
    has_mask = bool(item["has_mask"]) if "has_mask" in item else item.get("mask") is not None
    return item["image"], item.get("mask"), has_mask
