"""Lightning callbacks of the project."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter

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
