"""Test-time presets: the untrained default, 0.2's "fast" one, and how match picks them."""

from __future__ import annotations

import argparse

import pytest

from guided_flow.api import PRESETS, apply_preset, preset_options, weight_free_config
from guided_flow.cli.match import build_parser
from guided_flow.cli.match_steps import load_matcher
from guided_flow.errors import ConfigError
from guided_flow.model.flow_model import GuidedFlowModel, ModelConfig


def test_the_default_preset_votes_and_fast_is_the_previous_default():
    default = weight_free_config()
    assert default.voting == "hough" and default.cycle_consistency is False
    fast = weight_free_config("fast")
    previous = ModelConfig(flow_base="soft_argmax", soft_argmax_beta=50.0)
    assert fast == previous
    assert set(PRESETS) == {"default", "fast"}
    # options given by name win over the preset's
    assert weight_free_config("default", voting="none") == previous


def test_an_unknown_preset_is_a_one_line_error():
    with pytest.raises(ConfigError, match="preset='slow' is invalid: choose one of"):
        preset_options("slow")


def test_a_preset_applies_to_a_model_built_otherwise():
    model = GuidedFlowModel(None, grid=(4, 4))
    model.cycle_consistency = True
    assert apply_preset(model, "default") is model and model.voting == "hough"
    assert not model.cycle_consistency
    fast = apply_preset(model, "fast")
    assert not fast.cycle_consistency and fast.voting == "none"


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["a.jpg", "b.jpg", "--out", "out", "--device", "cpu", *argv])


def test_match_takes_the_default_preset_unless_told_otherwise(capsys):
    untrained = load_matcher(_args("--input-size", "64"))
    assert untrained.model.voting == "hough" and untrained.model.input_size == (64, 64)
    fast = load_matcher(_args("--input-size", "64", "--preset", "fast"))
    assert fast.model.voting == "none"
    with pytest.raises(SystemExit):
        _args("--preset", "slow")
    assert "invalid choice: 'slow'" in capsys.readouterr().err
