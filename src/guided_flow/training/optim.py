"""Optimiser and scheduler of a training stage: one parameter group per trained part."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning.utilities.types import OptimizerLRScheduler

from guided_flow.model.flow_model import GuidedFlowModel
from guided_flow.training.options import OptimConfig


def parameter_groups(model: GuidedFlowModel, optim: OptimConfig) -> list[dict[str, Any]]:
    """Optimiser groups: W_P, W_M and W_F at ``lr`` times their multipliers, each split into
    decayed weights and undecayed BatchNorm parameters and biases (1-D tensors); parameters
    without ``requires_grad`` and empty groups are left out."""
    parts: tuple[tuple[str, torch.nn.Module | None, float], ...] = (
        ("pruning", model.pruning_net, optim.pruning_lr_mult),
        ("matching", model.matching_net, optim.matching_lr_mult),
        ("backbone", model.backbone, optim.backbone_lr_mult),
    )
    groups = []
    for name, module, mult in parts:
        if module is None:
            continue
        trained = [p for p in module.parameters() if p.requires_grad]
        for decayed, decay in ((True, optim.weight_decay), (False, 0.0)):
            params = [p for p in trained if (p.ndim > 1) == decayed]
            if params:
                groups.append(
                    {
                        "name": f"{name}{'' if decayed else '_no_decay'}",
                        "params": params,
                        "lr": optim.lr * mult,
                        "weight_decay": decay,
                    }
                )
    return groups


def build_optimizer(
    model: GuidedFlowModel, optim: OptimConfig, total_steps: int
) -> OptimizerLRScheduler:
    """The optimiser of ``optim`` over :func:`parameter_groups`, with its per-step scheduler
    over ``total_steps`` (what ``configure_optimizers`` returns)."""
    groups = parameter_groups(model, optim)
    optimizer: torch.optim.Optimizer
    if optim.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, momentum=optim.momentum)
    else:
        optimizer = torch.optim.AdamW(groups)
    if optim.scheduler == "none":
        return optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    if optim.scheduler == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(total_steps, 1))
    else:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, max(total_steps // 3, 1), gamma=0.1)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
