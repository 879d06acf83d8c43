"""Sub-cell refinement by the bilinear cosine (model/subcell.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from guided_flow.model import volumes
from guided_flow.model.flow_model import GuidedFlowModel
from guided_flow.model.geometry import cell_positions, sample_at
from guided_flow.model.subcell import (
    CORNER_PAIRS,
    best_blend,
    bilinear_weights,
    patch_grams,
    self_similarity,
    subcell_refinement,
)


def smooth_features(h: int, w: int, dim: int = 64, seed: int = 0) -> torch.Tensor:
    """Unit features ``1 x dim x h x w`` that vary slowly over the grid, so neighbouring cells are
    nearly alike (their cosine is about 0.99), as a backbone's are."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, dim, max(h // 4, 2), max(w // 4, 2), generator=generator)
    fine = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
    noise = 0.02 * torch.randn(1, dim, h, w, generator=generator)
    return F.normalize(fine + noise, dim=1)


def blend_cosine(source: torch.Tensor, target: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """cos(F^s_i, F^t(p_i + flow_i)) with F^t(q) the bilinear blend, by sampling: ``1 x h x w``."""
    _, _, h, w = source.shape
    points = cell_positions(h, w, dtype=flow.dtype)[None] + flow.flatten(2).transpose(1, 2)
    blend = F.normalize(sample_at(target, points), dim=2)  # 1 x N x D
    return (blend * source.flatten(2).transpose(1, 2)).sum(2).view(1, h, w)


@pytest.mark.parametrize("size", [(20, 20), (20, 30), (40, 40), (7, 2)])
def test_an_identity_pair_gets_exactly_zero_flow_from_any_start_within_half_a_cell(size):
    h, w = size
    features = smooth_features(h, w, seed=h + w).double()
    start = 0.45 * (2 * torch.rand(1, 2, h, w, generator=torch.Generator().manual_seed(1)) - 1)
    refined = subcell_refinement(start, features, features)
    assert torch.equal(refined, torch.zeros_like(refined))


def test_the_soft_argmax_alone_is_pulled_off_an_identity_pair_by_alike_neighbours():
    # The bias the refinement removes: S on an identity pair of alike neighbours is not zero.
    features = smooth_features(20, 20, seed=3)
    volume = volumes.correlation(features, features)
    soft = volumes.guided_soft_argmax(volume, torch.zeros(1, 2, 20, 20), 5.0, 50.0)
    assert soft.abs().max() > 0.05
    assert torch.equal(subcell_refinement(soft, features, features), torch.zeros_like(soft))


def test_a_dyadic_sub_cell_shift_is_recovered_exactly():
    # F^s_i is the target's blend at p_i + d itself, so the cosine is 1 there and only there.
    h, w = 12, 14
    generator = torch.Generator().manual_seed(5)
    target = F.normalize(torch.randn(1, 32, h, w, generator=generator), dim=1)
    shift = torch.tensor([0.25 + 1 / 64, -0.5 - 3 / 64], dtype=torch.float64)
    points = cell_positions(h, w, dtype=torch.float64)[None] + shift
    source = sample_at(target.double(), points).transpose(1, 2).reshape(1, 32, h, w)
    noise = 2 * torch.rand(1, 2, h, w, dtype=torch.float64) - 1
    start = shift.view(1, 2, 1, 1) + 0.45 * noise  # the match stays within one cell of n_i
    refined = subcell_refinement(start, F.normalize(source, dim=1), target.double())
    # Interior cells (the shifted point stays on the grid); within float64 rounding.
    interior = refined[0, :, 1:-1, 1:-1]
    assert torch.allclose(interior, shift.view(2, 1, 1).expand_as(interior), atol=1e-12)


def test_the_blend_search_beats_every_quarter_cell_candidate_and_stays_within_half_a_cell():
    h, w = 9, 11
    source, target = smooth_features(h, w, seed=7).double(), smooth_features(h, w, seed=8).double()
    start = 2.0 * torch.randn(1, 2, h, w, generator=torch.Generator().manual_seed(2))
    refined, cosine = best_blend(start, source, target)
    positions = cell_positions(h, w, dtype=torch.float64).t().view(1, 2, h, w)
    size = torch.tensor([w - 1.0, h - 1.0], dtype=torch.float64).view(1, 2, 1, 1)
    start_landing = positions + start.double()
    low = torch.minimum((start_landing - 0.5).clamp_min(0), size)
    high = torch.minimum((start_landing + 0.5).clamp_min(0), size)
    nearest = torch.minimum(start_landing.round().clamp_min(0), size)
    landing = positions + refined
    assert ((landing >= low - 1e-12) & (landing <= high + 1e-12)).all()
    best = blend_cosine(source, target, refined)
    assert torch.allclose(cosine, best, atol=1e-12)
    ticks = torch.arange(-4, 5, dtype=torch.float64) / 4
    for dy in ticks:
        for dx in ticks:
            candidate = nearest + torch.stack((dx, dy)).view(1, 2, 1, 1)
            candidate = torch.minimum(candidate.clamp_min(0), size)
            inside = ((candidate >= low) & (candidate <= high)).all(dim=1)
            rival = blend_cosine(source, target, candidate - positions)
            assert (best[inside] >= rival[inside] - 1e-12).all()


def test_a_better_match_past_half_a_cell_is_not_taken():
    # The refinement corrects S's bias, it does not re-decide the match: an identity pair started
    # 0.75 cell off moves towards zero but stops at the half-cell bound.
    features = smooth_features(12, 12, seed=4).double()
    start = torch.full((1, 2, 12, 12), 0.75, dtype=torch.float64)
    refined = subcell_refinement(start, features, features)
    assert ((refined[..., :-1, :-1] - 0.25).abs() <= 1e-12).all()
    # Past the last cell the window is clamped to the grid: the border cell itself.
    assert torch.equal(refined[0, 0, :, -1], torch.zeros(12, dtype=torch.float64))


def test_a_match_the_features_do_not_place_below_a_cell_keeps_s():
    # Different instances: the best blend's cosine stays below each source cell's cosine with its
    # own neighbours, so the search would move the flow but S is kept, bit for bit.
    source, target = smooth_features(10, 12, seed=14), smooth_features(10, 12, seed=15)
    start = 0.4 * torch.randn(1, 2, 10, 12, generator=torch.Generator().manual_seed(3))
    blend, cosine = best_blend(start, source, target)
    assert (cosine < self_similarity(source.double())).all()
    assert (blend - start.double()).abs().max() > 0.1
    assert torch.equal(subcell_refinement(start, source, target), start)


def test_cells_are_refined_exactly_where_the_blend_reaches_the_self_similarity():
    # A target that is the source at 3 of 6 columns and unrelated elsewhere: the identity columns
    # are refined to zero, the others keep their start.
    source = smooth_features(8, 6, seed=16)
    target = smooth_features(8, 6, seed=17).clone()
    target[..., ::2] = source[..., ::2]
    start = torch.full((1, 2, 8, 6), 0.2)
    refined = subcell_refinement(start, source, target)
    blend, cosine = best_blend(start, source, target)
    reached = cosine >= self_similarity(source.double()) - 1e-6
    assert reached[..., ::2].all() and not reached[..., 1::2].any()
    assert torch.equal(refined[..., ::2], torch.zeros_like(refined[..., ::2]))
    assert torch.equal(refined[..., 1::2], start[..., 1::2])


def test_self_similarity_is_the_best_cosine_with_the_four_cells_one_cell_away():
    # Unit features (x, y) on a 2 x 3 grid; cell (1, 2) only has neighbours at negative cosines.
    rows = [[(1.0, 0.0), (0.0, 1.0), (0.6, 0.8)], [(0.8, 0.6), (1.0, 0.0), (-1.0, 0.0)]]
    features = torch.tensor(rows).permute(2, 0, 1)[None]  # 1 x 2 x 2 x 3
    expected = torch.tensor([[[0.8, 0.8, 0.8], [0.8, 0.8, -0.6]]])
    assert torch.allclose(self_similarity(features), expected)
    assert torch.allclose(self_similarity(3.0 * features), expected)  # cosines, any norm


def test_the_corner_weights_and_grams_match_their_definitions():
    t = torch.tensor([[0.25, 1.0, 0.0], [0.5, 0.0, 1.0]])  # (tx, ty) x 3 points
    expected = torch.tensor(
        [[0.375, 0.0, 0.0], [0.125, 1.0, 0.0], [0.375, 0.0, 1.0], [0.125, 0.0, 0.0]]
    )
    assert torch.allclose(bilinear_weights(t), expected)
    features = torch.randn(2, 5, 3, 4)
    grams = patch_grams(features).view(2, 10, 2, 3)
    corners = [features[..., 1 + dy, 2 + dx] for dy in (0, 1) for dx in (0, 1)]  # patch (2, 1)
    assert sorted(CORNER_PAIRS) == [(k, m) for k in range(4) for m in range(k, 4)]
    for j, (k, m) in enumerate(CORNER_PAIRS):
        assert torch.allclose(grams[:, j, 1, 2], (corners[k] * corners[m]).sum(1))


def test_the_gradient_passes_straight_through_to_the_flow():
    features = smooth_features(6, 6, seed=9)
    flow = (0.3 * torch.randn(1, 2, 6, 6)).requires_grad_()
    weights = torch.randn(1, 2, 6, 6)
    (subcell_refinement(flow, features, features) * weights).sum().backward()
    assert torch.equal(flow.grad, weights)


def test_the_model_refines_s_before_adding_the_residual_and_can_switch_it_off():
    features = smooth_features(10, 10, seed=11)
    model = GuidedFlowModel(None, grid=(10, 10), c_m=2.0, flow_base="soft_argmax").eval()
    with torch.no_grad():
        model.matching_net.body.conv8.bias.fill_(1.0)
        out = model.forward_features(features, features)
        soft = volumes.guided_soft_argmax(out.correlation, out.guidance, 2.0, 50.0)
        refined = subcell_refinement(soft, features, features)
        assert (refined - soft).abs().max() > 0.05  # S alone is off the identity
        assert torch.allclose(out.flow, refined + 1.0, atol=1e-5)
        model.soft_argmax_refine = False
        assert torch.allclose(
            model.forward_features(features, features).flow, soft + 1.0, atol=1e-5
        )


def test_a_grid_one_cell_wide_is_returned_unchanged():
    features = smooth_features(6, 1, seed=13)
    flow = torch.full((1, 2, 6, 1), 0.3)
    assert torch.equal(subcell_refinement(flow, features, features), flow)
