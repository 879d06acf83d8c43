"""The HDF5 image cache: fingerprints, atomic builds, validation, per-process reading."""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from torch.utils.data import DataLoader, Dataset

from data_modules.cache import (
    CacheItem,
    ImageCache,
    ensure_cache,
    fingerprint,
    validate_cache,
)
from guided_flow.errors import CacheError, DataError


def make_items(count: int = 3, size: int = 8, masks: bool = False) -> Iterator[CacheItem]:
    for i in range(count):
        yield CacheItem(
            name=f"dir/image_{i}.png",
            image=np.full((size, size + 2, 3), 10 * i, dtype=np.uint8),
            original_size=(100 + i, 200 + i),
            mask=np.full((size, size + 2), i, dtype=np.uint8) if masks else None,
            extra={"keypoints": np.full((4, 2), float(i), dtype=np.float32)},
        )


class CountingBuild:
    """A build function that records how often it runs."""

    def __init__(self, **kwargs) -> None:
        self.calls, self.kwargs = 0, kwargs

    def __call__(self) -> Iterator[CacheItem]:
        self.calls += 1
        return make_items(**self.kwargs)


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if ".tmp" in path.name)


def test_fingerprint_follows_files_and_options(tmp_path: Path) -> None:
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"123")
    base = fingerprint(["a.png", "b.png"], root=tmp_path, image_size=64)
    assert base == fingerprint(["b.png", "a.png"], root=tmp_path, image_size=64)
    assert base != fingerprint(["a.png"], root=tmp_path, image_size=64)
    assert base != fingerprint(["a.png", "b.png"], root=tmp_path, image_size=65)
    (tmp_path / "b.png").write_bytes(b"12345")
    assert base != fingerprint(["a.png", "b.png"], root=tmp_path, image_size=64)
    with pytest.raises(DataError, match="missing.png"):
        fingerprint(["missing.png"], root=tmp_path)


def test_cache_is_built_once_then_reused(tmp_path: Path) -> None:
    path, build = tmp_path / "cache" / "images.h5", CountingBuild()
    header = ensure_cache(path, "fp-1", build)
    assert build.calls == 1 and header.count == 3 and header.image_size == (8, 10)
    stamp = path.stat().st_mtime_ns
    ensure_cache(path, "fp-1", build)
    assert build.calls == 1 and path.stat().st_mtime_ns == stamp
    assert leftovers(path.parent) == []


def test_cache_is_rebuilt_when_the_fingerprint_changes(tmp_path: Path) -> None:
    path = tmp_path / "images.h5"
    ensure_cache(path, "fp-1", CountingBuild(count=3))
    build = CountingBuild(count=5)
    header = ensure_cache(path, "fp-2", build)
    assert build.calls == 1 and header.count == 5 and header.fingerprint == "fp-2"
    with pytest.raises(CacheError, match="stale"):
        ImageCache(path, "fp-1")


def test_cache_of_another_schema_version_is_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "images.h5"
    ensure_cache(path, "fp", CountingBuild())
    with h5py.File(path, "r+") as handle:
        handle.attrs["schema_version"] = 0
    with pytest.raises(CacheError, match="schema version 0"):
        validate_cache(path)
    build = CountingBuild()
    ensure_cache(path, "fp", build)
    assert build.calls == 1


def test_items_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "images.h5"
    ensure_cache(path, "fp", CountingBuild(masks=True))
    cache = ImageCache(path, "fp")
    assert len(cache) == 3
    assert cache.names == ["dir/image_0.png", "dir/image_1.png", "dir/image_2.png"]
    assert cache.original_sizes.tolist() == [[100, 200], [101, 201], [102, 202]]
    item = cache[2]
    assert item["image"].shape == (8, 10, 3) and item["image"].dtype == np.uint8
    assert (item["image"] == 20).all() and (item["mask"] == 2).all()
    assert (item["keypoints"] == 2.0).all() and item["keypoints"].shape == (4, 2)
    with pytest.raises(IndexError):
        cache[3]


