"""The networks (section 9) and the whole forward pass (sections 4-8)."""

import pytest
import torch

from guided_flow.errors import ConfigError
from guided_flow.model import volumes
from guided_flow.model.flow_model import GuidedFlowModel
from guided_flow.model.networks import EncoderDecoder, MatchingNet, PruningNet
from tests.helpers import random_unit_features, shifted_pair


def test_encoder_decoder_has_the_layers_of_table_1():
    net = EncoderDecoder(400, 400)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    shapes = [(m.in_channels, m.out_channels, m.kernel_size[0]) for m in convs]
    assert shapes == [
        (400, 64, 5),
        (64, 64, 3),
        (64, 128, 3),
        (128, 128, 3),
        (128, 256, 3),
        (256, 256, 3),
        (256, 512, 3),
        (512, 512, 3),
        (512, 512, 3),
        (768, 256, 3),
        (256, 256, 3),
        (256, 256, 3),
        (384, 128, 3),
        (128, 128, 3),
        (128, 128, 3),
        (192, 64, 3),
        (64, 64, 3),
        (64, 400, 5),
    ]
    # every layer but the last is followed by BatchNorm and ReLU
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == len(convs) - 1


@pytest.mark.parametrize("grid", [(20, 20), (40, 40), (7, 9)])
def test_initialisation_pruning_near_one_and_matching_exactly_zero(grid):
    cells = grid[0] * grid[1]
    volume = torch.rand(1, cells, *grid)
    pruning = PruningNet(cells)(volume)
    assert pruning.shape == volume.shape
    assert torch.allclose(pruning, torch.full_like(pruning, 0.9999546), atol=1e-6)
    residual = MatchingNet(cells)(volume)
    assert residual.shape == (1, 2, *grid)
    assert (residual == 0).all()


def test_identical_features_give_zero_flow_at_initialisation():
    model = GuidedFlowModel(None, grid=(20, 20)).eval()
    features = random_unit_features(2, 64, 20, 20, seed=7)
    out = model.forward_features(features, features)
    assert out.flow.abs().max() < 1e-4
    diagonal = out.confidence.view(2, 400, 400).diagonal(dim1=1, dim2=2)
    assert torch.allclose(diagonal, torch.ones_like(diagonal), atol=1e-4)
    assert (out.confident_density > 0).all()
    assert torch.allclose(out.refined_confidence, out.confidence * 0.9999546, atol=1e-6)


def test_shifted_features_flow_in_pixels():
    model = GuidedFlowModel(None, grid=(20, 20)).eval()
    source, target = shifted_pair(1, 128, 20, 20, (2, -1), seed=8)
    out = model.forward_features(source, target)
    interior = out.flow[0, :, 3:15, 2:14]
    assert torch.allclose(interior, torch.tensor([2.0, -1.0]).view(2, 1, 1), atol=1e-4)
    pixels = out.flow_pixels((320, 320))
    assert pixels.shape == (1, 2, 320, 320)
    assert torch.allclose(pixels[0, :, 100, 100], torch.tensor([32.0, -16.0]), atol=1e-3)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("grid", [(20, 20), (40, 40)])
def test_shapes_and_dtypes(batch, grid):
    model = GuidedFlowModel(None, grid=grid).train()
    source = random_unit_features(batch, 32, *grid, seed=9)
    target = random_unit_features(batch, 32, *grid, seed=10)
    out = model.forward_features(source, target)
    cells = grid[0] * grid[1]
    assert out.flow.shape == out.guidance.shape == (batch, 2, *grid)
    assert out.refined_confidence.shape == (batch, cells, *grid)
    assert out.flow.dtype == torch.float32
    assert torch.isfinite(out.flow).all()


