"""``guided-flow export --ckpt CKPT|--untrained --format torchscript|onnx --out FILE
[--input-size N]``: the inference model as one self-contained file.

The exported module is :class:`FlowPredictor`: two ImageNet-normalised images
``B x 3 x N x N`` (source, target) -> ``flow_s2t`` in pixels ``B x 2 x N x N`` (for each source
pixel the (dx, dy) to its match in the target, on the network's input grid). The input size is
fixed at export time (the networks' first and last layers have one channel per feature cell, so
the size is part of the model); the batch size is free. TorchScript files are traced, ONNX files
use opset :data:`ONNX_OPSET`. The file appears complete or not at all.
"""

from __future__ import annotations

import argparse
import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from guided_flow.api import GuidedSemanticFlow
from guided_flow.errors import ConfigError
from guided_flow.io.atomic import atomic_open
from guided_flow.model.flow_model import GuidedFlowModel

FORMATS = ("torchscript", "onnx")
ONNX_OPSET = 17
INPUT_NAMES = ("source_image", "target_image")
OUTPUT_NAME = "flow_s2t"


@dataclass(frozen=True)
class InferenceOptions:
    """How :class:`FlowPredictor` runs; the defaults are the settings that won in
    ``benchmarks/speed.py`` (2-core AVX-512 CPU, 2 threads, 320 px, batch 1; the figures below
    are GSF pairs per second against plain float32 under ``torch.inference_mode``, ResNet-101 /
    EfficientNet-Lite0, from ``benchmarks/results/speed_after_cpu_2threads_full.json``).

    Attributes:
        channels_last: weights and activations in channels-last layout. At batch 1 PyTorch sends
            the networks' convolutions of small maps (3 x 3 to 10 x 10) to its slow im2col
            kernel in the default layout and to oneDNN in this one: the GSF networks run about
            30 % faster and the whole pair 1.09x / 1.26x, with the same flow to float rounding;
            neutral at batch 8. On by default.
        bf16: bfloat16 autocast: 1.7x / 1.4x on this CPU (it has AVX-512 BF16), but the flow
            moves (mean 0.3-0.4 px, up to tens of pixels where the confident set Q' > rho
            changes), so it is opt-in.
        compile: ``torch.compile`` the forward: the same flow, 1.14x / 1.42x once compiled; the
            first call compiles for about half a minute (seconds when the compile cache is
            warm). Opt-in.
    """

    channels_last: bool = True
    bf16: bool = False
    compile: bool = False


