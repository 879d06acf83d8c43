"""Keypoint-transfer evaluation with hand-made flows: identity, an exact affine flow at every
option setting, the bound options, the written files against an independent numpy PCK."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from guided_flow.errors import ConfigError
from guided_flow.evaluation.keypoints import (
    EVAL_RESOLUTIONS,
    KPS_SAMPLINGS,
    PCK_BOUNDS,
    KeypointEvaluator,
    format_table,
)

SETTINGS = list(itertools.product(PCK_BOUNDS, EVAL_RESOLUTIONS, KPS_SAMPLINGS))
INPUT = (64, 96)  # (H, W) of the network input grid
SOURCE = (150, 200)  # (H, W) original source
TARGET = (170, 260)  # (H, W) original target
AFFINE = np.array([[1.05, 0.08, 30.0], [-0.06, 0.95, -5.0]])  # target = A @ (x, y, 1) of source


def make_batch(
    src_kps: np.ndarray,
    trg_kps: np.ndarray,
    valid: np.ndarray,
    source_size: tuple[int, int],
    target_size: tuple[int, int],
    src_box: list[float],
    trg_box: list[float],
    categories: list[int] | None = None,
    difficulty: np.ndarray | None = None,
) -> dict:
    """A collated batch in the project's schema for ``B`` pairs with original-pixel keypoints."""
    batch = len(src_kps)
    meta = {
        "source_size": torch.tensor([source_size] * batch),
        "target_size": torch.tensor([target_size] * batch),
        "source_kps": torch.as_tensor(src_kps, dtype=torch.float32),
        "target_kps": torch.as_tensor(trg_kps, dtype=torch.float32),
        "source_bbox": torch.tensor([src_box] * batch, dtype=torch.float32),
        "target_bbox": torch.tensor([trg_box] * batch, dtype=torch.float32),
        "category_id": torch.tensor(categories or [0] * batch),
    }
    if difficulty is not None:
        meta["difficulty"] = torch.as_tensor(difficulty)
    return {
        "source_image": torch.zeros(batch, 3, *INPUT),
        "target_image": torch.zeros(batch, 3, *INPUT),
        "kps_valid": torch.as_tensor(valid),
        "index": torch.arange(batch),
        "meta": meta,
    }


def affine_flow(batch: int) -> torch.Tensor:
    """The exact ``flow_s2t`` (``B x 2 x H x W`` input pixels) of :data:`AFFINE` between the
    input grids of a SOURCE-sized and a TARGET-sized image (pixel centres at integers)."""
    height, width = INPUT
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    grid = np.stack((xs, ys), axis=-1).astype(np.float64)
    source_scale = np.array([width / SOURCE[1], height / SOURCE[0]])
    target_scale = np.array([width / TARGET[1], height / TARGET[0]])
    source = (grid + 0.5) / source_scale - 0.5
    target = source @ AFFINE[:, :2].T + AFFINE[:, 2]
    flow = (target + 0.5) * target_scale - 0.5 - grid
    return torch.from_numpy(flow).permute(2, 0, 1).expand(batch, 2, height, width).clone()


def affine_batch(pairs: int = 2, seed: int = 0, **kwargs) -> dict:
    """``pairs`` pairs whose target is the AFFINE warp of the source, keypoints moved alike; the
    last keypoint slot of pair 0 is padding."""
    rng = np.random.default_rng(seed)
    src = np.stack((rng.uniform(20, 180, (pairs, 6)), rng.uniform(20, 130, (pairs, 6))), -1)
    trg = src @ AFFINE[:, :2].T + AFFINE[:, 2]
    valid = np.ones((pairs, 6), dtype=bool)
    valid[0, -1] = False
    corners = np.array([[15, 15], [185, 15], [15, 135], [185, 135]]) @ AFFINE[:, :2].T
    corners += AFFINE[:, 2]
    trg_box = [*corners.min(0), *corners.max(0)]
    return make_batch(src, trg, valid, SOURCE, TARGET, [15, 15, 185, 135], trg_box, **kwargs)