def test_bfloat16_autocast_runs_and_stays_finite():
    model = GuidedFlowModel(None, grid=(20, 20)).eval()
    source, target = shifted_pair(2, 64, 20, 20, (1, 1), seed=11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.forward_features(source, target)
    assert torch.isfinite(out.flow.float()).all()
    assert out.flow.shape == (2, 2, 20, 20)
    interior = out.flow[0, :, 3:15, 3:15].float()
    assert torch.allclose(interior, torch.ones_like(interior), atol=0.1)


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"rho": 1.0}, "rho"),
        ({"rho": 0.0}, "rho"),
        ({"c_p": 0.0}, "c_p"),
        ({"c_m": -1.0}, "c_m"),
        ({"window_n": 4}, "window_n"),
        ({"guidance_model": "spline"}, "guidance_model"),
        ({"flow_base": "argmax"}, "flow_base"),
        ({"soft_argmax_beta": 0.0}, "soft_argmax_beta"),
    ],
)
def test_bad_hyper_parameters_are_refused_with_the_option_named(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        GuidedFlowModel(None, grid=(5, 5), **kwargs)


def test_feature_grid_mismatch_is_refused():
    model = GuidedFlowModel(None, grid=(5, 5))
    features = random_unit_features(1, 8, 6, 6)
    with pytest.raises(ConfigError, match="grid"):
        model.forward_features(features, features)


def test_confident_matches_in_pixels():
    model = GuidedFlowModel(None, grid=(10, 10)).eval()
    source, target = shifted_pair(1, 64, 10, 10, (1, 2), seed=12)
    out = model.forward_features(source, target)
    src, trg = out.confident_matches(0, (160, 160))
    # the covered source cells (x < 9, y < 8) are all confident and matched by the shift
    covered = (src[:, 0] < 9 * 16) & (src[:, 1] < 8 * 16)
    assert covered.sum() == 9 * 8
    shift = torch.tensor([16.0, 32.0]).expand(int(covered.sum()), 2)
    assert torch.allclose(trg[covered] - src[covered], shift, atol=1e-3)
    assert torch.allclose(src[0], torch.tensor([7.5, 7.5]))  # cell (0, 0) centre


def test_without_refinement_the_flow_is_the_guidance():
    model = GuidedFlowModel(None, grid=(10, 10)).eval()
    with torch.no_grad():
        model.matching_net.body.conv8.bias.fill_(1.0)
    source, target = shifted_pair(1, 32, 10, 10, (1, 0), seed=13)
    refined = model.forward_features(source, target)
    plain = model.forward_features(source, target, refine=False)
    assert torch.equal(plain.flow, plain.guidance)
    assert torch.allclose(refined.flow, refined.guidance + 1.0)


def test_soft_argmax_base_adds_the_residual_to_the_guided_soft_argmax():
    model = GuidedFlowModel(
        None,
        grid=(10, 10),
        c_m=2.0,
        flow_base="soft_argmax",
        soft_argmax_beta=50.0,
        soft_argmax_refine=False,
    ).eval()
    with torch.no_grad():
        model.matching_net.body.conv8.bias.fill_(1.0)
    source, target = shifted_pair(1, 32, 10, 10, (1, 0), seed=15)
    out = model.forward_features(source, target)
    expected = volumes.guided_soft_argmax(out.correlation, out.guidance, 2.0, 50.0) + 1.0
    assert torch.allclose(out.flow, expected, atol=1e-5)
    plain = model.forward_features(source, target, refine=False)
    assert torch.equal(plain.flow, plain.guidance)


def test_soft_argmax_base_recovers_a_shift_at_initialisation():
    model = GuidedFlowModel(None, grid=(20, 20), flow_base="soft_argmax", soft_argmax_beta=100.0)
    source, target = shifted_pair(1, 128, 20, 20, (2, -1), seed=8)
    out = model.eval().forward_features(source, target)
    interior = out.flow[0, :, 3:15, 2:14]
    assert torch.allclose(interior, torch.tensor([2.0, -1.0]).view(2, 1, 1), atol=1e-2)
