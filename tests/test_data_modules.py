"""Every data module declares how its pairs are scored (tests/test_architecture.py checks what
it may import)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytorch_lightning as pl

from data_modules import EVALUATIONS
from data_modules.pairs_module import PairsDataModule

DATA_MODULES = Path(__file__).resolve().parents[1] / "data_modules"


def data_module_classes() -> dict[str, type]:
    """Every LightningDataModule defined in ``data_modules/`` but the base, by qualified name."""
    found = {}
    for path in sorted(DATA_MODULES.glob("*.py")):
        module = importlib.import_module(f"data_modules.{path.stem}")
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, pl.LightningDataModule)
                and value.__module__ == module.__name__
                and value is not PairsDataModule
            ):
                found[f"{module.__name__}.{name}"] = value
    return found


def test_every_data_module_declares_its_evaluation():
    evaluations = {name: cls.evaluation for name, cls in data_module_classes().items()}
    assert evaluations == {
        "data_modules.caltech.CaltechDataModule": "mask_transfer",
        "data_modules.folders.ImageFoldersDataModule": "none",
        "data_modules.pf_pascal.PFPascalDataModule": "keypoints",
        "data_modules.pf_willow.PFWillowDataModule": "keypoints",
        "data_modules.spair.SPairDataModule": "keypoints",
        "data_modules.synthetic.SyntheticPairsDataModule": "dense_flow",
    }
    assert set(evaluations.values()) <= set(EVALUATIONS)