def test_truncated_file_raises_naming_it_and_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "images.h5"
    ensure_cache(path, "fp", CountingBuild())
    size = path.stat().st_size
    with path.open("r+b") as file:
        file.truncate(size // 2)
    with pytest.raises(CacheError, match="images.h5.*truncated"):
        ImageCache(path, "fp")
    build = CountingBuild()
    with pytest.raises(CacheError, match="images.h5"):
        ensure_cache(path, "fp", build)
    assert build.calls == 0 and path.stat().st_size == size // 2


def test_foreign_hdf5_file_raises_and_is_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "theirs.h5"
    with h5py.File(path, "w") as handle:
        handle["images"] = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    stamp = path.stat().st_mtime_ns
    for action in (lambda: ImageCache(path), lambda: ensure_cache(path, "fp", CountingBuild())):
        with pytest.raises(CacheError, match="theirs.h5.*foreign"):
            action()
    assert path.stat().st_mtime_ns == stamp


def test_not_hdf5_and_missing_files_raise(tmp_path: Path) -> None:
    path = tmp_path / "text.h5"
    path.write_text("not hdf5")
    with pytest.raises(CacheError, match="text.h5"):
        ImageCache(path)
    with pytest.raises(CacheError, match="absent.h5.*does not exist"):
        ImageCache(tmp_path / "absent.h5")


def test_damaged_layout_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "images.h5"
    ensure_cache(path, "fp", CountingBuild())
    with h5py.File(path, "r+") as handle:
        del handle["names"]
    with pytest.raises(CacheError, match="'names'"):
        ImageCache(path)
    ensure_cache(path, "fp-new", CountingBuild())
    with h5py.File(path, "r+") as handle:
        handle.attrs["count"] = 7
    with pytest.raises(CacheError, match="images.h5.*'images'"):
        ImageCache(path)


def test_failing_build_leaves_no_temporary_and_keeps_the_old_cache(tmp_path: Path) -> None:
    path = tmp_path / "images.h5"
    ensure_cache(path, "fp-1", CountingBuild())
    stamp = path.stat().st_mtime_ns

    def broken() -> Iterator[CacheItem]:
        yield from make_items(2)
        raise DataError("photo.png: cannot read the image")

    with pytest.raises(DataError, match="photo.png"):
        ensure_cache(path, "fp-2", broken)
    assert leftovers(tmp_path) == [] and path.stat().st_mtime_ns == stamp
    assert len(ImageCache(path, "fp-1")) == 3
    with pytest.raises(DataError, match="photo.png"):
        ensure_cache(tmp_path / "new.h5", "fp", broken)
    assert not (tmp_path / "new.h5").exists() and leftovers(tmp_path) == []


def test_inconsistent_items_are_rejected(tmp_path: Path) -> None:
    def mixed() -> Iterator[CacheItem]:
        yield from make_items(1, size=8)
        yield from make_items(1, size=9)

    with pytest.raises(CacheError, match="shape"):
        ensure_cache(tmp_path / "mixed.h5", "fp", mixed)
    with pytest.raises(CacheError, match="no items"):
        ensure_cache(tmp_path / "empty.h5", "fp", lambda: iter(()))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


class CacheDataset(Dataset):
    def __init__(self, cache: ImageCache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> tuple[int, int]:
        return int(self.cache[index]["image"][0, 0, 0]), os.getpid()


def test_handle_opens_lazily_per_process_and_is_never_pickled(tmp_path: Path) -> None:
    path = tmp_path / "images.h5"
    ensure_cache(path, "fp", CountingBuild())
    cache = ImageCache(path, "fp")
    assert cache._handle is None  # nothing open until the first item is read
    assert cache[1]["image"][0, 0, 0] == 10 and cache._pid == os.getpid()
    copy = pickle.loads(pickle.dumps(cache))
    assert copy._handle is None and copy[2]["image"][0, 0, 0] == 20
    loader = DataLoader(CacheDataset(cache), batch_size=None, num_workers=1)
    values, pids = zip(*list(loader), strict=True)
    assert list(values) == [0, 10, 20] and os.getpid() not in set(pids)
    cache.close()
    assert cache._handle is None and cache[0]["image"][0, 0, 0] == 0