@pytest.mark.parametrize(("bound", "resolution", "sampling"), SETTINGS)
def test_identity_flow_on_identical_pairs_scores_one(bound, resolution, sampling):
    rng = np.random.default_rng(1)
    kps = rng.uniform(5, 140, (3, 4, 2))
    valid = np.ones((3, 4), dtype=bool)
    batch = make_batch(kps, kps, valid, SOURCE, SOURCE, [5, 5, 190, 140], [5, 5, 190, 140])
    evaluator = KeypointEvaluator(bound, resolution, sampling)
    evaluator.update(batch, torch.zeros(3, 2, *INPUT))
    result = evaluator.compute()
    assert result["pairs"] == 3
    assert [result[key] for key in ("pck@0.01", "pck@0.05", "pck@0.1")] == [1.0, 1.0, 1.0]


def test_bilinear_transfer_of_an_affine_flow_is_exact():
    batch = affine_batch()
    kps = KeypointEvaluator().transfer(batch, affine_flow(2))
    valid = batch["kps_valid"]
    expected = batch["meta"]["target_kps"].double()
    assert torch.allclose(kps["pred_kps"][valid], expected[valid], atol=1e-4)


@pytest.mark.parametrize(("bound", "resolution", "sampling"), SETTINGS)
def test_affine_pair_scores_one_and_swapped_flow_does_not(bound, resolution, sampling):
    batch = affine_batch()
    exact = KeypointEvaluator(bound, resolution, sampling)
    exact.update(batch, affine_flow(2))
    result = exact.compute()
    assert [result[key] for key in ("pck@0.01", "pck@0.05", "pck@0.1")] == [1.0, 1.0, 1.0]
    swapped = KeypointEvaluator(bound, resolution, sampling)
    swapped.update(batch, affine_flow(2).flip(1))
    assert swapped.compute()["pck@0.1"] < 0.5


def test_bound_options():
    src_kps = np.array([[[0.0, 0.0], [5.0, 5.0], [0.0, 0.0]]])
    trg_kps = np.array([[[10.0, 10.0], [40.0, 100.0], [149.0, 299.0]]])  # last slot is padding
    valid = np.array([[True, True, False]])
    source, target = (100, 200), (300, 150)
    batch = make_batch(src_kps, trg_kps, valid, source, target, [10, 20, 110, 60], [0, 0, 50, 120])
    flow = torch.zeros(1, 2, *INPUT)
    # Original pixels, then input pixels (source x 96/200, 64/100; target x 96/150, 64/300).
    expected = {
        "original": {
            "trg_bbox": 120,
            "src_bbox": 100,
            "trg_img": 300,
            "src_img": 200,
            "trg_kps": 90,
        },
        "input": {
            "trg_bbox": max(50 * 96 / 150, 120 * 64 / 300),
            "src_bbox": max(100 * 96 / 200, 40 * 64 / 100),
            "trg_img": 96,
            "src_img": 96,
            "trg_kps": max(30 * 96 / 150, 90 * 64 / 300),
        },
    }
    for resolution, bounds in expected.items():
        for kind, value in bounds.items():
            evaluator = KeypointEvaluator(pck_bound=kind, eval_resolution=resolution)
            assert evaluator.transfer(batch, flow)["bound"].item() == pytest.approx(value)
    default = KeypointEvaluator().transfer(batch, flow)["bound"]
    assert default.item() == pytest.approx(120)


def test_bound_option_changes_pck():
    kps = np.array([[[50.0, 50.0]]])
    shifted = kps + [[[0.0, 15.0]]]  # 15 px: a miss at 0.1 x 120 (box), a hit at 0.1 x 300 (image)
    batch = make_batch(
        kps, shifted, np.ones((1, 1), bool), (300, 150), (300, 150), [0] * 4, [0, 0, 50, 120]
    )
    results = {}
    for kind in ("trg_bbox", "trg_img"):
        evaluator = KeypointEvaluator(pck_bound=kind)
        evaluator.update(batch, torch.zeros(1, 2, *INPUT))
        results[kind] = evaluator.compute()["pck@0.1"]
    assert results == {"trg_bbox": 0.0, "trg_img": 1.0}


@pytest.mark.parametrize(
    ("option", "value"),
    [("pck_bound", "box"), ("eval_resolution", "native"), ("kps_sampling", "bicubic")],
)
def test_invalid_options_name_the_choices(option, value):
    allowed = {
        "pck_bound": PCK_BOUNDS,
        "eval_resolution": EVAL_RESOLUTIONS,
        "kps_sampling": KPS_SAMPLINGS,
    }
    with pytest.raises(ConfigError) as error:
        KeypointEvaluator(**{option: value})
    assert option in str(error.value) and all(
        choice in str(error.value) for choice in allowed[option]
    )


