"""Test-time ensembling of features over mirrored and rescaled views of each picture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guided_flow.errors import ConfigError
from guided_flow.model.backbone import FeatureExtractor
from guided_flow.model.feature_views import (
    FEATURE_VIEWS,
    VIEW_SCALE,
    mirror_choice,
    view_features,
)
from guided_flow.model.flow_model import GuidedFlowModel, ModelConfig


class BlockMeans(nn.Module):
    """A stand-in backbone: each 16 x 16 block's mean colour plus a constant channel, unit norm
    per cell. It commutes with mirroring and, on a linear ramp, with rescaling."""

    stride = 16

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        means = F.avg_pool2d(images, 16)
        ones = torch.ones_like(means[:, :1])
        return F.normalize(torch.cat((means, ones), dim=1), dim=1)


def ramp(batch: int, size: int) -> torch.Tensor:
    """``B x 3 x size x size``: x, y and x + y ramps, no mirror symmetry."""
    coords = torch.linspace(-1, 1, size)
    x, y = coords.view(1, size).expand(size, size), coords.view(size, 1).expand(size, size)
    return torch.stack((x, y, (x + y) / 2)).expand(batch, 3, size, size).clone()


def test_no_views_are_the_backbone_features() -> None:
    images = torch.rand(2, 3, 64, 64)
    assert torch.equal(view_features(BlockMeans(), images, "none"), BlockMeans()(images))


@pytest.mark.parametrize("views", FEATURE_VIEWS)
def test_views_are_brought_back_to_the_picture_frame(views: str) -> None:
    """An equivariant backbone gives the same features from every view, so the ensemble equals
    the plain features: a view left mirrored, or at its own grid, would not."""
    images = ramp(2, 96)
    plain = BlockMeans()(images)
    ensembled = view_features(BlockMeans(), images, views)
    assert ensembled.shape == plain.shape
    # A ramp is linear away from the border cells, up to the renormalisation of each cell
    # (0.005 here); an adaptive average pool, which misplaces cells, fails this bound.
    assert torch.allclose(ensembled[..., 1:-1, 1:-1], plain[..., 1:-1, 1:-1], atol=0.01)
    assert torch.allclose(ensembled.norm(dim=1), torch.ones(2, 6, 6), atol=1e-6)


def test_the_mirror_ensemble_commutes_with_mirroring() -> None:
    """Features of a real backbone: the mirror ensemble of a mirrored picture is the mirrored
    ensemble, exactly (the same two terms summed), which the backbone alone is not."""
    backbone = FeatureExtractor("resnet18", "none", 0).eval()
    images = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        flipped_first = view_features(backbone, images.flip(-1), "flip")
        flipped_after = view_features(backbone, images, "flip").flip(-1)
        plain_after = backbone(images).flip(-1)
        plain_first = backbone(images.flip(-1))
    assert torch.allclose(flipped_first, flipped_after, atol=1e-6)
    assert not torch.allclose(plain_first, plain_after, atol=1e-3)


def test_the_scale_view_reads_a_picture_scale_times_larger() -> None:
    seen: list[tuple[int, int]] = []

    class Recording(BlockMeans):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(images.shape[-2:]))
            return super().forward(images)

    view_features(Recording(), torch.rand(1, 3, 320, 160), "flip_scale")
    scaled = (round(320 * VIEW_SCALE / 16) * 16, round(160 * VIEW_SCALE / 16) * 16)
    assert seen == [(320, 160), (320, 160), scaled, scaled]


def test_the_option_is_checked_and_reaches_the_model() -> None:
    with pytest.raises(ConfigError, match="feature_views='mirror' is invalid"):
        ModelConfig(feature_views="mirror").check()
    model = GuidedFlowModel.from_config(
        ModelConfig(backbone="resnet18", weights="none", input_size=64, feature_views="flip")
    )
    assert model.feature_views == "flip"


def test_the_mirror_choice_keeps_whichever_target_the_source_matches_better() -> None:
    """Pair 0 faces the same way: the target's features are the source's. Pair 1 faces the
    other way: the features of the target's mirror image are the source's (mirrored back onto
    the target's grid), and the target's own are unlike them."""
    generator = torch.Generator().manual_seed(4)
    source = F.normalize(torch.randn(2, 16, 4, 6, generator=generator))
    other = F.normalize(torch.randn(2, 16, 4, 6, generator=generator))
    target = torch.stack((source[0], other[1]))
    mirrored = torch.stack((other[0], source[1].flip(-1)))
    chosen, flags = mirror_choice(source, target, mirrored)
    assert flags.tolist() == [False, True]
    assert torch.equal(chosen[0], target[0]) and torch.equal(chosen[1], mirrored[1])


def test_a_mirrored_pair_is_matched_part_to_part_with_the_mirror_choice() -> None:
    """The target is the source mirrored: with the choice, every source cell's confident match
    is its mirror cell (x -> w - 1 - x), the flow still pointing into the target's own frame;
    without it, a backbone that is not mirror-equivariant finds other matches."""
    image = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    options = dict(backbone="resnet18", weights="none", input_size=64, use_matching_net=False)
    mirror = {"mirror_choice": True}
    torch.manual_seed(0)
    chosen = GuidedFlowModel.from_config(ModelConfig(**options, **mirror)).eval()
    plain = GuidedFlowModel.from_config(ModelConfig(**options)).eval()
    plain.load_state_dict(chosen.state_dict())
    square = image[..., :64, :64]
    with torch.no_grad():
        out = chosen(square, square.flip(-1))
        without = plain(square, square.flip(-1))
    xs = torch.arange(4.0)
    mirror_flow = torch.stack((3 - 2 * xs.expand(4, 4), torch.zeros(4, 4)))
    assert (out.guidance_weight > 0).all()
    assert torch.allclose(out.sparse_guidance[0], mirror_flow, atol=1e-5)
    assert not torch.allclose(without.sparse_guidance[0], mirror_flow, atol=1e-5)
