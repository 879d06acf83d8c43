"""Guided Semantic Flow (Jeon et al., ECCV 2020) in PyTorch Lightning."""

__version__ = "0.1.0"
