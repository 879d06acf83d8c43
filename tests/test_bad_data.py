"""Bad data in every benchmark loader: a truncated or missing image, a keypoint count mismatch, a
NaN or an out-of-image keypoint is a DataError naming the file (and the line of a csv list)
before any model work; with ``skip_bad`` the pair is dropped with one warning, counted, and the
other pairs load; through the CLI the count reaches run.json, and without ``skip_bad`` the
command stops with a one-line message."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
from PIL import Image

from guided_flow.cli.main import main
from guided_flow.errors import DataError
from guided_flow.training.stages import MatchingStage
from tests.helpers import save_stage_checkpoint
from tests.test_caltech import caltech_row, write_caltech
from tests.test_caltech import data_module as caltech_module
from tests.test_caltech import image as caltech_image
from tests.test_pf_pascal import IMAGES, INPUT, REPO, keypoint_row, write_layout
from tests.test_pf_pascal import data_module as pf_pascal_module
from tests.test_pf_willow import data_module as willow_module
from tests.test_pf_willow import image as willow_image
from tests.test_pf_willow import willow_row, write_willow
from tests.test_spair import data_module as spair_module
from tests.test_spair import variant, write_spair

PROBLEMS = (
    "truncated image",
    "missing image",
    "keypoint count",
    "nan keypoint",
    "outside keypoint",
)
SIZE = (40, 30)  # (W, H) of every image: keypoints beyond x = 40 or y = 30 are outside
NAN = float("nan")


@dataclass
class Layout:
    """A tiny benchmark root with one good pair and one bad pair.

    ``module(**options)`` makes its data module; a bad-pair error names ``named`` (at ``line``
    for a csv list) and says ``expected``; ``kept`` are the pair names left after skipping."""

    module: Callable[..., pl.LightningDataModule]
    named: str
    line: int | None
    expected: str
    kept: list[str]


def damage(path: Path, problem: str) -> str:
    """Truncate (a noisy image of the same size and format, cut to 60 %) or delete the image
    ``path`` for the image problems. Returns what the error must say."""
    if problem == "truncated image":
        noise = np.random.default_rng(0).integers(0, 256, (SIZE[1], SIZE[0], 3), dtype=np.uint8)
        Image.fromarray(noise).save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * 6 // 10])
        return f"{path}: cannot read the image"
    path.unlink()
    return f"image {path} does not exist"


def pf_pascal_layout(root: Path, problem: str) -> Layout:
    good = keypoint_row("2009_000001", "2009_000002", "cat", [[1, 2], [30, 20]], [[5, 6], [35, 25]])
    bad = list(keypoint_row("2009_000003", "2009_000004", "dog", [[3, 4], [20, 10]], [[7, 8]] * 2))
    expected = {
        "keypoint count": "keypoint count mismatch: XA has 3, YA has 2",
        "nan keypoint": "keypoints must be finite",
        "outside keypoint": "the target's keypoint 2 at (45, 8) lies outside its 40 x 30 image",
    }.get(problem)
    if problem == "keypoint count":
        bad[3] = "3;20;9"
    elif problem == "nan keypoint":
        bad[3] = "nan;20"
    elif problem == "outside keypoint":
        bad[5] = "7;45"
    stems = [f"2009_00000{n}" for n in range(1, 5)]
    write_layout(root, test=[good, bad], sizes=dict.fromkeys(stems, SIZE), folder="")
    if expected is None:
        expected = damage(root / IMAGES / "2009_000004.jpg", problem)
    return Layout(
        lambda **options: pf_pascal_module(root, **options),
        str(root / "test_pairs.csv"),
        3,
        expected,
        ["000001-2009_000001-2009_000002:cat"],
    )


def willow_layout(root: Path, problem: str) -> Layout:
    images = [willow_image("car(G)", n) for n in range(1, 5)]
    good = willow_row(images[0], images[1], [(1, 2), (30, 20)], [(5, 6), (35, 25)])
    source, target = [(3, 4), (20, 10)], [(7, 8), (25, 12)]
    expected = {
        "keypoint count": "keypoint count mismatch",
        "nan keypoint": "the source's keypoint 2 at (20, nan) lacks a coordinate",
        "outside keypoint": "the target's keypoint 1 at (45, 8) lies outside its 40 x 30 image",
    }.get(problem)
    if problem == "keypoint count":
        target = target[:1]
    elif problem == "nan keypoint":
        source, target = [(3, 4), (20, NAN), (9, 9)], [(7, 8), (25, NAN), (15, 20)]
    elif problem == "outside keypoint":
        target = [(45, 8), (25, 12)]
    sizes = dict.fromkeys(images, SIZE)
    path = write_willow(root, [good, willow_row(images[2], images[3], source, target)], sizes=sizes)
    if expected is None:
        expected = damage(root / images[3], problem)
    return Layout(
        lambda **options: willow_module(root, **options),
        str(path),
        3,
        expected,
        ["000001-car(G)_001-car(G)_002:car(G)"],
    )


def caltech_layout(root: Path, problem: str) -> Layout:
    images = [caltech_image("ant", n) for n in range(1, 5)]
    triangle, quad = [[2, 2], [20, 2], [20, 20]], [[5, 5], [30, 5], [30, 25], [5, 25]]
    good = caltech_row(images[0], images[1], "ant", triangle, quad)
    bad = caltech_row(images[2], images[3], "ant", triangle, quad).split(",")
    expected = {
        "keypoint count": "vertex count mismatch: XA has 4, YA has 3",
        "nan keypoint": "XA/YA: a polygon needs 3 or more finite vertices",
        "outside keypoint": "the target's vertex 2 at (45, 5) lies outside its 40 x 30 image",
    }.get(problem)
    if problem == "keypoint count":
        bad[3] = "2;20;20;9"
    elif problem == "nan keypoint":
        bad[3] = "2;nan;20"
    elif problem == "outside keypoint":
        bad[5] = "5;45;30;5"
    path = write_caltech(root, [good, ",".join(bad)], dict.fromkeys(images, SIZE))
    if expected is None:
        expected = damage(root / images[3], problem)
    return Layout(
        lambda **options: caltech_module(root, **options),
        str(path),
        3,
        expected,
        ["000001-image_0001-image_0002:ant"],
    )


def spair_layout(root: Path, problem: str) -> Layout:
    sizes = {"src_imsize": [*SIZE, 3], "trg_imsize": [*SIZE, 3]}
    boxes = {"src_bndbox": [0, 0, 30, 20], "trg_bndbox": [2, 2, 35, 25]}
    good = variant(1, "cat", "a1", "a2", **sizes, **boxes, src_kps=[[1, 2], [30, 20]])
    good["trg_kps"] = [[5, 6], [35, 25]]
    bad = variant(2, "dog", "b1", "b2", **sizes, **boxes, src_kps=[[3, 4], [20, 10]])
    bad["trg_kps"] = [[7, 8], [25, 12]]
    expected = {
        "keypoint count": "keypoint count mismatch: src_kps has 2, trg_kps has 1",
        "nan keypoint": "'src_kps' has non-finite values",
        "outside keypoint": "trg_kps: keypoint 1 at (45, 8) lies outside its 40 x 30 image",
    }.get(problem)
    if problem == "keypoint count":
        bad["trg_kps"] = [[7, 8]]
    elif problem == "nan keypoint":
        bad["src_kps"] = [[NAN, 4], [20, 10]]
    elif problem == "outside keypoint":
        bad["trg_kps"] = [[45, 8], [25, 12]]
    write_spair(root, [good, bad])
    if expected is None:
        expected = damage(root / "JPEGImages" / "dog" / "b2.jpg", problem)
    return Layout(
        lambda **options: spair_module(root, **options),
        str(root / "PairAnnotation" / "test" / f"{bad['filename']}.json"),
        None,
        expected,
        [good["filename"]],
    )


LAYOUTS = {
    "spair": spair_layout,
    "pf-pascal": pf_pascal_layout,
    "pf-willow": willow_layout,
    "caltech": caltech_layout,
}


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("benchmark", LAYOUTS)
def test_a_bad_pair_is_named_by_default(tmp_path, benchmark, problem):
    layout = LAYOUTS[benchmark](tmp_path / benchmark, problem)
    for step in ("prepare_data", "setup"):
        with pytest.raises(DataError) as error:
            getattr(layout.module(), step)()
        message = str(error.value)
        where = layout.named if layout.line is None else f"{layout.named}, line {layout.line}: "
        assert where in message and layout.expected in message, message
    assert not (tmp_path / benchmark / "cache").exists(), "nothing may be cached before the check"


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("benchmark", LAYOUTS)
def test_skip_bad_warns_once_drops_and_counts_the_pair(tmp_path, benchmark, problem):
    layout = LAYOUTS[benchmark](tmp_path / benchmark, problem)
    module = layout.module(skip_bad=True)
    with pytest.warns(UserWarning) as record:
        module.prepare_data()
        module.setup("test")
    warned = [str(w.message) for w in record if "skipped a bad pair" in str(w.message)]
    assert len(warned) == 1 and layout.named in warned[0] and layout.expected in warned[0]
    assert module.skipped_pairs == 1 and len(module.skipped) == 1
    assert layout.named in module.skipped[0] and layout.expected in module.skipped[0]
    assert module.pair_names("test") == layout.kept
    (batch,) = module.test_dataloader()
    assert batch["index"].tolist() == [0] and batch["source_image"].shape[-1] == INPUT


@pytest.mark.parametrize("benchmark", ["spair", "pf-willow"])
def test_a_split_with_no_good_pair_left_is_an_error(tmp_path, benchmark):
    layout = LAYOUTS[benchmark](tmp_path / benchmark, "missing image")
    good_image = {
        "spair": tmp_path / "spair" / "JPEGImages" / "cat" / "a2.jpg",
        "pf-willow": tmp_path / "pf-willow" / willow_image("car(G)", 2),
    }[benchmark]
    good_image.unlink()
    module = layout.module(skip_bad=True)
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no usable pair is left"):
        module.prepare_data()
    assert module.skipped_pairs == 2


def test_good_data_skips_nothing(tmp_path):
    root = tmp_path / "pf"
    points = [[1, 2], [39.5, 29.9]]  # within the 1 px tolerance of the 40 x 30 image
    write_layout(root, test=[keypoint_row("a", "b", "cat", points, points)], sizes={"a": SIZE})
    module = pf_pascal_module(root, skip_bad=True)
    module.prepare_data()
    module.setup("test")
    assert module.skipped_pairs == 0 and module.skipped == []


@pytest.mark.slow
def test_the_cli_writes_the_count_or_stops_with_one_line(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    layout = pf_pascal_layout(tmp_path / "pf", "truncated image")
    stage = MatchingStage.from_options(backbone="resnet18", weights="none", input_size=INPUT)
    checkpoint = save_stage_checkpoint(stage, tmp_path / "model.ckpt")
    args = [
        "test",
        "--config",
        str(REPO / "experiments" / "test_pfpascal.yaml"),
        "--ckpt_path",
        str(checkpoint),
        "--data.root",
        str(tmp_path / "pf"),
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.num_workers=0",
    ]
    results = tmp_path / "results"
    assert main([*args, "--data.skip_bad=true", "--results_dir", str(results)]) == 0
    run = json.loads((results / "run.json").read_text())
    assert run["skipped_pairs"] == 1 and run["pairs"] == 1
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["pairs"] == 1 and "skipped_pairs" not in metrics
    capfd.readouterr()
    assert main([*args, "--results_dir", str(tmp_path / "strict")]) == 2
    stderr = capfd.readouterr().err
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("guided-flow: error: ")
    assert f"{layout.named}, line 3: " in errors[0] and layout.expected in errors[0]
    assert not (tmp_path / "strict").exists()
