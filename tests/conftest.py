"""Shared test configuration: hypothesis profiles.

``ci`` (the default) keeps the property-based tests to a few seconds each on two cores and draws
the same examples on every run; ``thorough`` explores far more (and differently each run). Pick
one with ``HYPOTHESIS_PROFILE=thorough pytest tests/test_properties.py``.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
