"""The parameter-free steps of Guided Semantic Flow (METHOD.md sections 2-7).

Volumes are ``B x (h*w) x h x w``: channel j indexes target cells, the spatial grid indexes
source cells i, both in raster order. Displacements and positions are in feature-cell units.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from guided_flow.model.geometry import cell_positions

EPS = 1e-6


def correlation(source_features: torch.Tensor, target_features: torch.Tensor) -> torch.Tensor:
    """C(i, j) = ReLU(<F^s_i, F^t_j>) (section 2; the ReLU is a proposed formulation).

    ``source_features``, ``target_features``: ``B x D x h x w`` (L2-normalised).
    Returns ``B x (h*w) x h x w``.
    """
    b, d, h, w = source_features.shape
    source = source_features.reshape(b, d, h * w)
    target = target_features.reshape(b, d, -1)
    volume = torch.bmm(target.transpose(1, 2), source)  # B x J x I
    return F.relu(volume).view(b, -1, h, w)


def soft_mutual_confidence(volume: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Initial confidence Q (section 3, proposed formulation: soft mutual nearest neighbours).

    Q(i, j) = C(i, j) / max_k C(k, j) * C(i, j) / max_l C(i, l); every mutual nearest neighbour
    has Q = 1. ``volume``: ``B x (h*w) x h x w``; returns the same shape.
    """
    best_source_per_target = volume.flatten(2).amax(dim=2)[..., None, None]  # B x J x 1 x 1
    best_target_per_source = volume.amax(dim=1, keepdim=True)  # B x 1 x h x w
    return (volume / (best_source_per_target + eps)) * (volume / (best_target_per_source + eps))


def confident_mask(confidence: torch.Tensor, rho: float) -> torch.Tensor:
    """The confident set {(i, j): confidence > rho} as a bool volume of the same shape."""
    return confidence > rho


def source_cells_with_match(confident: torch.Tensor) -> torch.Tensor:
    """``B x 1 x h x w`` bool: source cells with at least one confident target cell."""
    return confident.any(dim=1, keepdim=True)


def round_trip_consistent(volume: torch.Tensor, radius: float = 1.0) -> torch.Tensor:
    """Cycle consistency of every match (i, j) (a proposed, weight-free pruning): True where the
    round trip i -> j -> k, k the best source cell of target j (argmax_k C(k, j)), comes back
    within ``radius`` cells of i along both axes. ``volume``: C ``B x (h*w) x h x w``; returns a
    bool volume of the same shape."""
    b, hw, h, w = volume.shape
    positions = cell_positions(h, w, device=volume.device, dtype=volume.dtype)  # I x 2
    back = positions[volume.flatten(2).argmax(dim=2)]  # B x J x 2: p_k of each target j
    gap = (back[:, :, None, :] - positions[None, None]).abs().amax(dim=-1)  # B x J x I
    return (gap <= radius).view(b, hw, h, w)


