"""Section 10: each loss is minimal at its optimum, positive away from it, and sends gradients
to the parameters its stage trains."""

import math

import torch

from guided_flow.model import losses
from guided_flow.model.flow_model import GuidedFlowModel
from tests.helpers import random_unit_features, shifted_pair


def _selected(out, rho=0.9):
    return losses.initial_confident_set(out.confidence, rho)


def test_silhouette_loss_zero_when_refined_equals_initial_and_positive_otherwise():
    confidence = torch.rand(2, 16, 4, 4)
    selected = losses.initial_confident_set(confidence, 0.5)
    assert losses.silhouette_loss(confidence, confidence, selected) == 0
    halved = losses.silhouette_loss(confidence, confidence * 0.5, selected)
    expected = ((confidence * 0.5)[selected] ** 2).mean()
    assert torch.isclose(halved, expected)


def test_geometric_loss_zero_with_the_true_guidance_and_positive_with_a_wrong_one():
    source, target = shifted_pair(1, 64, 8, 8, (1, 0), seed=1)
    selected = torch.zeros(1, 64, 8, 8, dtype=torch.bool)
    selected[..., 1:6, 1:6] = True
    true_guidance = torch.zeros(1, 2, 8, 8)
    true_guidance[:, 0] = 1.0
    assert losses.geometric_loss(source, target, true_guidance, selected) < 1e-10
    wrong = losses.geometric_loss(source, target, torch.zeros(1, 2, 8, 8), selected)
    assert wrong > 0.5  # unrelated unit vectors: ||a - b||^2 is about 2


def test_matching_loss_prefers_the_true_flow():
    source, target = shifted_pair(1, 64, 10, 10, (2, 1), seed=2)
    truth = torch.tensor([2.0, 1.0]).view(1, 2, 1, 1).expand(1, 2, 10, 10).contiguous()
    at_truth = losses.matching_loss(source, target, truth, window=5, temperature=0.05)
    at_zero = losses.matching_loss(source, target, torch.zeros_like(truth), 5, 0.05)
    assert at_truth < at_zero
    # with unrelated neighbours the positive dominates at a small temperature, except where
    # the warp leaves the target (covered cells only: 8 x 9 of the 100)
    assert at_truth < 0.35 * at_zero
    # nearly uniform softmax at temperature 1 (METHOD.md section 14): close to log 25
    uniform = losses.matching_loss(source, target, torch.zeros_like(truth), 5, 1.0)
    assert abs(uniform.item() - math.log(25)) < 0.6


def test_matching_loss_hand_computed_corner_window():
    features = torch.zeros(1, 2, 2, 2)
    features[0, 0] = 1.0  # every cell the same vector (1, 0)
    flow = torch.zeros(1, 2, 2, 2)
    # each cell sees 4 in-grid window positions (3x3 window on a 2x2 grid), all with score 1
    value = losses.matching_loss(features, features, flow, window=3, temperature=1.0)
    assert torch.isclose(value, torch.tensor(math.log(4.0)))


def test_smoothness_loss_zero_for_constant_flow_and_hand_computed_ramp():
    constant = torch.ones(1, 2, 5, 5)
    assert losses.smoothness_loss(constant) == 0
    ramp = torch.zeros(1, 2, 5, 5)
    ramp[0, 0] = torch.arange(5.0).view(1, 5)  # dx grows by 1 per column
    # horizontal differences: 1 everywhere, vertical: 0 -> (1 + 0) / 2
    assert torch.isclose(losses.smoothness_loss(ramp), torch.tensor(0.5))
    mask = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    mask[..., :, :2] = True
    assert torch.isclose(losses.smoothness_loss(ramp, mask), torch.tensor(0.5))


def test_masks_restrict_the_sums():
    confidence = torch.rand(1, 16, 4, 4)
    source_mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    source_mask[..., 0, 0] = True
    target_mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    target_mask[..., 3, 3] = True
    selected = losses.initial_confident_set(confidence, 0.0, source_mask, target_mask)
    assert selected.sum() == 1 and selected[0, 15, 0, 0]


def test_gradients_reach_the_trained_networks_only():
    model = GuidedFlowModel(None, grid=(8, 8)).train()
    source, target = shifted_pair(2, 32, 8, 8, (1, 0), seed=3)
    out = model.forward_features(source, target)
    selected = _selected(out)
    stage1 = losses.silhouette_loss(out.confidence, out.refined_confidence, selected)
    stage1 = stage1 + 3.0 * losses.geometric_loss(
        out.source_features, out.target_features, out.guidance, selected
    )
    stage1.backward(retain_graph=True)
    assert model.pruning_net.body.conv8.weight.grad.abs().sum() > 0
    assert model.matching_net.body.conv8.weight.grad is None
    model.zero_grad()
    stage2 = losses.matching_loss(out.source_features, out.target_features, out.flow, 5, 0.1)
    stage2 = stage2 + losses.smoothness_loss(out.flow)
    stage2.backward()
    assert model.matching_net.body.conv8.weight.grad.abs().sum() > 0


def test_empty_selection_gives_zero_loss_with_a_graph():
    out = (
        GuidedFlowModel(None, grid=(4, 4))
        .eval()
        .forward_features(random_unit_features(1, 8, 4, 4, 4), random_unit_features(1, 8, 4, 4, 5))
    )
    nothing = torch.zeros_like(out.confidence, dtype=torch.bool)
    loss = losses.silhouette_loss(out.confidence, out.refined_confidence, nothing)
    assert loss == 0 and loss.requires_grad


def test_confidence_weighted_geometric_loss_hand_computed():
    source, target = shifted_pair(1, 16, 4, 4, (0, 0), seed=6)
    target = target.clone()
    target[..., 0, 0] = -source[..., 0, 0]  # cell (0, 0) has residual ||2 f||^2 = 4
    selected = torch.zeros(1, 16, 4, 4, dtype=torch.bool)
    selected[0, 0, 0, 0] = selected[0, 5, 1, 1] = True
    refined = torch.zeros(1, 16, 4, 4)
    refined[0, 0, 0, 0], refined[0, 5, 1, 1] = 0.25, 0.75
    zero = torch.zeros(1, 2, 4, 4)
    weighted = losses.geometric_loss(source, target, zero, selected, refined)
    assert torch.isclose(weighted, torch.tensor(0.25 * 4.0 / 1.0), atol=1e-5)
    uniform = losses.geometric_loss(source, target, zero, selected)
    assert torch.isclose(uniform, torch.tensor(4.0 / 2), atol=1e-5)
