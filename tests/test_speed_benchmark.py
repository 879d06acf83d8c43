"""The settings of ``benchmarks/speed.py --test-time``: parsed into model options that build."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from guided_flow.api import weight_free_config

ROOT = Path(__file__).resolve().parents[1]


def _speed():
    spec = importlib.util.spec_from_file_location("speed", ROOT / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_setting_is_options_joined_by_commas_with_booleans_parsed():
    speed = _speed()
    options = speed.parse_setting("cycle_consistency=True,feature_views=scale")
    assert options == {"cycle_consistency": True, "feature_views": "scale"}
    assert speed.parse_setting("cycle_consistency=false") == {"cycle_consistency": False}
    config = weight_free_config("fast", **options)
    assert config.cycle_consistency and config.feature_views == "scale"