def sparse_guidance(
    refined_confidence: torch.Tensor, rho: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse guidance G and its weight v (section 5, averaging form a proposed formulation).

    v_i = sum_j [Q'(i,j) > rho] Q'(i,j);  G_i = sum_j [..] Q'(i,j) (p_j - p_i) / v_i.
    ``refined_confidence``: ``B x (h*w) x h x w``. Returns G ``B x 2 x h x w`` (zero where
    v_i = 0, i.e. where i has no confident match) and v ``B x 1 x h x w``.
    """
    b, hw, h, w = refined_confidence.shape
    weights = refined_confidence * confident_mask(refined_confidence, rho)
    positions = cell_positions(h, w, device=weights.device, dtype=weights.dtype)  # J x 2
    v = weights.sum(dim=1, keepdim=True)  # B x 1 x h x w
    mean_target = torch.einsum("bjyx,jc->bcyx", weights, positions) / v.clamp_min(EPS)
    source_positions = positions.t().reshape(1, 2, h, w)
    guidance = torch.where(v > 0, mean_target - source_positions, torch.zeros_like(mean_target))
    return guidance, v


def gaussian_window(
    size: int,
    variance: float,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``size x size`` kernel exp(-||d||^2 / (2 variance)) over integer offsets d, unnormalised."""
    offsets = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    squared = offsets[:, None] ** 2 + offsets[None, :] ** 2
    return torch.exp(-squared / (2 * variance))


def interpolate_guidance(
    guidance: torch.Tensor,
    weight: torch.Tensor,
    c_p: float,
    window: int,
    model: str = "translation",
    eps: float = EPS,
) -> torch.Tensor:
    """Dense guidance G' from the sparse one (section 6).

    Translation model: G'_i = sum_k w_ik G_k / (sum_k w_ik + eps) with
    w_ik = v_k exp(-||p_i - p_k||^2 / (2 c_P)) over the ``window x window`` neighbourhood N_i;
    G'_i = 0 where no neighbour is valid. Computed as two zero-padded convolutions.
    ``model="affine"`` is the proposed affine moving-least-squares variant (see
    :func:`_affine_guidance`). ``guidance``: ``B x 2 x h x w``, ``weight``: ``B x 1 x h x w``.
    Returns ``B x 2 x h x w``.
    """
    if model == "affine":
        return _affine_guidance(guidance, weight, c_p, window, eps)
    kernel = gaussian_window(window, c_p, device=guidance.device, dtype=guidance.dtype)
    kernel = kernel.expand(3, 1, window, window)
    stacked = torch.cat((guidance * weight, weight), dim=1)  # B x 3 x h x w
    smoothed = F.conv2d(stacked, kernel, padding=window // 2, groups=3)
    return smoothed[:, :2] / (smoothed[:, 2:] + eps)


def guidance_spread(
    guidance: torch.Tensor,
    weight: torch.Tensor,
    dense: torch.Tensor,
    c_p: float,
    window: int,
    eps: float = EPS,
) -> torch.Tensor:
    """How far the confident matches around each cell disagree with its dense guidance (a
    proposed formulation): s_i = sum_k w_ik ||G_k - G'_i||^2 / (sum_k w_ik + eps), with the
    weights w_ik of :func:`interpolate_guidance`'s translation model. ``guidance`` G and
    ``dense`` G' ``B x 2 x h x w``, ``weight`` v ``B x 1 x h x w``. Returns ``B x 1 x h x w``
    squared cells (0 where no neighbour is valid)."""
    kernel = gaussian_window(window, c_p, device=guidance.device, dtype=guidance.dtype)
    squared = (guidance**2).sum(dim=1, keepdim=True)
    stacked = torch.cat((guidance * weight, squared * weight, weight), dim=1)  # B x 4 x h x w
    sums = F.conv2d(stacked, kernel.expand(4, 1, window, window), padding=window // 2, groups=4)
    first, second, total = sums[:, :2], sums[:, 2:3], sums[:, 3:]
    # sum_k w_ik ||G_k - G'_i||^2 expanded, so that one convolution gives all three sums
    spread = second - 2 * (dense * first).sum(dim=1, keepdim=True)
    spread = spread + (dense**2).sum(dim=1, keepdim=True) * total
    return (spread / (total + eps)).clamp_min(0)


def _affine_guidance(
    guidance: torch.Tensor, weight: torch.Tensor, c_p: float, window: int, eps: float
) -> torch.Tensor:
    """Affine moving least squares (proposed formulation): at each cell i fit
    G_k ~ A (p_k - p_i) + t by weighted least squares over the valid neighbours k in N_i
    (weights w_ik as in the translation model) and take G'_i = t; cells with fewer than three
    valid neighbours keep the translation form."""
    b, _, h, w = guidance.shape
    n = window * window
    pad = window // 2
    kernel = gaussian_window(window, c_p, device=guidance.device, dtype=guidance.dtype).reshape(n)
    weights = F.unfold(weight, window, padding=pad).view(b, n, h * w) * kernel[None, :, None]
    values = F.unfold(guidance, window, padding=pad).view(b, 2, n, h * w)
    offsets = torch.arange(window, device=guidance.device, dtype=guidance.dtype) - pad
    dy, dx = torch.meshgrid(offsets, offsets, indexing="ij")
    design = torch.stack((dx.reshape(n), dy.reshape(n), torch.ones_like(dx).reshape(n)), dim=1)
    # Normal equations (X^T W X) beta = X^T W d for every cell and both displacement components.
    gram = torch.einsum("bnk,nr,ns->bkrs", weights, design, design)  # B x hw x 3 x 3
    rhs = torch.einsum("bnk,nr,bcnk->bkrc", weights, design, values)  # B x hw x 3 x 2
    # A ridge on the linear part keeps degenerate (e.g. collinear) neighbourhoods solvable; the
    # tiny one on the constant part only keeps cells without neighbours finite (replaced below).
    ridge = torch.diag(gram.new_tensor([1e-4, 1e-4, 1e-8]))
    solution = torch.linalg.solve(gram + ridge, rhs)
    affine = solution[:, :, 2, :].transpose(1, 2).reshape(b, 2, h, w)
    valid_neighbours = F.unfold((weight > 0).to(guidance.dtype), window, padding=pad).sum(1)
    enough = (valid_neighbours >= 3).view(b, 1, h, w)
    translation = interpolate_guidance(guidance, weight, c_p, window, "translation", eps)
    return torch.where(enough, affine, translation)


def guided_correlation(volume: torch.Tensor, guidance: torch.Tensor, c_m: float) -> torch.Tensor:
    """C'(i, j) = C(i, j) exp(-||p_j - (p_i + G'_i)||^2 / (2 c_M)) (section 7).

    ``volume``: ``B x (h*w) x h x w``; ``guidance``: G' ``B x 2 x h x w``. Same shape out.
    """
    return volume * torch.exp(-_squared_distance_to_guided(volume, guidance) / (2 * c_m))


def _squared_distance_to_guided(volume: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """||p_j - (p_i + G'_i)||^2 laid out like ``volume`` (``B x (h*w) x h x w``)."""
    b, hw, h, w = volume.shape
    positions = cell_positions(h, w, device=volume.device, dtype=volume.dtype)  # J x 2
    guided = positions.t().reshape(1, 2, h, w) + guidance  # B x 2 x h x w: p_i + G'_i
    dx = positions[:, 0].view(1, hw, 1, 1) - guided[:, 0:1]
    dy = positions[:, 1].view(1, hw, 1, 1) - guided[:, 1:2]
    return dx**2 + dy**2


def argmax_flow(volume: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour flow of a volume: for each source cell, the displacement to its best
    target cell. ``B x (h*w) x h x w`` -> ``B x 2 x h x w`` (cells)."""
    b, hw, h, w = volume.shape
    positions = cell_positions(h, w, device=volume.device, dtype=volume.dtype)
    best = positions[volume.argmax(dim=1)]  # B x h x w x 2
    return best.permute(0, 3, 1, 2) - positions.t().reshape(1, 2, h, w)


def guided_soft_argmax(
    volume: torch.Tensor, guidance: torch.Tensor, c_m: float | torch.Tensor, beta: float
) -> torch.Tensor:
    """S: the soft-argmax of C under a Gaussian prior around the guidance (proposed formulation).

    S_i = sum_j w_ij p_j - p_i with w_ij = softmax_j(beta C(i, j) - ||p_j - (p_i + G'_i)||^2 /
    (2 c_M)): softmax(beta C) times the Gaussian of C' (section 7), renormalised, so the match
    is sought near the guided position, at sub-cell precision, with no weights. (A softmax of C'
    itself would give every far cell, where C' is about 0, the weight of e^0 and pull S towards
    the grid's centre.) ``volume``: C ``B x (h*w) x h x w``; ``guidance``: G' ``B x 2 x h x w``;
    ``c_m``: one variance, or one per source cell (``B x 1 x h x w``); returns the displacement
    ``B x 2 x h x w`` (cells).
    """
    b, hw, h, w = volume.shape
    positions = cell_positions(h, w, device=volume.device, dtype=volume.dtype)
    logits = beta * volume - _squared_distance_to_guided(volume, guidance) / (2 * c_m)
    weights = torch.softmax(logits, dim=1)  # B x J x h x w
    expected = torch.einsum("bjyx,jc->bcyx", weights, positions)
    return expected - positions.t().reshape(1, 2, h, w)
