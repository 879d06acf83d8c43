"""``guided-flow export``: TorchScript and ONNX files that reproduce the eager model's flow."""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from guided_flow.cli.export import FlowPredictor, InferenceOptions, example_inputs
from guided_flow.cli.export import main as export_main
from guided_flow.cli.main import main as cli_main
from guided_flow.errors import ConfigError
from guided_flow.model.backbone import FeatureExtractor
from guided_flow.model.flow_model import GuidedFlowModel

SIZE = 64  # a 4 x 4 feature grid


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GuidedFlowModel]:
    """A guided-flow checkpoint whose every part matters: random-weight backbone, and random
    last layers in both networks (at initialisation the pruning net is constant and the matching
    residual is zero)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        backbone = FeatureExtractor("efficientnet_lite0", "none")
    model = GuidedFlowModel(backbone, grid=(SIZE // 16, SIZE // 16)).eval()
    with torch.no_grad():
        for net in (model.pruning_net, model.matching_net):
            net.body.conv8.weight.normal_(0.0, 0.05)
    path = tmp_path_factory.mktemp("ckpt") / "stage2.ckpt"
    torch.save(
        {
            "state_dict": {f"model.{key}": value for key, value in model.state_dict().items()},
            "hyper_parameters": {"backbone": "efficientnet_lite0", "input_size": SIZE},
        },
        path,
    )
    return path, model


def eager_flow(model: GuidedFlowModel, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
    with torch.inference_mode():
        return FlowPredictor(model)(*inputs).numpy()


def test_torchscript_export_matches_eager(checkpoint, tmp_path):
    path, model = checkpoint
    out = tmp_path / "model.pt"
    assert (
        cli_main(["export", "--ckpt", str(path), "--format", "torchscript", "--out", str(out)]) == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary left
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        exported = torch.jit.load(io.BytesIO(out.read_bytes()))
    inputs = example_inputs(model, batch=3)  # exported at batch 1: the batch size is free
    expected = eager_flow(model, inputs)
    assert expected.shape == (3, 2, SIZE, SIZE) and np.abs(expected).max() > 0.1
    with torch.inference_mode():
        flow = exported(*inputs).numpy()
    np.testing.assert_allclose(flow, expected, rtol=0, atol=1e-4)


def test_onnx_export_matches_eager(checkpoint, tmp_path):
    path, model = checkpoint
    out = tmp_path / "model.onnx"
    assert cli_main(["export", "--ckpt", str(path), "--format", "onnx", "--out", str(out)]) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["source_image", "target_image"]
    assert session.get_inputs()[0].shape[1:] == [3, SIZE, SIZE]
    inputs = example_inputs(model, batch=2)
    expected = eager_flow(model, inputs)
    (flow,) = session.run(
        None, {"source_image": inputs[0].numpy(), "target_image": inputs[1].numpy()}
    )
    assert flow.shape == (2, 2, SIZE, SIZE)
    np.testing.assert_allclose(flow, expected, rtol=0, atol=1e-3)


def test_inference_options_keep_the_flow(checkpoint):
    _, model = checkpoint
    inputs = example_inputs(model, batch=2)
    plain = FlowPredictor(copy.deepcopy(model), InferenceOptions(channels_last=False))
    expected = plain.predict(*inputs)
    fast = FlowPredictor(copy.deepcopy(model)).predict(*inputs)  # default: channels_last
    assert fast.is_contiguous() and fast.dtype == torch.float32
    torch.testing.assert_close(fast, expected, rtol=0, atol=1e-4)
    bf16 = InferenceOptions(channels_last=False, bf16=True)
    low = FlowPredictor(copy.deepcopy(model), bf16).predict(*inputs)
    assert low.dtype == torch.float32 and low.shape == expected.shape
    assert torch.isfinite(low).all()


def test_untrained_export_uses_the_requested_input_size(tmp_path):
    out = tmp_path / "untrained.onnx"
    argv = ["export", "--untrained", "--format", "onnx", "--out", str(out), "--input-size", "32"]
    assert cli_main(argv) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    zeros = np.zeros((1, 3, 32, 32), dtype=np.float32)
    (flow,) = session.run(None, {"source_image": zeros, "target_image": zeros})
    assert flow.shape == (1, 2, 32, 32) and np.isfinite(flow).all()


def test_input_size_other_than_the_checkpoints_is_refused(checkpoint, tmp_path):
    path, _ = checkpoint
    out = tmp_path / "model.onnx"
    with pytest.raises(ConfigError, match="input-size 96"):
        export_main(
            ["--ckpt", str(path), "--format", "onnx", "--out", str(out), "--input-size", "96"]
        )
    assert not out.exists()
    assert (
        cli_main(
            ["export", "--untrained", "--format", "onnx", "--out", str(out), "--input-size", "40"]
        )
        == 2
    )
    assert not out.exists()


def test_ckpt_and_untrained_are_exclusive_and_one_is_required(tmp_path):
    out = str(tmp_path / "model.pt")
    with pytest.raises(SystemExit):
        cli_main(["export", "--format", "torchscript", "--out", out])
    with pytest.raises(SystemExit):
        cli_main(["export", "--ckpt", "x.ckpt", "--untrained", "--format", "onnx", "--out", out])
