"""Negative pairs from a training batch: pictures that must not correspond (proposed, beyond the
paper; the loss is :func:`~guided_flow.model.losses.negative_pair_loss`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from guided_flow.model import losses, volumes
from guided_flow.model.flow_model import FlowOutput, GuidedFlowModel


def negative_pair_term(
    model: GuidedFlowModel, out: FlowOutput, labels: Sequence[str], margin: float
) -> torch.Tensor:
    """L_neg of the batch's negative pairs: each source with the previous pair's target
    (``target.roll(1)``), kept where ``labels`` (one per pair: its category, or its photograph
    for synthetic warps) differ. Reuses ``out``'s features: one correlation and one pruning-net
    pass, no backbone pass. Zero, still in the graph, when no pair is negative."""
    keep = [i for i in range(len(labels)) if labels[i] != labels[i - 1]]
    if not keep:
        return out.refined_confidence.sum() * 0.0
    rows = torch.tensor(keep, device=out.source_features.device)
    target = out.target_features.roll(1, dims=0)
    volume = volumes.correlation(out.source_features[rows], target[rows])
    confidence = volumes.soft_mutual_confidence(volume)
    refined = model.pruning_net.refine(confidence)
    return losses.negative_pair_loss(confidence, refined, model.rho, margin)
