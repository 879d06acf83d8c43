"""Guided Semantic Flow (Jeon et al., ECCV 2020) in PyTorch Lightning.

``guided_flow.GuidedSemanticFlow`` (see :mod:`guided_flow.api`) is imported on first use, so
that ``import guided_flow`` stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

# Public names -> the module that defines them, imported when first asked for.
_LAZY = {"GuidedSemanticFlow": "guided_flow.api", "MatchResult": "guided_flow.api"}

__all__ = ["GuidedSemanticFlow", "MatchResult", "__version__"]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