class FlowPredictor(nn.Module):
    """The deployable inference path of a :class:`GuidedFlowModel` (kept in eval mode):
    ``B x 3 x H x W`` normalised source and target images (H, W = the model's input size) ->
    ``B x 2 x H x W`` ``flow_s2t`` in pixels.

    :meth:`forward` is the plain computation (what ``guided-flow export`` traces); :meth:`predict`
    runs it the fast way: under ``torch.inference_mode`` with the :class:`InferenceOptions`.
    With ``channels_last`` the model is converted in place.
    """

    def __init__(self, model: GuidedFlowModel, options: InferenceOptions | None = None) -> None:
        super().__init__()
        if model.backbone is None:
            raise ConfigError("FlowPredictor needs a model with a backbone")
        self.options = options or InferenceOptions()
        self.model = model.eval()
        if self.options.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._run = torch.compile(self.forward) if self.options.compile else self.forward
        self.eval()

    def train(self, mode: bool = True) -> FlowPredictor:
        """Stay in eval mode: BatchNorm always uses its running statistics."""
        return super().train(False)

    def forward(self, source_image: torch.Tensor, target_image: torch.Tensor) -> torch.Tensor:
        if self.options.channels_last:
            source_image = source_image.contiguous(memory_format=torch.channels_last)
            target_image = target_image.contiguous(memory_format=torch.channels_last)
        out = self.model(source_image, target_image)
        return out.flow_pixels((source_image.shape[-2], source_image.shape[-1])).contiguous()

    def predict(self, source_image: torch.Tensor, target_image: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` under ``torch.inference_mode`` (and bfloat16 autocast with
        ``options.bf16``, compiled with ``options.compile``); returns float32."""
        autocast = torch.autocast(source_image.device.type, dtype=torch.bfloat16)
        with torch.inference_mode(), autocast if self.options.bf16 else nullcontext():
            return self._run(source_image, target_image).float()


def example_inputs(model: GuidedFlowModel, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded pair of random normalised images of the model's input size, for tracing."""
    generator = torch.Generator().manual_seed(0)
    height, width = model.input_size
    shape = (batch, 3, height, width)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


@contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Silence the tracer's notes that shapes become constants (the input size is fixed by
    design) and TorchScript's deprecation notice (the format was asked for explicitly)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", r".*is deprecated", FutureWarning)
        yield


def export_torchscript(predictor: FlowPredictor, inputs: tuple[torch.Tensor, ...]) -> bytes:
    """The traced predictor, serialised as a TorchScript archive."""
    buffer = io.BytesIO()
    with _quiet_tracing(), torch.no_grad():
        torch.jit.save(torch.jit.trace(predictor, inputs, check_trace=False), buffer)
    return buffer.getvalue()


def export_onnx(predictor: FlowPredictor, inputs: tuple[torch.Tensor, ...]) -> bytes:
    """The predictor as an ONNX model (TorchScript-based exporter, opset :data:`ONNX_OPSET`,
    dynamic batch axis)."""
    buffer = io.BytesIO()
    axes = {name: {0: "batch"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    with _quiet_tracing(), torch.no_grad():
        torch.onnx.export(
            predictor,
            inputs,
            # The TorchScript exporter writes to file objects too; the annotation says paths.
            buffer,  # type: ignore[arg-type]
            dynamo=False,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            opset_version=ONNX_OPSET,
        )
    return buffer.getvalue()


EXPORTERS = {"torchscript": export_torchscript, "onnx": export_onnx}


def load_model(
    ckpt: str | None, backbone: str, input_size: int | None
) -> tuple[GuidedFlowModel, str]:
    """The model to export and a description of where it came from: the networks of checkpoint
    ``ckpt`` (whose input size ``input_size`` must match when given) or, with ``ckpt`` None,
    the untrained method on ``backbone``'s ImageNet weights at ``input_size`` (default 320)."""
    if ckpt is None:
        size = 320 if input_size is None else input_size
        model = GuidedSemanticFlow.untrained(backbone=backbone, input_size=size).model
        return model, f"the untrained method on {backbone}"
    model = GuidedSemanticFlow.from_checkpoint(ckpt).model
    if input_size is not None and (input_size, input_size) != model.input_size:
        raise ConfigError(
            f"--input-size {input_size} does not match the checkpoint's input size "
            f"{model.input_size[0]}: a checkpoint fixes its grid, leave --input-size out"
        )
    return model, f"the networks of {ckpt}"


def build_parser() -> argparse.ArgumentParser:
    """The command's options."""
    parser = argparse.ArgumentParser(
        prog="guided-flow export",
        description="Export the inference model (two normalised images -> flow_s2t in pixels) "
        "to TorchScript or ONNX, with a fixed input size.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="guided-flow checkpoint (stage 1 or 2)")
    source.add_argument(
        "--untrained",
        action="store_true",
        help="export the untrained method (ImageNet backbone, tau = S, the guided soft-argmax)",
    )
    parser.add_argument("--format", required=True, choices=FORMATS, help="file format")
    parser.add_argument("--out", required=True, help="the file to write")
    parser.add_argument(
        "--input-size",
        type=int,
        help="side of the square input in pixels (with --untrained, default 320; a checkpoint "
        "fixes its own)",
    )
    parser.add_argument(
        "--backbone",
        default="efficientnet_lite0",
        help="backbone of the untrained method (default: efficientnet_lite0, weights embedded)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``guided-flow export``; bad options raise :class:`~guided_flow.errors.ConfigError`
    (the console entry point prints it on one line and exits with code 2)."""
    args = build_parser().parse_args(argv)
    model, origin = load_model(args.ckpt, args.backbone, args.input_size)
    predictor = FlowPredictor(model)
    content = EXPORTERS[args.format](predictor, example_inputs(model))
    with atomic_open(args.out) as handle:
        handle.write(content)
    size = model.input_size[0]
    print(f"wrote {args.out} ({args.format}, {origin}, input {size} x {size}, batch free)")
    return 0
