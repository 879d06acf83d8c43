"""Warp consistency on real pairs (proposed formulation, beyond the paper: Truong et al., "Warp
Consistency for Unsupervised Learning of Dense Correspondences", ICCV 2021).

For a real pair (I_s, I_t), I_s' is I_s warped by a random known affine + TPS W (the warps of
METHOD.md section 11). The flow from I_s' to I_s must equal W, and the flow from I_s' to I_t
followed by the flow from I_t to I_s must equal it too: dense targets on pairs of different
objects, with no annotation (:func:`~guided_flow.model.losses.warp_consistency_loss`).
"""

from __future__ import annotations

import torch

from data_modules.warps import (
    WarpConfig,
    WarpParams,
    sample_warp_params,
    synthesize_pairs,
    warp_key,
    warp_points,
)
from guided_flow.model.flow_model import FlowOutput, GuidedFlowModel
from guided_flow.model.geometry import cell_positions
from guided_flow.model.losses import warp_consistency_loss


def warp_at_cells(
    params: WarpParams, size: tuple[int, int], grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """W (s' -> s) at the cell centres of the ``grid`` of a ``size = (H, W)`` input:
    ``B x 2 x h x w`` cells, and ``B x 1 x h x w`` bool where W lands inside the image."""
    (height, width), (h, w) = size, grid
    affine = params.affine
    stride = affine.new_tensor([width / w, height / h])
    centres = (cell_positions(h, w, device=affine.device, dtype=affine.dtype) + 0.5) * stride - 0.5
    batch = affine.shape[0]
    matches = warp_points(params, centres.expand(batch, -1, -1), size)
    flow = (matches - centres) / stride
    inside = (
        (matches[..., 0] >= -0.5)
        & (matches[..., 0] <= width - 0.5)
        & (matches[..., 1] >= -0.5)
        & (matches[..., 1] <= height - 0.5)
    )
    return flow.view(batch, h, w, 2).permute(0, 3, 1, 2), inside.view(batch, 1, h, w)


def warp_consistency_terms(
    model: GuidedFlowModel,
    source_image: torch.Tensor,
    out: FlowOutput,
    step: int,
    visibility: float,
    seed: int = 0,
    warps: WarpConfig | None = None,
) -> dict[str, torch.Tensor]:
    """``{"wc_self", "wc_cross"}`` for a batch whose forward pass ``out`` (source -> target)
    is computed: ``source_image`` ``B x 3 x H x W`` is warped with keys of ``step``, its features
    computed once, and the three flows s' -> s, s' -> t and t -> s computed from features."""
    assert model.backbone is not None, "warp consistency needs the model's backbone"
    batch = source_image.shape[0]
    keys = torch.as_tensor(warp_key(step, torch.arange(batch, dtype=torch.int64)))
    params = sample_warp_params(seed, keys, warps, device=source_image.device)
    warped_features = model.backbone(synthesize_pairs(source_image, params).source)
    size = (source_image.shape[-2], source_image.shape[-1])
    warp, valid = warp_at_cells(params, size, (model.grid[0], model.grid[1]))
    source, target = out.source_features, out.target_features
    self_term, cross_term = warp_consistency_loss(
        model.forward_features(warped_features, source).flow,
        model.forward_features(warped_features, target).flow,
        model.forward_features(target, source).flow,
        warp.to(out.flow.dtype),
        valid,
        visibility,
    )
    return {"wc_self": self_term, "wc_cross": cross_term}
