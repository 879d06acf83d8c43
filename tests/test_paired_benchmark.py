"""The paired comparison of ``benchmarks/paired.py``: crossings, the PCK difference and its
bootstrap interval on hand-made errors, and one run through a checkpoint and a PF-WILLOW layout."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from guided_flow.api import weight_free_config
from guided_flow.model.flow_model import GuidedFlowModel
from guided_flow.training.stages import MatchingStage
from tests.helpers import load_benchmark, save_stage_checkpoint
from tests.test_pf_pascal import INPUT
from tests.test_pf_willow import image, willow_row, write_willow

ROOT = Path(__file__).resolve().parents[1]


def _paired():
    return load_benchmark("paired")


def test_crossings_and_the_difference_are_counted_per_keypoint():
    paired = _paired()
    # pair 0: keypoint 0 leaves the bound, keypoint 1 enters it; pair 1: one stays in, one out
    baseline = torch.tensor([0.05, 0.20, 0.08, 0.30], dtype=torch.float64)
    variant = torch.tensor([0.20, 0.05, 0.05, 0.30], dtype=torch.float64)
    pair = torch.tensor([7, 7, 3, 3])
    summary = paired.paired_summary(baseline, variant, pair, alpha=0.1, draws=200)
    assert summary["keypoints"] == 4 and summary["gained"] == 1 and summary["lost"] == 1
    # every pair's own change is 0, so every resampling gives 0
    assert summary["difference"] == summary["low"] == summary["high"] == 0.0


def test_a_change_every_pair_shares_has_no_spread_and_a_mixed_one_holds_zero():
    paired = _paired()
    pair = torch.arange(40).repeat_interleave(2)
    baseline = torch.full((80,), 0.2, dtype=torch.float64)
    variant = baseline.clone()
    variant[0::2] = 0.05  # every pair gains one of its two keypoints
    summary = paired.paired_summary(baseline, variant, pair, alpha=0.1, draws=500)
    assert summary["gained"] == 40 and summary["lost"] == 0
    assert summary["difference"] == summary["low"] == summary["high"] == 0.5
    # half the pairs gain a keypoint, the other half lose one: no evidence either way
    baseline[40:] = 0.05
    variant[40:] = 0.05
    variant[41::2] = 0.2
    mixed = paired.paired_summary(baseline, variant, pair, alpha=0.1, draws=500)
    assert mixed["gained"] == 20 and mixed["lost"] == 20 and mixed["difference"] == 0.0
    assert mixed["low"] < 0 < mixed["high"] and -0.5 <= mixed["low"] and mixed["high"] <= 0.5


def test_a_run_scores_both_settings_with_the_same_weights(tmp_path, monkeypatch):
    paired = _paired()
    monkeypatch.chdir(tmp_path)
    src = [(20, 30), (60, 40), (120, 80), (150, 110)]
    trg = [(25, 35), (70, 45), (110, 90), (140, 100)]
    rows = [
        willow_row(image("car(G)", 1), image("car(G)", 2), src, trg),
        willow_row(image("car(G)", 2), image("car(G)", 3), src[:3], trg[:3]),
        willow_row(image("duck(S)", 1), image("duck(S)", 2), src, trg),
    ]
    write_willow(tmp_path / "willow", rows, name="test_pairs.csv")
    torch.manual_seed(0)
    stage = MatchingStage.from_options(backbone="resnet18", weights="none", input_size=INPUT)
    checkpoint = save_stage_checkpoint(stage, tmp_path / "model.ckpt")
    out = tmp_path / "paired.json"
    args = ["--ckpt", str(checkpoint), "--willow-root", str(tmp_path / "willow")]
    args += ["--option", "soft_argmax_refine", "--out", str(out), "--cache-dir", "cache"]
    assert paired.main([*args, "--label", "refine", "--draws", "100"]) == 0
    run = json.loads(out.read_text())["runs"]["refine"]
    assert run["baseline"] == {
        "cycle_consistency": False,
        "voting": "none",
        "feature_views": "none",
        "mirror_choice": False,
        "adaptive_window": False,
    }
    assert run["option"] == "soft_argmax_refine" and set(run["classes"]) == {
        "car(G)",
        "duck(S)",
        "all",
    }
    for alpha in ("pck@0.05", "pck@0.1", "pck@0.15"):
        groups = {name: row[alpha] for name, row in run["classes"].items()}
        assert groups["car(G)"]["keypoints"] == 7 and groups["duck(S)"]["keypoints"] == 4
        assert groups["all"]["keypoints"] == 11
        for summary in groups.values():
            net = (summary["gained"] - summary["lost"]) / summary["keypoints"]
            assert summary["difference"] == pytest.approx(net, abs=1e-4)
            assert summary["low"] <= summary["difference"] <= summary["high"]
    # other labels are kept
    assert paired.main([*args, "--label", "again", "--draws", "10"]) == 0
    assert set(json.loads(out.read_text())["runs"]) == {"refine", "again"}
    # the letterboxed variant is scored on the same keypoints
    args[args.index("soft_argmax_refine")] = "aspect=letterbox"
    assert paired.main([*args, "--label", "letterbox", "--draws", "10"]) == 0
    run = json.loads(out.read_text())["runs"]["letterbox"]
    assert run["option"] == "aspect=letterbox"
    assert run["classes"]["all"]["pck@0.1"]["keypoints"] == 11


def test_options_with_values_are_parsed_and_checked():
    paired = _paired()
    assert paired.parse_option("use_matching_net") == ("use_matching_net", None)
    assert paired.parse_option("feature_views=scale") == ("feature_views", "scale")
    for wrong in ("feature_views=mirror", "input_size=500", "no_such_switch"):
        with pytest.raises(argparse.ArgumentTypeError):
            paired.parse_option(wrong)


def test_variants_change_one_option_and_keep_the_baseline():
    paired = _paired()
    model = GuidedFlowModel(None, grid=(4, 4), c_p=5.0, c_m=3.0)
    variant = paired.variant_model(model, "feature_views", "flip")
    assert variant.feature_views == "flip" and model.feature_views == "none"
    assert paired.variant_model(model, "cycle_consistency", None).cycle_consistency
    assert not model.cycle_consistency


def test_several_options_change_the_variant_together_against_their_switches_off():
    paired = _paired()
    model = GuidedFlowModel(None, grid=(4, 4), cycle_consistency=True)
    options = [paired.parse_option("cycle_consistency"), paired.parse_option("voting=hough")]
    baseline, variant = paired.compared_models(model, options)
    assert not baseline.cycle_consistency and baseline.voting == "none"
    assert variant.cycle_consistency and variant.voting == "hough"
    assert model.cycle_consistency  # the model given is left as it was


def test_the_finer_grid_keeps_the_variances_fraction_of_the_picture():
    paired = _paired()
    model = GuidedFlowModel.from_config(weight_free_config(input_size=320, c_m=4.0))
    finer = paired.variant_model(model, "input_size", "480")
    assert finer.grid == (30, 30) and finer.input_size == (480, 480)
    assert finer.c_m == pytest.approx(4.0 * 2.25) and finer.c_p == pytest.approx(5.0 * 2.25)
    assert finer.flow_base == "soft_argmax"


def test_the_stride_8_grid_keeps_the_baselines_test_time_options():
    paired = _paired()
    model = GuidedFlowModel.from_config(weight_free_config("fast", input_size=320, c_m=4.0))
    finer = paired.variant_model(model, "feature_stride", "8")
    assert finer.grid == (40, 40) and finer.input_size == (320, 320)
    assert finer.backbone is not None and finer.backbone.stride == 8
    assert finer.c_m == pytest.approx(16.0) and finer.window_n == 11
    assert finer.voting == model.voting == "none"
