"""``guided-flow download <benchmark> --root DIR``: fetch and unpack a benchmark's official files.

Each benchmark is a list of :class:`Remote` files: archives unpacked into ``DIR`` (a top folder
of the archive may be stripped, so that ``DIR`` is the data module's ``--data.root``) and pair
lists saved at a path under ``DIR``. A download is written to ``DIR/.download/`` and checked
against the size the server announces and, where known, an MD5 checksum before it is unpacked
(into a temporary folder, then moved into place) and deleted. When ``DIR`` already holds every
expected path nothing is fetched.

Without network access (or with ``--offline``) the command fetches nothing, prints exactly which
files to place where, and exits with status 1. Network access happens only through :func:`fetch`,
only when the command runs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tarfile
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from guided_flow.errors import DataError

_WILLOW = "https://www.di.ens.fr/willow/research"
_NCNET = "https://raw.githubusercontent.com/ignacio-rocco/ncnet/master/datasets/pf-pascal"


@dataclass(frozen=True)
class Remote:
    """One official file. ``save_as``: for a plain file, its path under the root; for an
    archive (``save_as`` empty), it is unpacked into the root, without its top folder ``strip``.
    ``inner``: an archive inside this one (path in the unpacked tree) to unpack instead.
    ``md5`` (of the downloaded file, or of ``inner``) is checked where known."""

    url: str
    gives: str
    save_as: str = ""
    strip: str = ""
    md5: str | None = None
    inner: str = ""
    inner_md5: str | None = None

    @property
    def filename(self) -> str:
        """The file name of the download."""
        return PurePosixPath(self.url).name


@dataclass(frozen=True)
class Benchmark:
    """A benchmark's files and the paths (under the root) that must exist once it is in
    place; ``optional``: files skipped with ``--no-voc``."""

    remotes: tuple[Remote, ...]
    expected: tuple[str, ...]
    optional: tuple[Remote, ...] = ()
    optional_expected: tuple[str, ...] = ()


_VOC = Remote(
    url="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
    gives="VOCdevkit/VOC2012/ (SegmentationClass, SegmentationObject: the training masks)",
    md5="6cd6e144f989b92b3379bac3b3de84fd",
)

BENCHMARKS: dict[str, Benchmark] = {
    "spair": Benchmark(
        remotes=(
            Remote(
                url="http://cvlab.postech.ac.kr/research/SPair-71k/data/SPair-71k.tar.gz",
                gives="Layout/, PairAnnotation/, JPEGImages/, Segmentation/",
                strip="SPair-71k",
            ),
        ),
        expected=("Layout/large/test.txt", "PairAnnotation/test", "JPEGImages"),
    ),
    "pf-pascal": Benchmark(
        remotes=(
            Remote(
                url=f"{_WILLOW}/proposalflow/dataset/PF-dataset-PASCAL.zip",
                gives="PF-dataset-PASCAL/ (JPEGImages, Annotations)",
            ),
            *(
                Remote(
                    url=f"{_NCNET}/image_pairs/{split}_pairs.csv",
                    gives=f"the {split} pair list",
                    save_as=f"image_pairs/{split}_pairs.csv",
                )
                for split in ("train", "val", "test")
            ),
        ),
        expected=(
            "PF-dataset-PASCAL/JPEGImages",
            "image_pairs/train_pairs.csv",
            "image_pairs/val_pairs.csv",
            "image_pairs/test_pairs.csv",
        ),
        optional=(_VOC,),
        optional_expected=("VOCdevkit/VOC2012/SegmentationClass",),
    ),
    "pf-willow": Benchmark(
        remotes=(
            Remote(
                url=f"{_WILLOW}/proposalflow/dataset/PF-dataset.zip",
                gives="PF-dataset/<category>/ (the images)",
            ),
            Remote(
                url=f"{_WILLOW}/cnngeometric/other_resources/test_pairs_pf.csv",
                gives="the test pair list",
                save_as="test_pairs_pf.csv",
            ),
        ),
        expected=("PF-dataset", "test_pairs_pf.csv"),
    ),
    "caltech": Benchmark(
        remotes=(
            Remote(
                url="https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip",
                gives="101_ObjectCategories/<category>/ (the images)",
                inner="caltech-101/101_ObjectCategories.tar.gz",
                inner_md5="b224c7392d521a49829488ab0f1120d9",
            ),
            Remote(
                url=f"{_WILLOW}/weakalign/other_resources/test_pairs_caltech_with_category.csv",
                gives="the test pair list with polygons",
                save_as="test_pairs_caltech_with_category.csv",
            ),
        ),
        expected=("101_ObjectCategories", "test_pairs_caltech_with_category.csv"),
    ),
}


def fetch(url: str, destination: Path, timeout: float = 60.0) -> int | None:
    """Stream ``url`` into ``destination``. Returns the size the server announced (bytes), or
    None. Raises OSError (``urllib.error.URLError`` included) when the server cannot be
    reached."""
    with urllib.request.urlopen(url, timeout=timeout) as response, destination.open("wb") as out:
        announced = response.headers.get("Content-Length")
        shutil.copyfileobj(response, out, 1 << 20)
    return int(announced) if announced else None


def md5sum(path: Path) -> str:
    """The MD5 hex digest of a file."""
    digest = hashlib.md5()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_md5(path: Path, expected: str | None, url: str) -> None:
    if expected is not None and (found := md5sum(path)) != expected:
        raise DataError(
            f"{path}: MD5 {found} differs from the official {expected} ({url}); "
            "the download is corrupt: delete it and try again"
        )


def _safe_members(names: Sequence[str], archive: Path) -> None:
    """Refuse archives whose members would land outside the unpack folder."""
    for name in names:
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or ".." in parts:
            raise DataError(f"{archive}: member {name!r} would be written outside the root")


def unpack(archive: Path, destination: Path) -> None:
    """Unpack a ``.zip`` or ``.tar[.gz]`` archive into ``destination``."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as handle:
            _safe_members(handle.namelist(), archive)
            handle.extractall(destination)
        return
    try:
        with tarfile.open(archive) as handle:
            members = handle.getmembers()
            _safe_members([member.name for member in members], archive)
            if hasattr(tarfile, "data_filter"):
                handle.extractall(destination, filter="data")
            else:
                handle.extractall(destination, members=[m for m in members if not m.issym()])
    except tarfile.TarError as error:
        raise DataError(f"{archive}: not a zip or tar archive ({error})") from error


