"""The adaptive window of S: c_M widened by the spread of the confident matches about G'."""

from __future__ import annotations

import math

import torch

from guided_flow.model import volumes
from guided_flow.model.flow_model import GuidedFlowModel, ModelConfig
from tests.helpers import random_unit_features


def test_the_spread_on_a_hand_computed_row() -> None:
    """Cells 0 and 2 of a 1 x 3 row move by 1 and 3 cells; within a 3-wide window, cell 1's
    neighbours weigh exp(-1/2) each, so G'_1 = 2 and each differs from it by 1 cell: spread 1.
    Cell 0 sees only itself (cell 2 lies outside its window): G'_0 = 1, spread 0."""
    sparse = torch.tensor([[1.0, 0.0, 3.0], [0.0, 0.0, 0.0]]).view(1, 2, 1, 3)
    weight = torch.tensor([1.0, 0.0, 1.0]).view(1, 1, 1, 3)
    dense = volumes.interpolate_guidance(sparse, weight, 1.0, 3)
    assert math.isclose(float(dense[0, 0, 0, 1]), 2.0, rel_tol=1e-5)
    spread = volumes.guidance_spread(sparse, weight, dense, 1.0, 3)
    assert spread.shape == (1, 1, 1, 3)
    torch.testing.assert_close(spread[0, 0, 0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-4, rtol=0)


def test_a_window_per_cell_equals_one_window_at_a_time() -> None:
    volume = volumes.correlation(
        random_unit_features(1, 8, 3, 4), random_unit_features(1, 8, 3, 4, 1)
    )
    guidance = torch.randn(1, 2, 3, 4, generator=torch.Generator().manual_seed(2))
    windows = torch.tensor([1.0, 5.0, 40.0]).view(1, 1, 3, 1).expand(1, 1, 3, 4)
    per_cell = volumes.guided_soft_argmax(volume, guidance, windows, 10.0)
    for row, c_m in enumerate((1.0, 5.0, 40.0)):
        alone = volumes.guided_soft_argmax(volume, guidance, c_m, 10.0)
        torch.testing.assert_close(per_cell[..., row, :], alone[..., row, :])


def test_agreeing_matches_leave_s_as_it_was_and_identity_pairs_give_zero_flow() -> None:
    features = random_unit_features(2, 16, 4, 6)
    fixed = GuidedFlowModel(None, grid=(4, 6), flow_base="soft_argmax", use_matching_net=False)
    adaptive = GuidedFlowModel(
        None, grid=(4, 6), flow_base="soft_argmax", use_matching_net=False, adaptive_window=True
    )
    with torch.no_grad():
        out = adaptive.forward_features(features, features)
        assert out.flow.abs().max() < 1e-4
        torch.testing.assert_close(out.flow, fixed.forward_features(features, features).flow)


def test_the_option_reaches_the_model() -> None:
    config = ModelConfig(backbone="resnet18", weights="none", input_size=64, adaptive_window=True)
    assert GuidedFlowModel.from_config(config).adaptive_window


def test_disagreeing_matches_widen_the_window_of_s() -> None:
    """Unrelated pictures: the confident matches point every way, so S is sought in wider
    windows, nearer C's own peaks; it moves exactly where the spread is not zero."""
    source, target = random_unit_features(1, 16, 5, 5), random_unit_features(1, 16, 5, 5, 3)
    options = {"grid": (5, 5), "flow_base": "soft_argmax", "use_matching_net": False, "rho": 0.5}
    with torch.no_grad():
        fixed = GuidedFlowModel(None, **options).eval().forward_features(source, target)
        adaptive = GuidedFlowModel(None, adaptive_window=True, **options).eval()
        moved = (adaptive.forward_features(source, target).flow - fixed.flow).norm(dim=1)
    spread = volumes.guidance_spread(
        fixed.sparse_guidance, fixed.guidance_weight, fixed.guidance, 5.0, 5
    )[:, 0]
    assert spread.max() > 1.0 and moved.max() > 0.1
    assert (moved[spread < 1e-6] < 1e-6).all()
