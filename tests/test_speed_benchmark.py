"""The settings of ``benchmarks/speed.py --test-time``: parsed into model options that build."""

from __future__ import annotations

from guided_flow.api import weight_free_config
from tests.helpers import load_benchmark


def test_a_setting_is_options_joined_by_commas_with_booleans_parsed():
    speed = load_benchmark("speed")
    options = speed.parse_setting("cycle_consistency=True,feature_views=scale")
    assert options == {"cycle_consistency": True, "feature_views": "scale"}
    assert speed.parse_setting("cycle_consistency=false") == {"cycle_consistency": False}
    assert speed.parse_setting("feature_stride=8,c_p=20.0") == {"feature_stride": 8, "c_p": 20.0}
    config = weight_free_config("fast", **options)
    assert config.cycle_consistency and config.feature_views == "scale"
