"""Validation before the first step: the untrained model is a checkpoint candidate, so a run that
only makes the model worse keeps the weights it started from."""

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from data_modules.synthetic import SyntheticPairsDataModule
from guided_flow.training.stages import MatchingStage


@pytest.mark.slow
def test_untrained_model_is_a_checkpoint_candidate(tmp_path):
    pl.seed_everything(0)
    # a learning rate that wrecks the matching network at its first step
    stage = MatchingStage.from_options(input_size=160, optimizer="sgd", lr=1e3, trainable_blocks=0)
    initial = {k: v.clone() for k, v in stage.state_dict().items()}
    data = SyntheticPairsDataModule(
        cache_dir=str(tmp_path / "cache"),
        image_size=160,
        batch_size=2,
        train_pairs_per_epoch=8,
        val_pairs=4,
    )
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path, filename="best", monitor="val/epe_px", mode="min", save_top_k=1
    )
    trainer = pl.Trainer(
        max_steps=4,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        logger=False,
        callbacks=[checkpoint],
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(stage, datamodule=data)
    saved = torch.load(checkpoint.best_model_path, weights_only=True)
    assert saved["global_step"] == 0
    assert all(torch.equal(saved["state_dict"][k], v) for k, v in initial.items())
    assert any(not torch.equal(stage.state_dict()[k], v) for k, v in initial.items())
