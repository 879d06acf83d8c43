"""`guided-flow download`: offline instructions, unpacking into the data modules' layouts, size
and checksum checks. The network is never used: the fetcher is replaced by a local one."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
import urllib.error
import zipfile
from pathlib import Path

import pytest

from guided_flow.cli import download
from guided_flow.cli import main as cli
from guided_flow.errors import DataError


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class Server:
    """A fake fetcher serving ``files`` (url -> bytes); ``announce`` overrides the announced
    size."""

    def __init__(self, files: dict[str, bytes], announce: int | None = None) -> None:
        self.files, self.announce, self.calls = files, announce, []

    def __call__(self, url: str, destination: Path, timeout: float = 60.0) -> int | None:
        self.calls.append(url)
        destination.write_bytes(self.files[url])
        return self.announce if self.announce is not None else len(self.files[url])


def urls(name: str) -> list[str]:
    return [remote.url for remote in download.BENCHMARKS[name].remotes]


def willow_files() -> dict[str, bytes]:
    archive, pairs = urls("pf-willow")
    return {
        archive: zip_bytes({"PF-dataset/car(G)/car(G)_001.png": b"png"}),
        pairs: b"imageA,imageB\n",
    }


def offline(url: str, destination: Path, timeout: float = 60.0) -> int:
    raise urllib.error.URLError("Temporary failure in name resolution")


@pytest.mark.parametrize("benchmark", sorted(download.BENCHMARKS))
def test_offline_prints_which_files_to_place_where(tmp_path, monkeypatch, capsys, benchmark):
    monkeypatch.setattr(download, "fetch", offline)
    root = tmp_path / "data"
    assert download.main([benchmark, "--root", str(root)]) == 1
    out, err = capsys.readouterr()
    assert "cannot fetch" in err and "Temporary failure" in err
    spec = download.BENCHMARKS[benchmark]
    for remote in (*spec.remotes, *spec.optional):
        assert remote.url in out
        if remote.save_as:
            assert f"-> save as {root / remote.save_as}" in out
        else:
            assert f"into {root}" in out
    for path in (*spec.expected, *spec.optional_expected):
        assert f"  {root / path}" in out
    assert not (root / ".download").exists() or not any((root / ".download").rglob("*.zip"))


def test_offline_flag_never_touches_the_network(tmp_path, monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("no network access with --offline")

    monkeypatch.setattr(download, "fetch", forbidden)
    assert cli.main(["download", "caltech", "--root", str(tmp_path), "--offline"]) == 1
    out = capsys.readouterr().out
    assert "caltech-101/101_ObjectCategories.tar.gz from inside it" in out
    assert "b224c7392d521a49829488ab0f1120d9" in out


def test_archives_and_lists_land_in_the_data_module_layout(tmp_path, monkeypatch, capsys):
    server = Server(willow_files())
    monkeypatch.setattr(download, "fetch", server)
    root = tmp_path / "willow"
    assert download.main(["pf-willow", "--root", str(root)]) == 0
    assert (root / "PF-dataset" / "car(G)" / "car(G)_001.png").read_bytes() == b"png"
    assert (root / "test_pairs_pf.csv").read_text() == "imageA,imageB\n"
    assert not (root / ".download").exists()
    assert "--data.root" in capsys.readouterr().out
    # a second run finds everything in place and fetches nothing
    assert download.main(["pf-willow", "--root", str(root)]) == 0
    assert len(server.calls) == 2


def test_top_folder_is_stripped_and_existing_folders_merged(tmp_path, monkeypatch):
    (url,) = urls("spair")
    files = {
        "SPair-71k/Layout/large/test.txt": b"pair\n",
        "SPair-71k/PairAnnotation/test/pair.json": b"{}",
        "SPair-71k/JPEGImages/cat/a.jpg": b"jpg",
    }
    monkeypatch.setattr(download, "fetch", Server({url: tar_bytes(files)}))
    root = tmp_path / "spair"
    (root / "JPEGImages" / "dog").mkdir(parents=True)
    assert download.main(["spair", "--root", str(root)]) == 0
    assert (root / "Layout" / "large" / "test.txt").read_text() == "pair\n"
    assert (root / "JPEGImages" / "cat" / "a.jpg").is_file() and (
        root / "JPEGImages" / "dog"
    ).is_dir()


def caltech_server(monkeypatch, inner_md5: str | None = None) -> Server:
    archive, pairs = urls("caltech")
    inner = tar_bytes({"101_ObjectCategories/ant/image_0001.jpg": b"jpg"})
    spec = download.BENCHMARKS["caltech"]
    digest = inner_md5 or hashlib.md5(inner).hexdigest()
    remotes = (dataclasses.replace(spec.remotes[0], inner_md5=digest), spec.remotes[1])
    monkeypatch.setitem(download.BENCHMARKS, "caltech", dataclasses.replace(spec, remotes=remotes))
    server = Server(
        {
            archive: zip_bytes(
                {"caltech-101/101_ObjectCategories.tar.gz": inner, "caltech-101/x": b""}
            ),
            pairs: b"source_image,target_image,class,XA,YA,XB,YB\n",
        }
    )
    monkeypatch.setattr(download, "fetch", server)
    return server


def test_an_archive_inside_an_archive_is_checked_and_unpacked(tmp_path, monkeypatch):
    caltech_server(monkeypatch)
    root = tmp_path / "caltech"
    assert download.main(["caltech", "--root", str(root)]) == 0
    assert (root / "101_ObjectCategories" / "ant" / "image_0001.jpg").read_bytes() == b"jpg"
    assert (root / "test_pairs_caltech_with_category.csv").is_file()
    assert not (root / "caltech-101").exists()


def test_checksum_and_size_mismatches_stop_with_the_file_named(tmp_path, monkeypatch, capsys):
    caltech_server(monkeypatch, inner_md5="0" * 32)
    with pytest.raises(DataError, match="MD5 .* differs from the official 0000"):
        download.main(["caltech", "--root", str(tmp_path / "a")])
    assert cli.main(["download", "caltech", "--root", str(tmp_path / "b")]) == 2
    assert "101_ObjectCategories.tar.gz" in capsys.readouterr().err
    server = Server(willow_files(), announce=10**6)
    monkeypatch.setattr(download, "fetch", server)
    with pytest.raises(DataError, match="server announced 1000000"):
        download.main(["pf-willow", "--root", str(tmp_path / "c")])


def test_members_outside_the_root_are_refused(tmp_path, monkeypatch):
    files = willow_files()
    archive = urls("pf-willow")[0]
    files[archive] = zip_bytes({"../escaped.txt": b"x", "PF-dataset/a.png": b"png"})
    monkeypatch.setattr(download, "fetch", Server(files))
    with pytest.raises(DataError, match="outside the root"):
        download.main(["pf-willow", "--root", str(tmp_path / "willow")])
    assert not (tmp_path / "escaped.txt").exists()


def test_pf_pascal_without_voc(tmp_path, monkeypatch):
    archive, *lists = urls("pf-pascal")
    files = {archive: zip_bytes({"PF-dataset-PASCAL/JPEGImages/2007_000001.jpg": b"jpg"})}
    files |= {url: b"source_image,target_image,class,flip\n" for url in lists}
    server = Server(files)
    monkeypatch.setattr(download, "fetch", server)
    root = tmp_path / "pf"
    assert download.main(["pf-pascal", "--root", str(root), "--no-voc"]) == 0
    assert sorted(p.name for p in (root / "image_pairs").iterdir()) == [
        "test_pairs.csv",
        "train_pairs.csv",
        "val_pairs.csv",
    ]
    assert download.BENCHMARKS["pf-pascal"].optional[0].url not in server.calls
