"""``guided-flow match --pairs PAIRS.csv --out DIR`` and ``GuidedSemanticFlow.match_many``: many
pairs with one model, a bad row failing alone, reruns skipping complete pairs, the overview page,
and a bad CSV refused before the model loads."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from guided_flow.api import GuidedSemanticFlow, MatchResult
from guided_flow.cli import main as cli
from guided_flow.cli import match_batch
from guided_flow.cli.pair_list import PairRow, read_pairs
from guided_flow.errors import DataError, MatchFailure
from tests.test_api import textured_image

FAST = ("--input-size", "160")  # the untrained method on the smallest input the tests use
MATCH_FILES = {"warped.png", "flow_s2t.npy", "flow_s2t.flo", "flow.png", "matches.png"}


def save(path: Path, image: np.ndarray | Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path)
    return path


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def pictures(tmp_path: Path) -> dict[str, Path]:
    """Odd pictures of several sizes and modes, keypoints, and a file that is no picture."""
    grey = Image.fromarray(textured_image(80, 100, seed=3)).convert("L")
    rgba = Image.fromarray(textured_image(64, 90, seed=4)).convert("RGBA")
    (tmp_path / "kps.json").write_text(json.dumps([[10.0, 20.0], [100.5, 60.0]]))
    (tmp_path / "broken.png").write_text("this is no picture")
    return {
        "wide": save(tmp_path / "wide.png", textured_image(120, 160, seed=1)),
        "tall": save(tmp_path / "tall.jpg", textured_image(150, 64, seed=2)),
        "grey": save(tmp_path / "pictures" / "grey.png", grey),
        "rgba": save(tmp_path / "rgba.png", rgba),
        "kps": tmp_path / "kps.json",
        "broken": tmp_path / "broken.png",
    }


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the models built by the command (the untrained loader)."""
    calls: list[int] = []
    untrained = GuidedSemanticFlow.untrained.__func__

    def counted(cls: type, *args: object, **kwargs: object) -> GuidedSemanticFlow:
        calls.append(1)
        return untrained(cls, *args, **kwargs)

    monkeypatch.setattr(GuidedSemanticFlow, "untrained", classmethod(counted))
    return calls


def run(csv_path: Path, out: Path, *extra: str) -> int:
    return cli.main(["match", "--pairs", str(csv_path), "--out", str(out), *FAST, *extra])


