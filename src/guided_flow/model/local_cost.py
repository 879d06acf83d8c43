"""The local cost volume: the correlation of each source cell with the target cells around its
current match, indexed by displacement (a proposed formulation, after the correlation lookups of
PWC-Net and RAFT; not one of the paper's inputs).

The paper's matching network reads C' as ``h*w`` channels indexed by the *absolute* target cell,
so its first layer must learn a separate function for every target cell. Indexed by displacement
around the flow base instead, the input is translation-equivariant and its width does not depend
on the grid.
"""

from __future__ import annotations

import torch

from guided_flow.model.geometry import cell_positions, sample_at


def window_offsets(
    radius: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The ``(2r+1)^2 x 2`` displacements (dx, dy) of the window, raster order (dy, then dx)."""
    steps = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    dy, dx = torch.meshgrid(steps, steps, indexing="ij")
    return torch.stack((dx.reshape(-1), dy.reshape(-1)), dim=1)


def local_correlation(volume: torch.Tensor, base_flow: torch.Tensor, radius: int) -> torch.Tensor:
    """C sampled at p_i + base_i + d for every d of the ``(2r+1) x (2r+1)`` window.

    ``volume``: C ``B x (h*w) x h x w`` (channel j: target cell, grid: source cell i);
    ``base_flow``: ``B x 2 x h x w`` cells (its gradient is not followed through the sampling
    positions, as in RAFT's lookup). Bilinear, zero outside the target grid. Returns
    ``B x (2r+1)^2 x h x w``, channel k the displacement ``window_offsets(r)[k]``.
    """
    b, hw, h, w = volume.shape
    offsets = window_offsets(radius, volume.device, volume.dtype)  # K x 2
    positions = cell_positions(h, w, device=volume.device, dtype=volume.dtype)  # I x 2
    centres = positions[None] + base_flow.detach().flatten(2).transpose(1, 2)  # B x I x 2
    points = (centres[:, :, None, :] + offsets[None, None]).reshape(b * h * w, -1, 2)
    # one h x w target map per source cell: (B*I) x 1 x h x w, read at its K points
    maps = volume.permute(0, 2, 3, 1).reshape(b * h * w, 1, h, w)
    sampled = sample_at(maps, points)  # (B*I) x K x 1
    return sampled.view(b, h, w, -1).permute(0, 3, 1, 2)
