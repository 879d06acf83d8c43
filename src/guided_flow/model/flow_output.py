"""FlowOutput: everything one forward pass of :class:`~guided_flow.model.flow_model.GuidedFlowModel`
computes, with the flows in the pixels of an input."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from guided_flow.model import volumes
from guided_flow.model.geometry import cell_positions, flow_cells_to_pixels


@dataclass(frozen=True)
class FlowOutput:
    """Everything one forward pass computes; flows are ``flow_s2t`` in cells of the
    ``h x w`` feature grid, volumes are ``B x (h*w) x h x w``."""

    flow: torch.Tensor  # tau, B x 2 x h x w
    guidance: torch.Tensor  # G', B x 2 x h x w
    sparse_guidance: torch.Tensor  # G, B x 2 x h x w (zero where guidance_weight == 0)
    guidance_weight: torch.Tensor  # v, B x 1 x h x w
    correlation: torch.Tensor  # C
    confidence: torch.Tensor  # Q
    refined_confidence: torch.Tensor  # Q'
    # Q' where a match may enter G: zero where the cycle test drops it (Q' without the test)
    guided_confidence: torch.Tensor
    source_features: torch.Tensor  # F^s, B x D x h x w
    target_features: torch.Tensor  # F^t, B x D x h x w
    rho: float

    @property
    def confident_density(self) -> torch.Tensor:
        """``B``: fraction of source cells with a match in the confident set Q' > rho."""
        return (self.guidance_weight > 0).flatten(1).float().mean(dim=1)

    @property
    def initial_density(self) -> torch.Tensor:
        """``B``: fraction of source cells with some Q > rho (METHOD.md section 3 calibration)."""
        has_match = volumes.source_cells_with_match(
            volumes.confident_mask(self.confidence, self.rho)
        )
        return has_match.flatten(1).float().mean(dim=1)

    def flow_pixels(self, size: tuple[int, int]) -> torch.Tensor:
        """tau resized to an input of ``size = (H, W)`` pixels: ``B x 2 x H x W`` pixels."""
        return flow_cells_to_pixels(self.flow, size)

    def confident_matches(
        self, item: int, size: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The confident matches of pair ``item``: the source cells with a match in Q' > rho and
        their sparse-guidance targets p_i + G_i, both ``N x 2`` (x, y) pixels of an input of
        ``size = (H, W)`` (cell centres at ``(x + 0.5) * stride - 0.5``)."""
        h, w = self.flow.shape[-2:]
        cells = cell_positions(h, w, device=self.flow.device, dtype=self.flow.dtype)
        valid = self.guidance_weight[item, 0].reshape(-1) > 0
        source = cells[valid]
        target = source + self.sparse_guidance[item].reshape(2, -1).t()[valid]
        stride = self.flow.new_tensor([size[1] / w, size[0] / h])
        return (source + 0.5) * stride - 0.5, (target + 0.5) * stride - 0.5

    def guidance_pixels(self, size: tuple[int, int]) -> torch.Tensor:
        """G' resized to ``size = (H, W)``: ``B x 2 x H x W`` pixels."""
        return flow_cells_to_pixels(self.guidance, size)
