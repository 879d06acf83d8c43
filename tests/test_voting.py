"""Geometric voting over the matches of C: neighbourhood consensus and Hough voting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from guided_flow.errors import ConfigError
from guided_flow.model import volumes, voting
from guided_flow.model.flow_model import GuidedFlowModel, ModelConfig

# volume[0, j, 0, i] = C(i, j) on a 1 x 3 grid
ROW = torch.tensor([[0.1, 0.2, 0.9], [0.3, 0.8, 0.1], [0.7, 0.5, 0.6]]).view(1, 3, 1, 3)


def test_neighbourhood_consensus_on_a_hand_computed_row() -> None:
    """On a row, C(i, j) is averaged with C(i - 1, j - 1) and C(i + 1, j + 1) where both exist."""
    c = ROW[0, :, 0].t()  # c[i, j]
    expected = torch.empty(3, 3)
    for i in range(3):
        for j in range(3):
            terms = [c[i + d, j + d] for d in (-1, 0, 1) if 0 <= i + d < 3 and 0 <= j + d < 3]
            expected[i, j] = sum(terms) / len(terms)
    voted = voting.neighbourhood_consensus(ROW)
    assert torch.allclose(voted[0, :, 0].t(), expected)
    assert abs(float(voted[0, 1, 0, 1]) - (0.1 + 0.8 + 0.6) / 3) < 1e-6  # all three terms


def test_hough_voting_on_a_hand_computed_row() -> None:
    """Votes per displacement d = j - i: d=-2: 0.9, -1: 0.2 + 0.1, 0: 0.1 + 0.8 + 0.6,
    1: 0.3 + 0.5, 2: 0.7; smoothed by a box of 3 over d: 1.2, 2.7, 2.6, 3.0, 1.5."""
    smoothed = torch.tensor([1.2, 2.7, 2.6, 3.0, 1.5]) / 3.0
    voted = voting.hough_voting(ROW)
    c = ROW[0, :, 0].t()
    for i in range(3):
        for j in range(3):
            assert torch.isclose(voted[0, j, 0, i], c[i, j] * smoothed[j - i + 2])
    unsmoothed = torch.tensor([0.9, 0.3, 1.5, 0.8, 0.7]) / 1.5
    voted = voting.hough_voting(ROW, smoothing=1)
    assert torch.isclose(voted[0, 0, 0, 2], c[2, 0] * unsmoothed[0])


def _translated_with_a_decoy() -> tuple[torch.Tensor, torch.Tensor]:
    """Identical 4 x 6 feature maps, except that target (3, 5) is a copy of source (1, 1) and
    target (1, 1), the true match of source (1, 1), is perturbed: C alone sends source (1, 1)
    to the decoy."""
    generator = torch.Generator().manual_seed(3)
    source = F.normalize(torch.randn(1, 32, 4, 6, generator=generator), dim=1)
    target = source.clone()
    target[..., 3, 5] = source[..., 1, 1]
    noise = torch.randn(1, 32, generator=generator)
    target[..., 1, 1] = F.normalize(source[..., 1, 1] + 0.3 * noise, dim=1)
    return source, target


@pytest.mark.parametrize("form", ["neighbourhood", "hough"])
def test_voting_sends_a_cell_with_a_decoy_to_the_match_its_neighbours_agree_on(form: str) -> None:
    source, target = _translated_with_a_decoy()
    volume = volumes.correlation(source, target)
    assert torch.equal(volumes.argmax_flow(volume)[0, :, 1, 1], torch.tensor([4.0, 2.0]))
    voted = voting.voted_volume(volume, form)
    assert torch.equal(volumes.argmax_flow(voted)[0, :, 1, 1], torch.tensor([0.0, 0.0]))
    assert torch.equal(voting.voted_volume(volume, "none"), volume)


@pytest.mark.parametrize("form", voting.VOTING)
def test_identity_pairs_give_zero_flow_with_every_voting(form: str) -> None:
    features = F.normalize(torch.randn(2, 16, 4, 6, generator=torch.Generator().manual_seed(1)))
    model = GuidedFlowModel(None, grid=(4, 6), use_matching_net=False, voting=form).eval()
    with torch.no_grad():
        out = model.forward_features(features, features)
    assert out.flow.abs().max() < 1e-4
    assert (out.guidance_weight > 0).all()


def test_the_voting_option_is_checked_and_reaches_the_model() -> None:
    with pytest.raises(ConfigError, match="voting='ransac' is invalid"):
        ModelConfig(voting="ransac").check()
    config = ModelConfig(backbone="resnet18", weights="none", input_size=64, voting="hough")
    assert GuidedFlowModel.from_config(config).voting == "hough"
