"""Caltech-101 mask transfer: the data module on tiny datasets in the exact on-disk layout, the
LT-ACC / IoU / LOC-ERR definitions against an independent NumPy reference, the exact
multi-process recipe of the metric and the results files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from data_modules.caltech import CALTECH_CATEGORIES, CaltechDataModule
from guided_flow.cli.main import main
from guided_flow.errors import DataError
from guided_flow.evaluation.masks import (
    MaskTransferEvaluator,
    MaskTransferMetric,
    mask_transfer_scores,
)
from guided_flow.model.geometry import rasterise_polygon
from guided_flow.training.stages import MatchingStage
from tests.helpers import save_stage_checkpoint
from tests.test_pf_pascal import INPUT, affine_flow, write_image

HEADER = "source_image,target_image,class,XA,YA,XB,YB"


def image(category: str, number: int) -> str:
    return f"101_ObjectCategories/{category}/image_{number:04d}.jpg"


def caltech_row(source: str, target: str, category: str, src, trg, sep: str = ";") -> str:
    """A list row; ``src``, ``trg``: ``P x 2`` polygons; ``sep`` "," quotes the cells."""
    quote = '"' if sep == "," else ""
    lists = [
        quote + sep.join(f"{v:g}" for v in np.asarray(points, dtype=float)[:, axis]) + quote
        for points in (src, trg)
        for axis in (0, 1)
    ]
    return ",".join([source, target, str(CALTECH_CATEGORIES.index(category) + 1), *lists])


def write_caltech(root: Path, rows: Sequence[str], sizes: dict[str, tuple[int, int]]) -> Path:
    path = root / "test_pairs_caltech_with_category.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    for row in rows:
        for relative in row.split(",")[:2]:
            if not (root / relative).exists():
                write_image(root / relative, sizes.get(relative, (100, 80)))
    return path


def data_module(root: Path, **kwargs) -> CaltechDataModule:
    return CaltechDataModule(str(root), image_size=INPUT, batch_size=4, **kwargs)


def batches(module: CaltechDataModule) -> list[dict]:
    module.prepare_data()
    module.setup("test")
    return list(module.test_dataloader())


SQUARE = [[20, 15], [60, 15], [60, 55], [20, 55]]
TRIANGLE = [[10, 70], [90, 10], [95, 75]]


def test_batches_carry_polygons_and_input_masks(tmp_path):
    root = tmp_path / "caltech"
    rows = [
        caltech_row(image("Faces", 1), image("Faces", 2), "Faces", SQUARE, TRIANGLE),
        caltech_row(
            image("yin_yang", 3), image("yin_yang", 4), "yin_yang", TRIANGLE, SQUARE, sep=","
        ),
    ]
    write_caltech(root, rows, {image("Faces", 2): (128, 96)})
    module = data_module(root)
    (batch,) = batches(module)
    meta = batch["meta"]
    assert module.evaluation == "mask_transfer" and "source_polygon" in meta
    assert batch["source_mask"].shape == batch["target_mask"].shape == (2, 1, INPUT, INPUT)
    assert batch["category"] == ["Faces", "yin_yang"]
    assert meta["category_id"].tolist() == [0, 100]
    assert meta["target_size"].tolist() == [[96, 128], [80, 100]]
    assert meta["source_polygon"].shape == (2, 4, 2)  # padded to the pair's larger polygon
    assert meta["source_polygon"][0].tolist() == SQUARE
    assert meta["target_polygon"][0, :3].tolist() == TRIANGLE
    assert torch.isnan(meta["target_polygon"][0, 3]).all()
    assert meta["source_polygon"][1, :3].tolist() == TRIANGLE  # the ","-separated row
    # the input mask is the polygon rasterised on the input grid (64 / 100 by 64 / 80 here)
    scale = np.array([INPUT / 100, INPUT / 80])
    expected = rasterise_polygon((np.array(SQUARE) + 0.5) * scale - 0.5, (INPUT, INPUT))
    assert torch.equal(batch["source_mask"][0, 0].bool(), torch.from_numpy(expected))
    assert module.pair_names("test")[1] == "000002-image_0003-image_0004:yin_yang"


def translated_layout(root: Path) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """Pair 1: the same image and polygon; pair 2: a target whose polygon is the source's moved
    by (7, 5) pixels, in an image of another size. Returns the target -> source map and the
    two sizes of pair 2."""
    source_size, target_size = (100, 80), (120, 90)
    moved = np.array(TRIANGLE) + [7, 5]
    rows = [
        caltech_row(image("ant", 1), image("ant", 1), "ant", SQUARE, SQUARE),
        caltech_row(image("ant", 2), image("ant", 3), "ant", TRIANGLE, moved),
    ]
    write_caltech(root, rows, {image("ant", 2): source_size, image("ant", 3): target_size})
    return np.array([[1.0, 0.0, -7.0], [0.0, 1.0, -5.0]]), source_size, target_size


@pytest.mark.parametrize("resolution", ["original", "input"])
def test_identity_and_known_translation_transfer_masks_exactly(tmp_path, resolution):
    matrix, source_size, target_size = translated_layout(tmp_path / "caltech")
    (batch,) = batches(data_module(tmp_path / "caltech"))
    flow_t2s = torch.stack(
        (torch.zeros(2, INPUT, INPUT), affine_flow(matrix, target_size, source_size))
    )
    evaluator = MaskTransferEvaluator(eval_resolution=resolution)
    scores = evaluator.scores(batch, flow_t2s)
    if resolution == "original":
        assert scores["lt_acc"].tolist() == [1.0, 1.0] and scores["iou"].tolist() == [1.0, 1.0]
        assert scores["loc_err"].abs().max() < 1e-6
    else:  # masks rasterised on the input grid are only approximately translated
        assert scores["lt_acc"].min() > 0.97 and scores["iou"].min() > 0.85
        assert scores["loc_err"].max() < 0.05
    assert scores["lt_acc"][0] == 1.0 and abs(scores["loc_err"][0]) < 1e-12
    worse = evaluator.scores(batch, torch.zeros_like(flow_t2s))
    assert worse["iou"][1] < scores["iou"][1] and worse["loc_err"][1] > scores["loc_err"][1]


def reference_scores(source: np.ndarray, target: np.ndarray, matches: np.ndarray) -> list[float]:
    """LT-ACC, IoU and LOC-ERR of one pair written out pixel by pixel (bilinear sampling with
    zeros outside, threshold 0.5, box-relative coordinates)."""
    source_h, source_w = source.shape
    warped = np.zeros(target.shape, dtype=bool)
    errors = []
    boxes = []
    for mask in (target, source):
        ys, xs = np.nonzero(mask)
        boxes.append((xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1))
    (tx, ty, tw, th), (sx, sy, sw, sh) = boxes
    for y in range(target.shape[0]):
        for x in range(target.shape[1]):
            mx, my = matches[y, x]
            x0, y0 = int(np.floor(mx)), int(np.floor(my))
            value = 0.0
            for xi, yi, weight in (
                (x0, y0, (x0 + 1 - mx) * (y0 + 1 - my)),
                (x0 + 1, y0, (mx - x0) * (y0 + 1 - my)),
                (x0, y0 + 1, (x0 + 1 - mx) * (my - y0)),
                (x0 + 1, y0 + 1, (mx - x0) * (my - y0)),
            ):
                if 0 <= xi < source_w and 0 <= yi < source_h:
                    value += weight * source[yi, xi]
            warped[y, x] = value >= 0.5
            if 0 <= mx <= source_w - 1 and 0 <= my <= source_h - 1:
                errors.append(
                    abs((x - tx) / tw - (mx - sx) / sw) + abs((y - ty) / th - (my - sy) / sh)
                )
    lt_acc = np.mean(warped == target)
    iou = np.sum(warped & target) / np.sum(warped | target)
    return [lt_acc, iou, np.mean(errors)]


def test_scores_match_a_pixel_by_pixel_reference():
    rng = np.random.default_rng(0)
    source = np.zeros((9, 12), dtype=bool)
    source[2:7, 3:10] = True
    target = np.zeros((8, 11), dtype=bool)
    target[1:6, 4:11] = True
    target[7, 0] = True
    for _ in range(3):
        ys, xs = np.mgrid[0:8, 0:11].astype(np.float64)
        matches = np.stack((xs, ys), axis=-1) + rng.normal(0, 2.0, size=(8, 11, 2))
        scores = mask_transfer_scores(
            torch.from_numpy(source)[None],
            torch.from_numpy(target)[None],
            torch.from_numpy(matches)[None],
        )
        found = [float(scores[name][0]) for name in ("lt_acc", "iou", "loc_err")]
        assert found == pytest.approx(reference_scores(source, target, matches), abs=1e-12)


def test_metric_is_exact_whatever_the_batches_order_and_padding_repeats(tmp_path):
    index = torch.tensor([3, 0, 2, 1])
    category = torch.tensor([1, 0, 1, 1])
    lt_acc = torch.tensor([0.9, 0.5, 0.7, 0.8], dtype=torch.float64)
    iou = torch.tensor([0.6, 0.2, 0.4, 0.3], dtype=torch.float64)
    loc_err = torch.tensor([0.1, float("nan"), 0.3, 0.2], dtype=torch.float64)
    metric = MaskTransferMetric(categories=("a", "b"))
    metric.update(index[2:], category[2:], lt_acc[2:], iou[2:], loc_err[2:])
    metric.update(index[:2], category[:2], lt_acc[:2], iou[:2], loc_err[:2])
    metric.update(index[:1], category[:1], lt_acc[:1], iou[:1], loc_err[:1])  # a repeat
    result = metric.compute()
    assert result["pairs"] == 4 and result["loc_err_pairs"] == 3
    assert result["lt_acc"] == pytest.approx(0.725, abs=1e-15)
    assert result["iou"] == pytest.approx(0.375, abs=1e-15)
    assert result["loc_err"] == pytest.approx(0.2, abs=1e-15)
    assert result["per_category"]["a"] == {
        "pairs": 1,
        "lt_acc": 0.5,
        "iou": 0.2,
        "loc_err": None,
        "loc_err_pairs": 0,
    }
    assert result["per_category"]["b"]["loc_err"] == pytest.approx(0.2, abs=1e-15)
    assert metric.records().index.tolist() == [0, 1, 2, 3]


def test_evaluator_writes_the_three_metrics(tmp_path):
    translated_layout(tmp_path / "caltech")
    module = data_module(tmp_path / "caltech")
    evaluator = MaskTransferEvaluator(categories=module.categories)
    for batch in batches(module):
        evaluator.update(batch, torch.zeros(len(batch["index"]), 2, INPUT, INPUT))
    results = tmp_path / "results"
    metrics = evaluator.write(results, module.pair_names("test"), {"note": "zero flow"})
    assert json.loads((results / "metrics.json").read_text()) == metrics
    assert {"lt_acc", "iou", "loc_err"} <= set(metrics) and metrics["pairs"] == 2
    assert metrics["per_category"]["ant"]["pairs"] == 2
    lines = [json.loads(line) for line in (results / "predictions.jsonl").read_text().splitlines()]
    assert [line["pair_id"] for line in lines] == module.pair_names("test")
    assert lines[0]["category"] == "ant" and lines[0]["lt_acc"] == lines[0]["iou"] == 1.0
    assert abs(lines[0]["loc_err"]) < 1e-12
    run = json.loads((results / "run.json").read_text())
    assert run["eval_resolution"] == "original" and run["note"] == "zero flow"


GOOD = caltech_row(image("ant", 1), image("ant", 2), "ant", SQUARE, TRIANGLE)


@pytest.mark.parametrize(
    "row, message",
    [
        (GOOD.rsplit(",", 1)[0], "6 columns, expected 7"),
        (GOOD.replace(",20;60;60;20,", ",20;60;60,"), "vertex count mismatch: XA has 3"),
        (",".join([*GOOD.split(",")[:2], "0", *GOOD.split(",")[3:]]), "class '0'"),
        (caltech_row(image("ant", 1), image("ant", 2), "ant", SQUARE[:2], TRIANGLE), "3 or more"),
        (
            caltech_row(image("ant", 1), image("ant", 2), "ant", [[0, 0], [1, 1], [2, 2]], SQUARE),
            "no area",
        ),
        (GOOD.replace("image_0002", "image_0009"), "image_0009.jpg does not exist"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, row, message):
    root = tmp_path / "caltech"
    path = write_caltech(root, [GOOD], {})
    path.write_text(path.read_text() + row + "\n")
    with pytest.raises(DataError) as error:
        data_module(root).prepare_data()
    assert f"{path}, line 3: " in str(error.value) and message in str(error.value)


def test_rasterised_polygons_keep_the_pixels_whose_centre_is_inside():
    mask = rasterise_polygon(np.array([[1.5, 1.5], [4.5, 1.5], [4.5, 3.5], [1.5, 3.5]]), (6, 7))
    expected = np.zeros((6, 7), dtype=bool)
    expected[2:4, 2:5] = True
    assert np.array_equal(mask, expected)
    padded = np.array([[1.5, 1.5], [4.5, 1.5], [4.5, 3.5], [1.5, 3.5], [np.nan, np.nan]])
    assert np.array_equal(rasterise_polygon(padded, (6, 7)), expected)


@pytest.mark.slow
def test_the_test_config_writes_the_three_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    translated_layout(tmp_path / "caltech")
    stage = MatchingStage.from_options(backbone="resnet18", weights="none", input_size=INPUT)
    save_stage_checkpoint(stage, tmp_path / "model.ckpt")
    results = tmp_path / "results"
    args = [
        "test",
        "--config",
        str(Path(__file__).resolve().parents[1] / "experiments" / "test_caltech.yaml"),
        f"--ckpt_path={tmp_path / 'model.ckpt'}",
        f"--data.root={tmp_path / 'caltech'}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        f"--results_dir={results}",
        "--data.num_workers=0",
    ]
    assert main(args) == 0
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["pairs"] == 2 and {"lt_acc", "iou", "loc_err"} <= set(metrics)
    assert 0 <= metrics["lt_acc"] <= 1 and 0 <= metrics["iou"] <= 1
    lines = (results / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["pair_id"] for line in lines] == [
        "000001-image_0001-image_0001:ant",
        "000002-image_0002-image_0003:ant",
    ]