def test_box_bound_without_boxes_and_wrong_flow_size_are_errors():
    batch = affine_batch()
    del batch["meta"]["target_bbox"]
    with pytest.raises(ConfigError, match="trg_bbox"):
        KeypointEvaluator().update(batch, affine_flow(2))
    KeypointEvaluator(pck_bound="trg_img").update(batch, affine_flow(2))
    with pytest.raises(ValueError, match="input grid"):
        KeypointEvaluator(pck_bound="trg_img").update(batch, affine_flow(2)[..., :-1])


def numpy_pck(lines: list[dict], alphas: tuple[float, ...]) -> np.ndarray:
    """Per-pair PCK (``N x A``) from predictions.jsonl lines, independently of the package."""
    rows = []
    for line in lines:
        error = np.linalg.norm(np.array(line["pred_kps"]) - np.array(line["trg_kps"]), axis=1)
        rows.append([np.mean(error <= alpha * line["bound"]) for alpha in alphas])
    return np.array(rows)


def test_written_files_match_an_independent_numpy_pck(tmp_path):
    alphas = (0.01, 0.05, 0.1)
    difficulty = np.array([[0, 1], [1, 1], [2, 0], [0, 0]])
    batch = affine_batch(pairs=4, seed=3, categories=[0, 2, 2, 0], difficulty=difficulty)
    noise = torch.randn(4, 2, *INPUT, generator=torch.Generator().manual_seed(0)) * 8
    evaluator = KeypointEvaluator(
        categories=("cat", "dog", "cow"), difficulty_names=("view", "trunc")
    )
    evaluator.update(batch, affine_flow(4) + noise)
    names = [f"pair-{i}" for i in range(4)]
    returned = evaluator.write(tmp_path / "results", names, {"checkpoint": "none"})

    metrics = json.loads((tmp_path / "results" / "metrics.json").read_text())
    lines = [
        json.loads(line)
        for line in (tmp_path / "results" / "predictions.jsonl").read_text().splitlines()
    ]
    run = json.loads((tmp_path / "results" / "run.json").read_text())
    assert returned == metrics
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [
        "metrics.json",
        "predictions.jsonl",
        "run.json",
    ]
    assert run["pck_bound"] == "trg_bbox" and run["checkpoint"] == "none" and run["pairs"] == 4

    assert [line["pair_id"] for line in lines] == names
    assert [line["category"] for line in lines] == ["cat", "cow", "cow", "cat"]
    assert [len(line["pred_kps"]) for line in lines] == [5, 6, 6, 6]  # padding left out
    assert lines[1]["src_kps"] == batch["meta"]["source_kps"][1].double().tolist()
    per_pair = numpy_pck(lines, alphas)
    assert 0 < per_pair[:, 2].mean() < 1  # the noise makes the check non-trivial
    for line in lines:
        error = np.linalg.norm(np.array(line["pred_kps"]) - np.array(line["trg_kps"]), axis=1)
        assert line["hits"] == (error <= 0.1 * line["bound"]).tolist()
    assert metrics["pairs"] == 4
    for column, alpha in enumerate(alphas):
        key = f"pck@{alpha:g}"
        assert metrics[key] == pytest.approx(per_pair[:, column].mean(), rel=1e-12, abs=0)
        for name in ("cat", "cow"):
            rows = [n for n, line in enumerate(lines) if line["category"] == name]
            value = metrics["per_category"][name][key]
            assert value == pytest.approx(per_pair[rows, column].mean(), rel=1e-12, abs=0)
        for flag, values in zip(("view", "trunc"), difficulty.T, strict=True):
            for value in np.unique(values):
                expected = per_pair[values == value, column].mean()
                assert metrics["per_difficulty"][flag][str(value)][key] == pytest.approx(
                    expected, rel=1e-12, abs=0
                )
    assert "dog" not in metrics["per_category"]

    table = format_table(metrics)
    assert "overall" in table and "cow" in table and "trunc" in table and "pck@0.1" in table