def snapshot(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its modification time in nanoseconds."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


class Links(HTMLParser):
    """The table rows (id, class), link targets and image sources of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, str] = {}
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "tr" and values.get("id"):
            self.rows[str(values["id"])] = str(values.get("class"))
        if tag in ("a", "img"):
            self.urls.append(str(values["href" if tag == "a" else "src"]))


def read_index(out: Path) -> Links:
    parser = Links()
    parser.feed((out / "index.html").read_text(encoding="utf-8"))
    return parser


def check_pair_folder(folder: Path, source: Path, target: Path, kps: bool = False) -> None:
    """The pair's files are those of ``guided-flow match`` plus thumbnails and ``pair.json``."""
    names = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
    expected = MATCH_FILES | {"index.html", "pair.json"} | ({"keypoints.json"} if kps else set())
    row = int(folder.name.split("_")[0])
    expected |= {f"thumbs/{row:06d}_s.jpg", f"thumbs/{row:06d}_t.jpg"}
    assert names == expected
    (hs, ws), (ht, wt) = (Image.open(p).size[::-1] for p in (source, target))
    assert np.load(folder / "flow_s2t.npy").shape == (hs, ws, 2)
    assert Image.open(folder / "warped.png").size == (wt, ht)
    summary = json.loads((folder / "pair.json").read_text())
    assert summary["source"] == str(source) and summary["target"] == str(target)
    assert summary["confident_matches"] >= 0


# --- many pairs through the command -------------------------------------------------------------


def test_a_bad_row_fails_alone_and_reruns_skip_complete_pairs(tmp_path, pictures, loads, capsys):
    pairs = write_csv(
        tmp_path / "pairs.csv",
        "source,target,kps\n"
        "wide.png,tall.jpg,kps.json\n"
        "broken.png,wide.png,\n"
        "\n"  # blank lines are skipped, not counted
        f"pictures/grey.png,{pictures['rgba']},\n",  # relative to the CSV, and absolute
    )
    out = tmp_path / "out"
    assert run(pairs, out) == 1
    captured = capsys.readouterr()
    assert "3/3 pairs" in captured.err and "pair/s" in captured.err  # the progress bar
    assert "1 of 3 pairs failed" in captured.err
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert folders == ["0001_wide_tall", "0003_grey_rgba"]
    check_pair_folder(out / folders[0], pictures["wide"], pictures["tall"], kps=True)
    check_pair_folder(out / folders[1], pictures["grey"], pictures["rgba"])
    with open(out / "failures.csv", newline="") as handle:
        failures = list(csv.DictReader(handle))
    assert [row["row"] for row in failures] == ["2"]
    assert (
        failures[0]["source"] == str(pictures["broken"]) and "broken.png" in failures[0]["reason"]
    )

    index = read_index(out)  # every row, with working relative links
    assert index.rows == {"row-1": "pair", "row-2": "failed", "row-3": "pair"}
    assert {url for url in index.urls if url.endswith("index.html")} == {
        f"{name}/index.html" for name in folders
    }
    assert all((out / url).is_file() for url in index.urls), index.urls
    assert len(loads) == 1

    # Rerun: complete pairs are skipped (untouched), the failed one is tried again.
    before = snapshot(out / folders[0]), snapshot(out / folders[1])
    assert run(pairs, out) == 1
    assert (snapshot(out / folders[0]), snapshot(out / folders[1])) == before
    captured = capsys.readouterr()
    assert "2 already complete" in captured.out and "1/1 pairs" in captured.err
    # Repaired, the bad row completes and failures.csv goes; the others stay untouched.
    save(pictures["broken"], textured_image(70, 70, seed=5))
    assert run(pairs, out) == 0
    assert not (out / "failures.csv").exists()
    check_pair_folder(out / "0002_broken_wide", pictures["broken"], pictures["wide"])
    assert (snapshot(out / folders[0]), snapshot(out / folders[1])) == before
    assert set(read_index(out).rows.values()) == {"pair"}
    # Nothing left to do: the model is not even loaded.
    assert len(loads) == 3
    assert run(pairs, out) == 0 and len(loads) == 3
    # A folder missing a file is not complete: only that pair is done again.
    (out / folders[1] / "flow.png").unlink()
    assert run(pairs, out) == 0 and len(loads) == 4
    assert snapshot(out / folders[0]) == before[0]
    check_pair_folder(out / folders[1], pictures["grey"], pictures["rgba"])


def test_an_interrupted_run_never_leaves_a_folder_that_looks_complete(
    tmp_path, pictures, monkeypatch
):
    pairs = write_csv(
        tmp_path / "pairs.csv", "source,target\nwide.png,tall.jpg\nrgba.png,wide.png\n"
    )
    out = tmp_path / "out"
    real = match_batch.write_pair_thumbnails
    written: list[int] = []

    def interrupted(folder: Path, row: int, *args: object) -> tuple[str, str]:
        if row == 2:
            raise KeyboardInterrupt
        written.append(row)
        return real(folder, row, *args)

    monkeypatch.setattr(match_batch, "write_pair_thumbnails", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(pairs, out)
    assert sorted(p.name for p in out.iterdir()) == ["0001_wide_tall"]  # no partial folder
    # A killed run leaves its hidden partial folder; an older one a final folder without files.
    (out / ".0002_rgba_wide.partial-0123").mkdir()
    (out / ".0002_rgba_wide.partial-0123" / "warped.png").write_bytes(b"half")
    (out / "0002_rgba_wide").mkdir()
    (out / "0002_rgba_wide" / "warped.png").write_bytes(b"half")
    monkeypatch.setattr(match_batch, "write_pair_thumbnails", real)
    before = snapshot(out / "0001_wide_tall")
    assert run(pairs, out) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "0001_wide_tall", "0002_rgba_wide", "index.html"
    ]  # fmt: skip
    assert snapshot(out / "0001_wide_tall") == before
    check_pair_folder(out / "0002_rgba_wide", pictures["rgba"], pictures["wide"])


@pytest.mark.slow
def test_the_console_script_exits_1_when_a_pair_failed(tmp_path, pictures):
    pairs = write_csv(
        tmp_path / "pairs.csv", "source,target\nbroken.png,wide.png\ntall.jpg,wide.png\n"
    )
    script = Path(sys.executable).with_name("guided-flow")
    command = [str(script), "match", "--pairs", str(pairs), "--out", str(tmp_path / "out"), *FAST]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "failures.csv" in result.stderr
    assert (tmp_path / "out" / "0002_tall_wide" / "index.html").is_file()


# --- fast errors: before the model loads --------------------------------------------------------

BAD_CSVS = {
    # case: (CSV text or None for no file, what the one-line message must name)
    "missing_csv": (None, ["gone.csv", "no such pairs file"]),
    "empty": ("", ["pairs.csv", "header"]),
    "wrong_header": ("src,dst\nwide.png,tall.jpg\n", ["pairs.csv", "line 1", "src,dst"]),
    "unknown_column": ("source,target,kp\nwide.png,tall.jpg,kps.json\n", ["line 1"]),
    "header_only": ("source,target\n", ["pairs.csv", "no pairs"]),
    "extra_field": ("source,target\nwide.png,tall.jpg\nwide.png,tall.jpg,x\n", ["row 2"]),
    "missing_picture": ("source,target\nwide.png,tall.jpg\nwide.png,gone.png\n", ["row 2"]),
    "missing_kps": ("source,target,kps\nwide.png,tall.jpg,gone.json\n", ["row 1", "gone.json"]),
    "empty_target": ("source,target\nwide.png,\n", ["row 1", "target column is empty"]),
    "folder_as_picture": ("source,target\npictures,tall.jpg\n", ["row 1", "not a file"]),
    "two_bad_rows": (
        "source,target\ngone.png,x.png\nwide.png,tall.jpg\nno.png,t.png\n",
        ["1 more"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CSVS))
def test_a_bad_csv_exits_2_before_the_model_loads(tmp_path, pictures, monkeypatch, capsys, case):
    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(GuidedSemanticFlow, "untrained", no_model)
    monkeypatch.setattr(GuidedSemanticFlow, "from_checkpoint", no_model)
    text, names = BAD_CSVS[case]
    path = tmp_path / ("gone.csv" if text is None else "pairs.csv")
    if text is not None:
        write_csv(path, text)
    assert run(path, tmp_path / "out") == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and message.startswith("guided-flow: error: "), message
    assert path.name in message and all(name in message for name in names), message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["a.png", "b.png", "--pairs", "pairs.csv"],  # both ways at once
        ["--pairs", "pairs.csv", "--kps", "kps.json"],  # keypoints go in the CSV
        [],  # neither
    ],
    ids=["pair_and_pairs", "kps_with_pairs", "nothing"],
)
def test_conflicting_options_exit_2(tmp_path, pictures, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "pairs.csv", "source,target\nwide.png,tall.jpg\n")
    assert cli.main(["match", *argv, "--out", "out"]) == 2
    assert "--pairs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_batch_size_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["match", "--pairs", "p.csv", "--out", "o", "--batch-size", "0"])
    assert exit_info.value.code == 2 and "--batch-size" in capsys.readouterr().err


