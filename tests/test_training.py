"""A short run on the embedded default must not make the method worse than it starts."""

import pytest
import pytorch_lightning as pl

from data_modules.synthetic import SyntheticPairsDataModule
from guided_flow.stages import MatchingStage, PruningStage


@pytest.mark.slow
@pytest.mark.parametrize("stage_class", [PruningStage, MatchingStage])
def test_short_run_keeps_validation_pck_within_one_point(tmp_path, stage_class):
    pl.seed_everything(0)
    # the demo's optimiser settings (experiments/demo*.yaml)
    stage = stage_class(input_size=160, optimizer="adam", lr=1e-4, temperature=0.1)
    data = SyntheticPairsDataModule(
        cache_dir=str(tmp_path / "cache"),
        image_size=160,
        batch_size=2,
        train_pairs_per_epoch=20,
        val_pairs=4,
        val_images=2,
    )
    trainer = pl.Trainer(
        max_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    before = trainer.validate(stage, datamodule=data, verbose=False)[0]["val/pck"]
    trainer.fit(stage, datamodule=data)
    after = trainer.validate(stage, datamodule=data, verbose=False)[0]["val/pck"]
    assert after >= before - 0.01, (before, after)
