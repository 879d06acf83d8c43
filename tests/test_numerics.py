"""Numerical faults: a non-finite loss stops (or skips) with the step and term named, and no
checkpoint with non-finite weights is written."""

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from guided_flow.training.stages import NonFiniteLossError, PruningStage


class PoisonedStage(PruningStage):
    """L_geo becomes NaN at global step 1."""

    def loss_terms(self, out, batch):
        terms = super().loss_terms(out, batch)
        if self.global_step == 1:
            terms["geo"] = terms["geo"] * float("nan")
        return terms


def _loader(size: int = 160, pairs: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(pairs, 3, size, size, generator=generator)
    items = [
        {"source_image": image, "target_image": image.roll(8, dims=2), "index": i}
        for i, image in enumerate(images)
    ]
    return DataLoader(items, batch_size=1)


def _trainer(tmp_path, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        **kwargs,
    )


def test_non_finite_loss_stops_with_step_and_term_named(tmp_path):
    stage = PoisonedStage.from_options(input_size=160, optimizer="adamw", lr=1e-3)
    with pytest.raises(NonFiniteLossError, match=r"global step 1 .*term\(s\) geo"):
        _trainer(tmp_path).fit(stage, _loader())
    assert all(torch.isfinite(p).all() for p in stage.parameters())


def test_non_finite_loss_can_skip_the_step(tmp_path):
    stage = PoisonedStage.from_options(
        input_size=160, optimizer="adamw", lr=1e-3, on_nonfinite="skip"
    )
    trainer = _trainer(tmp_path)
    trainer.fit(stage, _loader())
    assert stage.skipped_steps == 1
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 3
    assert all(torch.isfinite(p).all() for p in stage.parameters())


def test_no_checkpoint_with_non_finite_weights_is_written(tmp_path):
    stage = PruningStage.from_options(input_size=160)
    trainer = _trainer(tmp_path)
    trainer.strategy.connect(stage)
    with torch.no_grad():
        stage.model.pruning_net.body.conv8.bias[0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="non-finite weights"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()
