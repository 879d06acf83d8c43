"""The pruning and matching encoder-decoders (METHOD.md section 9, supplementary Table 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(in_channels: int, out_channels: int, kernel: int = 3) -> nn.Sequential:
    """Convolution ('same' padding), BatchNorm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def upconv_bn_relu(channels: int) -> nn.Sequential:
    """3x3 transposed convolution doubling the resolution, BatchNorm, ReLU."""
    return nn.Sequential(
        nn.ConvTranspose2d(
            channels, channels, 3, stride=2, padding=1, output_padding=1, bias=False
        ),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
    )


class EncoderDecoder(nn.Module):
    """Encoder-decoder with three skip concatenations, exactly the layers of Table 1.

    ``B x in_channels x h x w`` -> ``B x out_channels x h x w``. Pooling is max pooling with
    ceil mode (20 -> 10 -> 5 -> 3) and each up-sampled map is resized to its skip's size
    (proposed formulation where the table is silent). The last layer (conv8, 5x5) has no
    BatchNorm or ReLU; it is initialised to output ``final_bias`` everywhere (zero weights).
    """

    def __init__(self, in_channels: int, out_channels: int, final_bias: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(conv_bn_relu(in_channels, 64, 5), conv_bn_relu(64, 64))
        self.conv2 = nn.Sequential(conv_bn_relu(64, 128), conv_bn_relu(128, 128))
        self.conv3 = nn.Sequential(conv_bn_relu(128, 256), conv_bn_relu(256, 256))
        self.conv4 = nn.Sequential(conv_bn_relu(256, 512), conv_bn_relu(512, 512))
        self.upconv5 = upconv_bn_relu(512)
        self.conv5 = nn.Sequential(conv_bn_relu(768, 256), conv_bn_relu(256, 256))
        self.upconv6 = upconv_bn_relu(256)
        self.conv6 = nn.Sequential(conv_bn_relu(384, 128), conv_bn_relu(128, 128))
        self.upconv7 = upconv_bn_relu(128)
        self.conv7 = nn.Sequential(conv_bn_relu(192, 64), conv_bn_relu(64, 64))
        self.conv8 = nn.Conv2d(64, out_channels, 5, padding=2)
        nn.init.zeros_(self.conv8.weight)
        assert self.conv8.bias is not None  # a Conv2d has a bias unless built with bias=False
        nn.init.constant_(self.conv8.bias, final_bias)

    @staticmethod
    def _pool(x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, 2, stride=2, ceil_mode=True)

    @staticmethod
    def _up_and_join(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != skip.shape[-2:]:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat((x, skip), dim=1)

    @property
    def output_layer(self) -> nn.Conv2d:
        """The last convolution (zero weights at initialisation)."""
        return self.conv8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip_a = self.conv1(x)
        skip_b = self.conv2(self._pool(skip_a))
        skip_c = self.conv3(self._pool(skip_b))
        bottom = self.conv4(self._pool(skip_c))
        x = self.conv5(self._up_and_join(self.upconv5(bottom), skip_c))
        x = self.conv6(self._up_and_join(self.upconv6(x), skip_b))
        x = self.conv7(self._up_and_join(self.upconv7(x), skip_a))
        return self.conv8(x)


class ConvHead(nn.Module):
    """A plain stack of ``depth`` 3x3 convolutions of ``width`` channels (BatchNorm, ReLU) and a
    3x3 output layer initialised to zero (proposed formulation, for the local cost volume):
    ``B x in_channels x h x w`` -> ``B x out_channels x h x w``. Translation-equivariant like its
    input and, with 0.1 M weights against the encoder-decoder's 11 M, quick to train: on the
    demo's self-warps it cuts held-out EPE within a CPU minute, where the encoder-decoder on the
    same input does not move in five (``benchmarks/results/learnability.json``)."""

    def __init__(self, in_channels: int, out_channels: int, width: int = 64, depth: int = 4):
        super().__init__()
        layers = [conv_bn_relu(in_channels if i == 0 else width, width) for i in range(depth)]
        self.layers = nn.Sequential(*layers)
        self.out = nn.Conv2d(width, out_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        assert self.out.bias is not None
        nn.init.zeros_(self.out.bias)

    @property
    def output_layer(self) -> nn.Conv2d:
        """The last convolution (zero at initialisation)."""
        return self.out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.layers(x))


class PruningNet(nn.Module):
    """W_P: refines the confidence, ``B x (h*w) x h x w`` -> a mask m of the same shape, with
    Q' = min(1, Q m) (:meth:`refine`).

    ``relative=False`` is the paper's sigmoid mask m = sigmoid(z), its last layer initialised to
    z = ``init_logit`` (10: m = 0.99995, so Q' = Q at first, but sigmoid'(10) = 4.5e-5 leaves
    the gradient nearly dead). ``relative=True`` is the proposed m = sigmoid(z) / sigmoid(z0)
    with z0 = ``init_logit`` (small, e.g. 0): Q' = Q exactly at initialisation and dQ'/dz =
    Q (1 - sigmoid(z0)) alive; m may exceed 1, hence the clip at 1.
    """

    def __init__(self, grid_cells: int, init_logit: float = 10.0, relative: bool = False) -> None:
        super().__init__()
        self.body = EncoderDecoder(grid_cells, grid_cells, final_bias=init_logit)
        self.relative = relative
        self.scale: torch.Tensor
        self.register_buffer(
            "scale", torch.tensor(1.0 / torch.sigmoid(torch.tensor(init_logit)).item()), False
        )

    def forward(self, confidence: torch.Tensor) -> torch.Tensor:
        mask = torch.sigmoid(self.body(confidence))
        return mask * self.scale if self.relative else mask

    def refine(self, confidence: torch.Tensor) -> torch.Tensor:
        """Q' = min(1, Q m), ``B x (h*w) x h x w``."""
        return (confidence * self(confidence)).clamp(max=1.0)


class MatchingNet(nn.Module):
    """W_M: reads its input (the guided correlation ``B x (h*w) x h x w``, or the local cost
    volume with its extras, ``B x in_channels x h x w``) and returns a residual flow
    ``B x 2 x h x w`` (cells), exactly zero at initialisation. ``head``: ``"encoder_decoder"``
    (Table 1) or ``"conv"`` (:class:`ConvHead`, proposed for the local input)."""

    def __init__(self, in_channels: int, head: str = "encoder_decoder") -> None:
        super().__init__()
        self.body: EncoderDecoder | ConvHead
        if head == "conv":
            self.body = ConvHead(in_channels, 2)
        else:
            self.body = EncoderDecoder(in_channels, 2, final_bias=0.0)

    def forward(self, matching_input: torch.Tensor) -> torch.Tensor:
        return self.body(matching_input)
