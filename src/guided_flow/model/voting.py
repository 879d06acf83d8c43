"""Geometric voting over the matches of C: weight-free regularisers of which matches the
guidance trusts (proposed formulations).

Appearance alone confuses parts that look alike (wheels, windows); geometry tells them apart,
because the cells of one object part move together. Each voting form rescores C(i, j) by the
support that the match's displacement p_j - p_i finds among other matches, and feeds the
initial confidence Q, the cycle-consistency test and G; the soft-argmax S still reads C itself,
so voting moves the prior of S, never its sub-cell precision.

- ``"neighbourhood"``: local consensus, the mean of C(i + d, j + d) over the offsets d of a
  3 x 3 window that stay on both grids: a match is supported by its neighbours making the same
  move (NC-Net's neighbourhood consensus with a fixed, weight-free kernel).
- ``"hough"``: global Hough voting over displacements, after HPF's regularised Hough matching
  (Min et al., ICCV 2019): every match votes C(i, j) for its displacement, the vote space is
  smoothed by a 3 x 3 box, and C(i, j) is scaled by its displacement's vote over the best
  displacement's.

Volumes are ``B x (h*w) x h x w`` (channel j: target cell, spatial: source cell i).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

VOTING = ("none", "neighbourhood", "hough")
# One cell on either side: the grid's own resolution, the smallest neighbourhood (not fitted).
RADIUS = 1


def voted_volume(volume: torch.Tensor, voting: str) -> torch.Tensor:
    """C rescored by ``voting`` (:data:`VOTING`; ``"none"`` returns C itself). Same shape."""
    if voting == "neighbourhood":
        return neighbourhood_consensus(volume)
    if voting == "hough":
        return hough_voting(volume)
    return volume


def neighbourhood_consensus(volume: torch.Tensor, radius: int = RADIUS) -> torch.Tensor:
    """Mean of C(i + d, j + d) over the offsets d in ``[-radius, radius]^2`` for which both
    i + d and j + d lie on the grid. ``B x (h*w) x h x w`` -> the same shape."""
    b, hw, h, w = volume.shape
    grids = volume.reshape(b, h, w, h, w)  # target y, target x, source y, source x
    ones = torch.ones_like(grids[:1])
    pad = (radius,) * 8
    padded, valid = F.pad(grids, pad), F.pad(ones, pad)
    total = torch.zeros_like(grids)
    count = torch.zeros_like(ones)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            rows, columns = slice(dy, dy + h), slice(dx, dx + w)
            window = (slice(None), rows, columns, rows, columns)
            total += padded[window]
            count += valid[window]
    return (total / count).reshape(b, hw, h, w)


def displacement_bins(h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Index of the displacement p_j - p_i of every match, laid out ``(h*w) x (h*w)`` as
    (target j, source i), into the ``(2h - 1) x (2w - 1)`` raster of displacements."""
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )
    xs, ys = xs.reshape(-1), ys.reshape(-1)
    dx = xs[:, None] - xs[None, :] + (w - 1)
    dy = ys[:, None] - ys[None, :] + (h - 1)
    return dy * (2 * w - 1) + dx


def hough_voting(volume: torch.Tensor, smoothing: int = 2 * RADIUS + 1) -> torch.Tensor:
    """C(i, j) H(p_j - p_i) / max H, H the votes sum C over the matches of each displacement,
    smoothed by a ``smoothing x smoothing`` box. ``B x (h*w) x h x w`` -> the same shape."""
    b, hw, h, w = volume.shape
    bins = displacement_bins(h, w, volume.device).reshape(-1)
    votes = volume.new_zeros(b, (2 * h - 1) * (2 * w - 1))
    votes.scatter_add_(1, bins.expand(b, -1), volume.reshape(b, -1))
    box = volume.new_ones(1, 1, smoothing, smoothing)
    votes = F.conv2d(votes.view(b, 1, 2 * h - 1, 2 * w - 1), box, padding=smoothing // 2)
    votes = votes.view(b, -1)
    support = votes / votes.amax(dim=1, keepdim=True).clamp_min(1e-12)
    return volume * support[:, bins].view(b, hw, h, w)
