"""Cycle consistency of the confident matches: a weight-free pruning of G."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from guided_flow.model import volumes
from guided_flow.model.flow_model import GuidedFlowModel


def test_round_trips_on_a_hand_computed_row() -> None:
    """A 1 x 3 grid. Target 0's best source is cell 2, target 1's is cell 1, target 2's is
    cell 0: a match (i, j) is kept where |p_i - p_best(j)| <= 1."""
    # volume[b, j, 0, i] = C(i, j)
    scores = torch.tensor([[0.1, 0.2, 0.9], [0.3, 0.8, 0.1], [0.7, 0.5, 0.6]])
    kept = volumes.round_trip_consistent(scores.view(1, 3, 1, 3))
    expected = torch.tensor([[False, True, True], [True, True, True], [True, True, False]]).view(
        1, 3, 1, 3
    )
    assert torch.equal(kept, expected)
    assert torch.equal(
        volumes.round_trip_consistent(scores.view(1, 3, 1, 3), radius=0.0),
        torch.tensor([[False, False, True], [False, True, False], [True, False, False]]).view(
            1, 3, 1, 3
        ),
    )


def _model(cycle_consistency: bool) -> GuidedFlowModel:
    return GuidedFlowModel(
        None, grid=(4, 6), use_matching_net=False, cycle_consistency=cycle_consistency
    ).eval()


def test_identity_pairs_keep_every_match() -> None:
    features = F.normalize(torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        plain = _model(False).forward_features(features, features)
        cycled = _model(True).forward_features(features, features)
    assert torch.equal(plain.guidance_weight, cycled.guidance_weight)
    assert plain.flow.abs().max() < 1e-4 and cycled.flow.abs().max() < 1e-4


def test_a_match_whose_round_trip_goes_far_leaves_the_guidance() -> None:
    """Source cell (0, 5) is made nearly a copy of source cell (0, 0), so its match to target
    (0, 0) is confident; but target (0, 0)'s best source is (0, 0), five cells from (0, 5): with
    cycle consistency that match leaves G, and no other cell's guidance changes."""
    generator = torch.Generator().manual_seed(2)
    source = F.normalize(torch.randn(1, 16, 4, 6, generator=generator), dim=1)
    target = source.clone()
    source[..., 0, 5] = F.normalize(source[..., 0, 0] + 0.1 * source[..., 0, 5], dim=1)
    with torch.no_grad():
        plain = _model(False).forward_features(source, target)
        cycled = _model(True).forward_features(source, target)
    # without the check, source (0, 5) is guided to target (0, 0); with it, it has no match
    assert plain.guidance_weight[0, 0, 0, 5] > 0
    assert torch.allclose(plain.sparse_guidance[0, :, 0, 5], torch.tensor([-5.0, 0.0]))
    assert cycled.guidance_weight[0, 0, 0, 5] == 0
    untouched = torch.ones(4, 6, dtype=torch.bool)
    untouched[0, 5] = False
    assert torch.equal(
        plain.guidance_weight[0, 0][untouched] > 0, cycled.guidance_weight[0, 0][untouched] > 0
    )
