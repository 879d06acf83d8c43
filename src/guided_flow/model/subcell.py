"""Sub-cell refinement of a flow by the bilinear cosine (a proposed formulation).

For each source cell i the refined match is the target position q, within half a cell of the
flow's target (and on the grid), that maximises the cosine between F^s_i and F^t(q), the bilinear
blend of the four target features around q (the blend L_M samples). In a patch with corners
k = 00, 10, 01, 11 and bilinear weights w(t), t in [0, 1]^2,

    score(t) = w(t)^T c / sqrt(w(t)^T G w(t)),  c_k = <F^s_i, F^t_k>,  G_kl = <F^t_k, F^t_l>,

which is ||F^s_i|| times that cosine: it is exact from 4 dot products and one 4 x 4 Gram matrix
per patch, without sampling features. By Cauchy-Schwarz the score reaches ||F^s_i|| only where
the blend is parallel to F^s_i, so an identity pair gets exactly zero flow however alike
neighbouring cells are and wherever the border is. A soft-argmax, by contrast, is pulled by every
similar neighbour and by a window the border cuts.

The search is kept within half a cell of the flow's target so that it corrects a soft-argmax's
bias (up to 0.26 cell on the identity pairs measured) without re-deciding the match. It runs
coarse to fine on dyadic lattices around the cell n_i nearest to the target (steps 1/4, 1/16,
1/64 cell, each 9 x 9 around the previous best), so whole cells are candidates and positions
stay exact; candidates past the half-cell bound never win. n_i itself is always within it.
Scores are computed in float64: near-duplicate neighbours (<F_i, F_j> = 1 - 1e-4) lower the score
a sixty-fourth of a cell away by about 1e-8, below float32's resolution.

The refined target is kept only where the features resolve a position below one cell: where the
best blend's cosine with F^s_i is at least F^s_i's own cosine with its nearest neighbour in the
source grid (the 4 cells one cell away). A blend that matches the source better than the source
matches itself one cell away places the match within the cell (an identity pair: cosine 1); one
that does not leaves the position undetermined below a cell, and there S, the expectation over
the window, is kept rather than one point of a flat cosine landscape. On pairs of different
instances the best cosine (about 0.5) stays below the source's self-similarity (about 0.9), so S is
kept almost everywhere.
"""

from __future__ import annotations

import torch

from guided_flow.model.geometry import cell_positions

SEARCH_RADIUS = 0.5
"""How far, in cells along each axis, the refined target may move from the flow's target."""

ROUNDING = 1e-6
"""Cosines this far below the source's self-similarity still count as reaching it: the rounding
of float32 features, so that a cell whose neighbour is its exact duplicate is still refined."""

# (radius, step) of each search level in cells; steps are powers of two, so sums stay exact.
SEARCH_LEVELS = ((1.0, 0.25), (0.25, 0.0625), (0.0625, 0.015625))


def bilinear_weights(t: torch.Tensor) -> torch.Tensor:
    """Weights of a patch's corners 00, 10, 01, 11 at points ``t`` (``... x 2 x N``, (tx, ty) in
    [0, 1]). Returns ``... x 4 x N``."""
    tx, ty = t.unbind(dim=-2)
    return torch.stack(((1 - tx) * (1 - ty), tx * (1 - ty), (1 - tx) * ty, tx * ty), dim=-2)


CORNER_PAIRS = [(k, m) for k in range(4) for m in range(k, 4)]
"""The 10 pairs k <= m of a patch's corners: the entries of its symmetric Gram matrix."""


def patch_grams(features: torch.Tensor) -> torch.Tensor:
    """The Gram matrices of the corners of every patch of a grid, once per pair of corners:
    ``B x D x h x w`` (h, w >= 2) -> ``B x 10 x (h-1)*(w-1)``, entry j = <F_k, F_m> for
    (k, m) = ``CORNER_PAIRS[j]``, patches in raster order of their top-left corner."""
    h, w = features.shape[-2:]
    corners = [features[..., dy : h - 1 + dy, dx : w - 1 + dx] for dy in (0, 1) for dx in (0, 1)]
    return torch.stack(
        [(corners[k] * corners[m]).sum(dim=1).flatten(1) for k, m in CORNER_PAIRS], dim=1
    )


