"""The weakly supervised losses of METHOD.md section 10 (their forms are proposed formulations;
their roles and weights are the authors').

Masks are optional foreground masks on the feature grid, ``B x 1 x h x w`` bool; a loss whose
selection is empty is zero (and still part of the graph).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from guided_flow.model.geometry import warp_by_flow
from guided_flow.model.volumes import EPS, confident_mask, source_cells_with_match


def _masked_mean(values: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``selection`` (broadcastable bool) holds; 0 when it is empty."""
    selection = selection.expand_as(values)
    count = selection.sum()
    return torch.where(selection, values, torch.zeros_like(values)).sum() / count.clamp_min(1)


def initial_confident_set(
    confidence: torch.Tensor,
    rho: float,
    source_mask: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """S* = {(i, j): Q(i, j) > rho}, restricted to foreground cells i and j when masks are given.
    ``confidence``: ``B x (h*w) x h x w``; returns a bool volume of the same shape."""
    selected = confident_mask(confidence, rho)
    if source_mask is not None:
        selected = selected & source_mask
    if target_mask is not None:
        selected = selected & target_mask.flatten(1)[:, :, None, None]
    return selected


def silhouette_loss(
    confidence: torch.Tensor, refined_confidence: torch.Tensor, selected: torch.Tensor
) -> torch.Tensor:
    """L_sil = mean over S* of (Q'(i, j) - Q(i, j))^2: keeps Q' close to Q on S*; Q is the target
    (detached), so only the pruning network is pulled."""
    return _masked_mean((refined_confidence - confidence.detach()) ** 2, selected)


def negative_pair_loss(
    confidence: torch.Tensor, refined_confidence: torch.Tensor, rho: float, margin: float = 0.1
) -> torch.Tensor:
    """L_neg (proposed formulation, beyond the paper; after the weak losses of NC-Net and DCCNet):
    on a pair of images that do not correspond (different categories), no match should be
    confident. Mean over the pair's initial confident set {(i, j): Q(i, j) > rho} of
    max(0, Q'(i, j) - (rho - margin)): it pulls those matches below the threshold, by a margin,
    and lets go of them once they are there. L_sil keeps Q' = Q on positive pairs, so the
    pruning network must learn what tells the two apart. Volumes ``B x (h*w) x h x w``, every
    pair a negative one; 0 when no match is confident."""
    selected = confident_mask(confidence, rho)
    return _masked_mean(F.relu(refined_confidence - (rho - margin)), selected)


def geometric_loss(
    source_features: torch.Tensor,
    target_features: torch.Tensor,
    guidance: torch.Tensor,
    selected: torch.Tensor,
    refined_confidence: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_geo: the residual r_i = ||F^s_i - [G' o F^t]_i||^2 over the cells i with a match in S*,
    where [G' o F^t]_i is F^t bilinearly sampled at p_i + G'_i.

    Without ``refined_confidence`` it is the plain mean of r_i (METHOD.md's form). With it (the
    proposed formulation the stages use by default) each cell is weighted by its refined
    confidence on S*, w_i = sum_j [(i, j) in S*] Q'(i, j): sum_i w_i r_i / sum_i w_i. The plain
    mean reaches W_P only through the interpolation weights of G', which barely move; the weighted
    mean lets the pruning network lower the confidence of geometrically inconsistent matches,
    the role the authors give this loss. Features ``B x D x h x w``, ``guidance``
    ``B x 2 x h x w`` cells, ``selected`` = S* (:func:`initial_confident_set`), volumes
    ``B x (h*w) x h x w``."""
    warped = warp_by_flow(target_features, guidance)
    residual = ((source_features - warped) ** 2).sum(dim=1, keepdim=True)
    if refined_confidence is None:
        return _masked_mean(residual, source_cells_with_match(selected))
    weights = (refined_confidence * selected).sum(dim=1, keepdim=True)
    return (weights * residual).sum() / weights.sum().clamp_min(EPS)


def matching_loss(
    source_features: torch.Tensor,
    target_features: torch.Tensor,
    flow: torch.Tensor,
    window: int = 5,
    temperature: float = 1.0,
    source_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_M = mean_i -log softmax over m in M_i of <F^s_i, [tau o F^t]_m> / temperature, at m = i.

    ``[tau o F^t]`` is F^t warped onto the source grid by tau (``B x 2 x h x w`` cells) and
    re-normalised to unit length (proposed formulation): a bilinear blend of two unit vectors is
    shorter than either, so without re-normalisation the score is linear in the blend and always
    peaks at a cell centre, and the loss prefers the integer nearest-neighbour flow to the true
    sub-cell one; with it the score is a cosine, which can peak between cells (docs/decisions.md).
    The window M_i (``window x window``) is centred at i, its centre is the positive, the rest
    negatives. Window positions outside the grid are left out of the softmax.
    """
    b, d, h, w = source_features.shape
    n = window * window
    warped = F.normalize(warp_by_flow(target_features, flow), dim=1, eps=EPS)
    neighbours = F.unfold(warped, window, padding=window // 2).view(b, d, n, h * w)
    scores = torch.einsum("bdk,bdnk->bnk", source_features.reshape(b, d, h * w), neighbours)
    inside = F.unfold(warped.new_ones(1, 1, h, w), window, padding=window // 2).view(1, n, h * w)
    scores = (scores / temperature).masked_fill(inside == 0, float("-inf"))
    nll = -torch.log_softmax(scores, dim=1)[:, n // 2].view(b, 1, h, w)
    if source_mask is None:
        return nll.mean()
    return _masked_mean(nll, source_mask)


def smoothness_loss(
    flow: torch.Tensor, source_mask: torch.Tensor | None = None, pixels_per_cell: float = 1.0
) -> torch.Tensor:
    """L_sm = mean first-order L1 difference of tau over 4-neighbours:
    (mean_x ||tau(x+1, y) - tau(x, y)||_1 + mean_y ||tau(x, y+1) - tau(x, y)||_1) / 2, where
    ||.||_1 sums the two flow components, with tau (``B x 2 x h x w`` cells) measured in pixels
    (``pixels_per_cell``, the backbone stride; the unit is a proposed formulation: with the
    authors' weight 0.1 it balances L_M, see docs/decisions.md). With a mask only pairs of
    foreground cells count."""
    flow = flow * pixels_per_cell
    dx = (flow[..., :, 1:] - flow[..., :, :-1]).abs().sum(dim=1, keepdim=True)
    dy = (flow[..., 1:, :] - flow[..., :-1, :]).abs().sum(dim=1, keepdim=True)
    if source_mask is None:
        return (dx.mean() + dy.mean()) / 2
    keep_x = source_mask[..., :, 1:] & source_mask[..., :, :-1]
    keep_y = source_mask[..., 1:, :] & source_mask[..., :-1, :]
    return (_masked_mean(dx, keep_x) + _masked_mean(dy, keep_y)) / 2


def compose_flows(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The flow of following ``first`` (a -> b, on a's grid) and then ``second`` (b -> c, on b's
    grid): first(p) + second(p + first(p)), ``B x 2 x h x w`` cells, ``second`` read bilinearly
    (zero outside the grid; see :func:`inside_grid`)."""
    return first + warp_by_flow(second, first)


def inside_grid(flow: torch.Tensor) -> torch.Tensor:
    """``B x 1 x h x w`` bool: where p + flow(p) (cells) lies on the ``h x w`` grid."""
    _, _, h, w = flow.shape
    x = torch.arange(w, device=flow.device, dtype=flow.dtype).view(1, 1, w) + flow[:, 0]
    y = torch.arange(h, device=flow.device, dtype=flow.dtype).view(1, h, 1) + flow[:, 1]
    return ((x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)).unsqueeze(1)


def warp_consistency_loss(
    self_flow: torch.Tensor,
    cross_flow: torch.Tensor,
    back_flow: torch.Tensor,
    warp: torch.Tensor,
    valid: torch.Tensor,
    visibility: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp consistency (proposed formulation, after Truong et al., ICCV 2021; not one of the
    paper's losses). A real pair (I_s, I_t) and I_s' = I_s warped by a known W (s' -> s):

    - self term: mean over valid cells of ||F(s' -> s) - W||_2;
    - composed term: mean of ||F(s' -> t) then F(t -> s) - W||_2 (:func:`compose_flows`) over the
      cells that are valid, whose match in t lies on the grid and whose composed error is below
      ``visibility`` cells (a detached mask: regions of s' with no counterpart in the other
      object, background or occlusion, cannot be composed back and must not pull the flow).

    Flows ``B x 2 x h x w`` in cells: ``self_flow`` and ``cross_flow`` on the grid of s',
    ``back_flow`` on t's; ``warp`` = W at the cells of s'; ``valid`` ``B x 1 x h x w`` bool, where
    W lands inside I_s. Returns the two terms (end-point errors in cells, 0 when empty).
    """
    self_error = (self_flow - warp).norm(dim=1, keepdim=True)
    composed = compose_flows(cross_flow, back_flow)
    cross_error = (composed - warp).norm(dim=1, keepdim=True)
    visible = valid & inside_grid(cross_flow) & (cross_error.detach() < visibility)
    return _masked_mean(self_error, valid), _masked_mean(cross_error, visible)