def test_the_pairs_csv_reads_paths_relative_to_its_folder(tmp_path, pictures):
    text = (
        "\ufeffkps , target,source\n"  # a byte-order mark, spaces and any column order
        f"kps.json,tall.jpg,{pictures['wide']}\n"
        "\n"
        ",wide.png,pictures/grey.png\n"
    )
    rows = read_pairs(write_csv(tmp_path / "pairs.csv", text))
    assert [(r.row, r.line) for r in rows] == [(1, 2), (2, 4)]
    assert [r.folder for r in rows] == ["0001_wide_tall", "0002_grey_wide"]
    assert rows[0].kps == pictures["kps"] and rows[1].kps is None
    assert rows[1].source == pictures["grey"] and rows[1].written[0] == "pictures/grey.png"
    row = PairRow(12345, 12346, Path("/a/x.png"), Path("/b/y.jpg"), None, ("", "", ""))
    assert row.folder == "12345_x_y"
    with pytest.raises(DataError, match="not-utf8.csv"):
        read_pairs(tmp_path / "not-utf8.csv")


# --- the Python API -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def matcher() -> GuidedSemanticFlow:
    return GuidedSemanticFlow.untrained(input_size=160)


def test_match_many_yields_what_match_returns_one_per_pair(tmp_path, matcher):
    a, b = textured_image(90, 130, seed=1), textured_image(140, 70, seed=2)
    kps = [[5.0, 7.0], [120.0, 80.0]]
    pairs: list[tuple] = [
        (a, b, kps),
        (save(tmp_path / "a.png", a), save(tmp_path / "b.jpg", b)),
        (tmp_path / "missing.png", a),  # fails alone, in its place
        (Image.fromarray(b), torch.from_numpy(a).permute(2, 0, 1)),
        (a, a, None),
        ("not a pair",),
        (b, a),
    ]
    results = list(matcher.match_many(pairs, batch_size=2))
    assert len(results) == len(pairs)
    failures = [r for r in results if isinstance(r, MatchFailure)]
    assert [f.index for f in failures] == [2, 5]
    assert "missing.png" in str(failures[0]) and isinstance(failures[0].__cause__, DataError)
    for pair, result in zip(pairs, results, strict=True):
        if isinstance(result, MatchFailure):
            continue
        assert isinstance(result, MatchResult)
        expected = matcher.match(*pair)
        for name in ("flow_s2t", "flow_t2s", "confidence", "flow_input"):
            np.testing.assert_allclose(getattr(result, name), getattr(expected, name), atol=1e-4)
        for mine, theirs in zip(result.confident_matches, expected.confident_matches, strict=True):
            np.testing.assert_allclose(mine, theirs, atol=1e-4)
        if expected.keypoints is None:
            assert result.keypoints is None
        else:
            np.testing.assert_allclose(result.keypoints, expected.keypoints, atol=1e-4)


def test_match_many_refuses_a_batch_size_below_1(matcher):
    with pytest.raises(ValueError, match="batch size"):
        list(matcher.match_many([], batch_size=0))
