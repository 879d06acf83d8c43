"""Helpers of the tests: discriminative feature maps (distinct random unit vectors per cell) and
the benchmark scripts loaded as modules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` (not a package) imported as a module, its folder on
    the import path as when the script runs, so that it finds the scripts it imports."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_unit_features(batch: int, dim: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """``B x D x h x w`` feature map whose cells are independent random unit vectors."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, dim, h, w, generator=generator)
    return features / features.norm(dim=1, keepdim=True)


def shifted_pair(
    batch: int, dim: int, h: int, w: int, shift: tuple[int, int], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source features and a target whose content is the source moved by ``shift = (sx, sy)``
    whole cells: F^t(p + shift) = F^s(p); target cells not covered get fresh random vectors."""
    sx, sy = shift
    source = random_unit_features(batch, dim, h, w, seed)
    target = random_unit_features(batch, dim, h, w, seed + 1)
    target[:, :, max(sy, 0) : h + min(sy, 0), max(sx, 0) : w + min(sx, 0)] = source[
        :, :, max(-sy, 0) : h - max(sy, 0), max(-sx, 0) : w - max(sx, 0)
    ]
    return source, target


def save_stage_checkpoint(stage, path):
    """Write ``stage`` (a guided-flow LightningModule) as a Lightning checkpoint at ``path``, as a
    trained run would, without training it. Returns ``path``."""
    import pytorch_lightning as pl

    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(stage)
    trainer.save_checkpoint(path)
    return path


def wandb_records(path):
    """The protobuf records of a W&B run log (``run-<id>.wandb``: a LevelDB-style log of 32 KiB
    blocks, each record chunk behind a 7-byte header (crc32, length, type), after a 7-byte file
    header), so that tests can read an offline run without a server."""
    import struct

    from wandb.proto import wandb_internal_pb2

    block, header = 32768, 7
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run log"
    position, pending = header, b""
    while position + header <= len(data):
        left = block - position % block
        if left < header:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + header])
        pending += data[position + header : position + header + length]
        position += header + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record
