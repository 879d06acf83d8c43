"""Grids, flows and warps.

Conventions used throughout the project:

- Positions are (x, y). On a feature grid they are in **cell units**: cell (x, y) has its centre at
  position (x, y), x in [0, w-1]. In images they are in **pixels**, pixel centres at integers.
- A cell centre sits at pixel ``(x + 0.5) * stride - 0.5`` (half-pixel convention), so a flow in
  cells becomes a flow in pixels by bilinear resizing with ``align_corners=False`` and a
  multiplication by the stride.
- ``flow_s2t`` is defined on the source grid and points into the target: ``B x 2 x H x W`` in
  tensors (channel 0 = dx, channel 1 = dy).
"""

from __future__ import annotations

import numpy as np
import skimage.draw
import torch
import torch.nn.functional as F


def cell_positions(
    h: int, w: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Positions of the cells of an ``h x w`` grid in raster order: ``(h*w) x 2`` as (x, y)."""
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=dtype),
        torch.arange(w, device=device, dtype=dtype),
        indexing="ij",
    )
    return torch.stack((xs.reshape(-1), ys.reshape(-1)), dim=1)


def positions_to_normalised(points: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Map (x, y) positions on an ``h x w`` grid (centres at integers) to ``grid_sample``'s
    [-1, 1] coordinates with ``align_corners=True``. Any leading shape ``... x 2``."""
    scale = points.new_tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)])
    return points * scale - 1.0


def sample_at(values: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinearly sample ``values`` (``B x C x H x W``) at positions ``points`` (``B x N x 2``,
    (x, y) on the same grid, centres at integers). Outside the grid samples are zero.
    Returns ``B x N x C``."""
    h, w = values.shape[-2:]
    grid = positions_to_normalised(points, h, w).to(values.dtype).unsqueeze(1)  # B x 1 x N x 2
    sampled = F.grid_sample(values, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return sampled[:, :, 0].transpose(1, 2)


def warp_by_flow(target: torch.Tensor, flow_s2t: torch.Tensor) -> torch.Tensor:
    """Backward-warp ``target`` (``B x C x H x W``) onto the source grid: the result at source
    position p is ``target`` bilinearly sampled at ``p + flow_s2t(p)`` (``B x 2 x H x W``, same
    grid units). Samples falling outside the target are zero. Returns ``B x C x H x W``."""
    b, _, h, w = flow_s2t.shape
    base = cell_positions(h, w, device=flow_s2t.device, dtype=flow_s2t.dtype)
    points = base.view(1, h, w, 2) + flow_s2t.permute(0, 2, 3, 1)
    grid = positions_to_normalised(points, h, w).to(target.dtype)
    return F.grid_sample(target, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def flow_cells_to_pixels(flow_cells: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a flow in cells (``B x 2 x h x w``) to an image of ``size = (H, W)`` pixels and
    convert it to pixels (half-pixel convention, per-axis stride ``W / w`` and ``H / h``).
    Returns ``B x 2 x H x W``."""
    h, w = flow_cells.shape[-2:]
    out_h, out_w = size
    flow = F.interpolate(flow_cells, size=(out_h, out_w), mode="bilinear", align_corners=False)
    scale = flow.new_tensor([out_w / w, out_h / h]).view(1, 2, 1, 1)
    return flow * scale


def transfer_keypoints(flow_s2t: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Move source keypoints (``B x K x 2`` pixels) by a pixel flow (``B x 2 x H x W``) sampled
    bilinearly at their exact sub-pixel positions. Returns ``B x K x 2`` target pixels."""
    h, w = flow_s2t.shape[-2:]
    # Clamp the sampling position so keypoints on the last half pixel still read the border flow.
    inside = torch.stack((points[..., 0].clamp(0, w - 1), points[..., 1].clamp(0, h - 1)), dim=-1)
    return points + sample_at(flow_s2t, inside)


def rescale_points(points: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Map (x, y) pixel positions (``... x 2``) into an image resized by ``scale`` (``... x 2``,
    (new W / old W, new H / old H), broadcastable), pixel centres at integers in both images."""
    return (points + 0.5) * scale - 0.5


def resize_scale(original_size: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
    """Per-axis factors from original images (``B x 2`` as (H, W) pixels) to an input grid of
    ``input_size = (H, W)``. Returns ``B x 2`` float64 as (x, y) factors."""
    input_wh = torch.tensor(input_size[::-1], dtype=torch.float64, device=original_size.device)
    return input_wh / original_size.flip(-1).double()


def transfer_original_points(
    flow_s2t: torch.Tensor,
    points: torch.Tensor,
    source_size: tuple[int, int],
    target_size: tuple[int, int],
) -> torch.Tensor:
    """Transfer points of an original source image (``K x 2`` pixels) by ``flow_s2t``
    (``2 x H x W`` pixels of the network's input grid, to which both originals, of
    ``source_size`` and ``target_size`` = (H, W), were resized with per-axis factors): each point
    goes to the input grid, moves by the flow read bilinearly there, and returns to the original
    target. Returns ``K x 2`` float64 original target pixels."""
    input_height, input_width = flow_s2t.shape[-2:]
    input_size = (input_height, input_width)
    sizes = torch.tensor([source_size, target_size], device=flow_s2t.device)
    source_scale, target_scale = resize_scale(sizes, input_size)
    input_points = rescale_points(points.double(), source_scale)
    moved = transfer_keypoints(flow_s2t[None].double(), input_points[None])
    return rescale_points(moved[0], 1.0 / target_scale)


def rasterise_polygon(polygon: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The pixels of an image of ``size = (H, W)`` whose centre lies inside the polygon with
    (x, y) pixel vertices ``polygon`` (``P x 2``; rows with NaN are padding and ignored). Returns
    ``H x W`` bool (empty for fewer than 3 vertices)."""
    vertices = np.asarray(polygon, dtype=np.float64).reshape(-1, 2)
    vertices = vertices[np.isfinite(vertices).all(axis=1)]
    mask = np.zeros(size, dtype=bool)
    if len(vertices) >= 3:
        rows, cols = skimage.draw.polygon(vertices[:, 1], vertices[:, 0], shape=size)
        mask[rows, cols] = True
    return mask