def merge_into(source: Path, destination: Path) -> None:
    """Move the contents of folder ``source`` into ``destination``, merging folders and
    replacing files; ``source`` is removed."""
    destination.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        target = destination / entry.name
        if entry.is_dir() and target.is_dir():
            merge_into(entry, target)
        else:
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    source.rmdir()


def _download(remote: Remote, folder: Path) -> Path:
    """Fetch ``remote`` into ``folder`` and check its size and checksum."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / remote.filename
    partial = path.with_name(f"{path.name}.part")
    announced = fetch(remote.url, partial)
    if announced is not None and partial.stat().st_size != announced:
        size = partial.stat().st_size
        partial.unlink()
        raise DataError(f"{remote.url}: received {size} bytes, the server announced {announced}")
    _check_md5(partial, remote.md5, remote.url)
    os.replace(partial, path)
    return path


def install(remote: Remote, root: Path) -> None:
    """Fetch one file and put it in place under ``root``."""
    downloads = root / ".download"
    path = _download(remote, downloads)
    if remote.save_as:
        target = root / remote.save_as
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        return
    unpacked = downloads / f"{remote.filename}.unpacked"
    shutil.rmtree(unpacked, ignore_errors=True)
    try:
        unpack(path, unpacked)
        if remote.inner:
            inner = unpacked / remote.inner
            if not inner.is_file():
                raise DataError(f"{remote.url}: the archive has no {remote.inner}")
            _check_md5(inner, remote.inner_md5, f"{remote.url}:{remote.inner}")
            nested = downloads / f"{inner.name}.unpacked"
            shutil.rmtree(nested, ignore_errors=True)
            unpack(inner, nested)
            shutil.rmtree(unpacked)
            unpacked = nested
        top = unpacked / remote.strip if remote.strip else unpacked
        if not top.is_dir():
            raise DataError(f"{remote.url}: the archive has no top folder {remote.strip}/")
        merge_into(top, root)
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)
        path.unlink(missing_ok=True)


def instructions(name: str, root: Path, remotes: Sequence[Remote], expected: Sequence[str]) -> str:
    """Which files to place where, by hand, for ``name`` under ``root``."""
    lines = [f"Place the {name} files by hand under {root}:"]
    for remote in remotes:
        lines.append(f"  {remote.url}")
        if remote.save_as:
            lines.append(f"    -> save as {root / remote.save_as}")
            continue
        source = f"{remote.inner} from inside it" if remote.inner else "it"
        strip = f" without its top folder {remote.strip}/" if remote.strip else ""
        lines.append(f"    -> unpack {source} into {root}{strip}: gives {remote.gives}")
        if remote.md5:
            lines.append(f"       (MD5 of {remote.filename}: {remote.md5})")
        if remote.inner_md5:
            lines.append(f"       (MD5 of {PurePosixPath(remote.inner).name}: {remote.inner_md5})")
    lines.append("Afterwards these must exist:")
    lines += [f"  {root / path}" for path in expected]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``guided-flow download``."""
    parser = argparse.ArgumentParser(
        prog="guided-flow download",
        description="Fetch and unpack a benchmark's official files into --root (or, offline, "
        "print which files to place where).",
    )
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS))
    parser.add_argument("--root", required=True, type=Path, help="the benchmark's --data.root")
    parser.add_argument(
        "--offline", action="store_true", help="fetch nothing; print the files to place by hand"
    )
    parser.add_argument(
        "--no-voc",
        action="store_true",
        help="pf-pascal: skip PASCAL VOC 2012 (2 GB; its masks are needed by stage 2 only)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns 0 when the files are in place, 1 when they must be placed by
    hand (the instructions are printed)."""
    args = build_parser().parse_args(argv)
    benchmark = BENCHMARKS[args.benchmark]
    root: Path = args.root
    remotes, expected = benchmark.remotes, benchmark.expected
    if not args.no_voc:
        remotes, expected = remotes + benchmark.optional, expected + benchmark.optional_expected
    missing = [path for path in expected if not (root / path).exists()]
    if not missing:
        print(f"{args.benchmark}: every expected file is already under {root}")
        return 0
    if args.offline:
        print(instructions(args.benchmark, root, remotes, expected))
        return 1
    root.mkdir(parents=True, exist_ok=True)
    for remote in remotes:
        print(f"{args.benchmark}: fetching {remote.url}", flush=True)
        try:
            install(remote, root)
        except OSError as error:
            print(f"guided-flow download: cannot fetch {remote.url} ({error})", file=sys.stderr)
            print(instructions(args.benchmark, root, remotes, expected))
            return 1
    missing = [path for path in expected if not (root / path).exists()]
    if missing:
        raise DataError(
            f"{root}: the official files did not give {', '.join(missing)}; "
            "the archives' layout may have changed"
        )
    shutil.rmtree(root / ".download", ignore_errors=True)
    print(f"{args.benchmark}: done; use --data.root {root}")
    return 0
