"""Panels of the first pairs go to the logger at validation and to PNG files at test time."""

import numpy as np
import pytest
import pytorch_lightning as pl

from data_modules.synthetic import SyntheticPairsDataModule
from guided_flow.training.loggers import AutoWandbLogger
from guided_flow.training.stages import PruningStage


@pytest.mark.slow
def test_validation_sends_pair_panels_to_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = AutoWandbLogger(save_dir=str(tmp_path), project="guided-flow-test")
    stage = PruningStage.from_options(input_size=160)
    data = SyntheticPairsDataModule(
        cache_dir=str(tmp_path / "cache"), image_size=160, batch_size=2, val_pairs=2
    )
    trainer = pl.Trainer(logger=logger, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.validate(stage, datamodule=data, verbose=False)
    logger.experiment.finish()
    images = list(tmp_path.glob("wandb/offline-run-*/files/media/images/val/pairs*.png"))
    assert len(images) == 2  # one panel per pair of the first batch


def test_pair_panel_shows_every_view():
    import torch

    from guided_flow.viz.panels import pair_panel

    stage = PruningStage.from_options(input_size=160).eval()
    images = torch.randn(2, 3, 160, 160)
    batch = {"source_image": images[:1], "target_image": images[1:]}
    with torch.no_grad():
        out = stage(batch["source_image"], batch["target_image"])
    panel = pair_panel(stage.model, batch, out)
    assert panel.dtype == np.uint8 and panel.ndim == 3
    # five views side by side (the matches view is two images wide): much wider than tall
    assert panel.shape[1] > 5 * panel.shape[0]