def _lattice(radius: float, step: float, device: torch.device) -> torch.Tensor:
    """Offsets ``P x 2 x 1`` of a square lattice of ``step`` within ``radius``, (0, 0) included."""
    count = round(radius / step)
    ticks = torch.arange(-count, count + 1, device=device, dtype=torch.float64) * step
    dy, dx = torch.meshgrid(ticks, ticks, indexing="ij")
    return torch.stack((dx.reshape(-1), dy.reshape(-1)), dim=1)[..., None]


class _PatchScores:
    """The score of target positions for every source cell, within ``SEARCH_RADIUS`` of its
    flow's target.

    ``source``, ``target``: float64 features ``B x D x h x w``; ``landing``: the flow's targets
    ``B x 2 x N`` (cells, (x, y)); ``nearest``: n_i, the cells nearest to them on the grid.
    """

    def __init__(
        self,
        source: torch.Tensor,
        target: torch.Tensor,
        landing: torch.Tensor,
        nearest: torch.Tensor,
    ) -> None:
        b, d, h, w = target.shape
        self.width, self.nearest = w, nearest
        size = nearest.new_tensor([w - 1, h - 1])[None, :, None]
        # Patches are taken among the 3 x 3 cells around n_i, which hold the half-cell window.
        self.low, self.high = (nearest - 1).clamp_min(0), torch.minimum(nearest + 1, size)
        # Clamped to the grid on both sides, so a target past the border gets the border cell.
        self.search_low = torch.minimum((landing - SEARCH_RADIUS).clamp_min(0), size)
        self.search_high = torch.minimum((landing + SEARCH_RADIUS).clamp_min(0), size)
        # <F^s_i, F^t_j> for the 3 x 3 cells j around n_i (clamped to the grid): B x 9 x N.
        flat_source, flat_target = source.reshape(b, d, -1), target.reshape(b, d, -1)
        offsets = _lattice(1.0, 1.0, nearest.device).long()  # 9 x 2 x 1, (dx, dy), raster order
        around = torch.minimum((nearest.long()[:, None] + offsets).clamp_min(0), size.long())
        cells = (around[:, :, 1] * w + around[:, :, 0]).flatten(1)  # B x 9N
        neighbours = torch.gather(flat_target, 2, cells[:, None].expand(b, d, -1))
        self.dots = (neighbours.view(b, d, 9, -1) * flat_source[:, :, None]).sum(dim=1)
        grams = patch_grams(target)  # B x 10 x (h-1)(w-1)
        twice = torch.tensor([1.0 if k == m else 2.0 for k, m in CORNER_PAIRS], dtype=grams.dtype)
        self.grams = grams * twice.to(grams.device)[None, :, None]  # off-diagonal pairs twice

    def best(self, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The best of ``candidates`` (``B x P x 2 x N`` target positions, clamped to within one
        cell of n_i and to the grid; those outside the search window never win) for each source
        cell, ``B x 2 x N``, and its score, ``B x N``."""
        q = torch.maximum(torch.minimum(candidates, self.high[:, None]), self.low[:, None])
        origin = torch.maximum(torch.minimum(q.floor(), self.high[:, None] - 1), self.low[:, None])
        weights = bilinear_weights(q - origin)  # B x P x 4 x N
        b, p, _, n = weights.shape
        # Corner k of each patch as one of the 3 x 3 cells around n_i.
        corner = (origin - self.nearest[:, None] + 1).long()  # B x P x 2 x N in {0, 1}
        first = corner[:, :, 1] * 3 + corner[:, :, 0]  # B x P x N
        indices = torch.stack((first, first + 1, first + 3, first + 4), dim=2).reshape(b, -1, n)
        corner_dots = torch.gather(self.dots, 1, indices).view(b, p, 4, n)
        patch = (origin[:, :, 1] * (self.width - 1) + origin[:, :, 0]).long().reshape(b, 1, -1)
        gram = torch.gather(self.grams, 2, patch.expand(b, 10, -1)).view(b, 10, p, n)
        numerator = (weights * corner_dots).sum(dim=2)  # B x P x N
        squared_norm = torch.zeros_like(numerator)
        for j, (k, m) in enumerate(CORNER_PAIRS):  # w^T G w, over the 10 pairs k <= m
            squared_norm.addcmul_(weights[:, :, k] * weights[:, :, m], gram[:, j])
        score = numerator / squared_norm.clamp_min(1e-24).sqrt()
        inside = ((q >= self.search_low[:, None]) & (q <= self.search_high[:, None])).all(dim=2)
        best_score, choice = score.masked_fill(~inside, -torch.inf).max(dim=1)
        choice = choice[:, None, None].expand(b, 1, 2, n)  # B x 1 x 2 x N
        return torch.gather(q, 1, choice)[:, 0], best_score


def self_similarity(features: torch.Tensor) -> torch.Tensor:
    """The largest cosine of each cell's feature with those of the (up to) 4 cells one cell away
    on its own grid: ``B x D x h x w`` -> ``B x h x w``."""
    unit = torch.nn.functional.normalize(features, dim=1)
    across = (unit[..., :-1] * unit[..., 1:]).sum(dim=1)  # cell and its right neighbour
    down = (unit[..., :-1, :] * unit[..., 1:, :]).sum(dim=1)  # cell and the one below
    pad = torch.nn.functional.pad
    neighbours = (
        pad(across, (0, 1), value=-torch.inf),  # right
        pad(across, (1, 0), value=-torch.inf),  # left
        pad(down, (0, 0, 0, 1), value=-torch.inf),  # below
        pad(down, (0, 0, 1, 0), value=-torch.inf),  # above
    )
    return torch.stack(neighbours).amax(dim=0)


def best_blend(
    flow: torch.Tensor, source_features: torch.Tensor, target_features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The flow to the maximum of the bilinear cosine within half a cell of ``flow``'s targets
    (``B x 2 x h x w`` cells, float64) and that cosine (``B x h x w``). ``flow``: ``B x 2 x h x w``
    cells; features ``B x D x h x w``, h, w >= 2."""
    b, d, h, w = source_features.shape
    positions = cell_positions(h, w, device=flow.device, dtype=torch.float64).t()[None]
    size = positions.new_tensor([w - 1, h - 1])[None, :, None]
    landing = positions + flow.detach().double().reshape(b, 2, -1)  # B x 2 x N
    nearest = torch.minimum(landing.round().clamp_min(0), size)
    source, target = source_features.detach().double(), target_features.detach().double()
    scores = _PatchScores(source, target, landing, nearest)
    best = nearest
    for radius, step in SEARCH_LEVELS:
        best, score = scores.best(best[:, None] + _lattice(radius, step, flow.device))
    cosine = score / source.reshape(b, d, -1).norm(dim=1).clamp_min(1e-12)
    return (best - positions).view(b, 2, h, w), cosine.view(b, h, w)


def subcell_refinement(
    flow: torch.Tensor, source_features: torch.Tensor, target_features: torch.Tensor
) -> torch.Tensor:
    """Move a flow to :func:`best_blend` where its cosine reaches the source's self-similarity
    (:func:`self_similarity`), and keep it elsewhere (proposed formulation; the module docstring
    has the criteria).

    The result is piecewise constant in the features, so it is returned straight-through,
    ``flow + (refined - flow).detach()``: its value is the refined flow (to rounding), its
    gradient ``flow``'s (the soft-argmax's, through which the backbone learns). Grids narrower
    than two cells are returned unchanged.

    ``flow``: ``B x 2 x h x w`` cells; ``source_features``, ``target_features``: ``B x D x h x w``.
    Returns ``B x 2 x h x w`` cells.
    """
    b, _, h, w = source_features.shape
    if h < 2 or w < 2:
        return flow
    blend_flow, cosine = best_blend(flow, source_features, target_features)
    reach = self_similarity(source_features.detach().double()) - ROUNDING
    resolved = (cosine >= reach)[:, None]
    refined = torch.where(resolved, blend_flow.to(flow.dtype), flow.detach())
    return flow + (refined - flow).detach() if flow.requires_grad else refined
