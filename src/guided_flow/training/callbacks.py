"""Lightning callbacks of the project, and the validation a fit runs before its first step."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter, ModelCheckpoint

from guided_flow.io.flow_files import write_flow_npy


class FlowWriter(BasePredictionWriter):
    """Writes each predicted pair's ``flow_s2t`` as ``<output_dir>/flow_s2t_<index>.npy``
    (``H x W x 2`` float32, input pixels: for each source pixel the (dx, dy) to its match)."""

    def __init__(self, output_dir: str) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Mapping[str, Any],
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        flows = prediction["flow_s2t"].permute(0, 2, 3, 1).float().cpu().numpy()
        for index, flow in zip(prediction["index"].tolist(), flows, strict=True):
            write_flow_npy(os.path.join(self.output_dir, f"flow_s2t_{index:06d}.npy"), flow)


def validate_before_training(trainer: pl.Trainer) -> None:
    """Run the fit's validation loop once before the first training step and offer its result
    to every monitoring ModelCheckpoint (Lightning skips step 0 on its own), so that training
    keeps the untrained weights unless it beats them. Nothing happens without validation
    batches or under ``fast_dev_run``."""
    # Lightning sets Trainer.fast_dev_run at run time: the Trainer type does not declare it
    if trainer.fast_dev_run or not trainer.enable_validation:  # type: ignore[attr-defined]
        return
    loop = trainer.fit_loop.epoch_loop.val_loop
    loop.setup_data()
    if loop.skip:
        return
    checkpoints = [
        cb
        for cb in trainer.checkpoint_callbacks
        if isinstance(cb, ModelCheckpoint) and cb.monitor is not None
    ]
    for callback in checkpoints:
        # Lightning's guard against saving twice at one step also blocks the first save at 0
        callback._last_global_step_saved = -1
    first_loop_iter = trainer._logger_connector._first_loop_iter
    trainer.validating = True
    loop.run()
    trainer.training = True
    trainer._logger_connector._first_loop_iter = first_loop_iter
    for callback in checkpoints:
        if callback._last_global_step_saved != trainer.global_step:  # it saves per epoch
            callback._save_topk_checkpoint(trainer, callback._monitor_candidates(trainer))
        callback._last_global_step_saved = trainer.global_step
