"""The Python API: original-pixel mapping, input types, identity pairs, checkpoints, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from skimage import data as skdata

import guided_flow
from guided_flow import api
from guided_flow.api import CheckpointError, GuidedSemanticFlow, flow_to_original_pixels
from guided_flow.errors import DataError, GuidedFlowError
from guided_flow.io.images import resize_image
from guided_flow.model import ModelConfig
from guided_flow.model.geometry import rescale_points
from guided_flow.training.stages import MatchingStage

SIZE = 160
SHIFT_CELLS = (1.0, 0.5)  # the constant residual flow of the test checkpoint, in cells


def textured_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A generated ``height x width x 3`` uint8 picture: smooth random colour blobs."""
    coarse = np.random.default_rng(seed).integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    return resize_image(coarse, (height, width))


def write_shifted_checkpoint(path: Path) -> Path:
    """A stage-2 checkpoint (input 160) whose matching net adds :data:`SHIFT_CELLS` to the flow
    everywhere, so that the identity pair's flow is that shift."""
    stage = MatchingStage.from_options(input_size=SIZE)
    with torch.no_grad():
        stage.model.matching_net.body.conv8.bias.copy_(torch.tensor(SHIFT_CELLS))
    trainer = pl.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu"
    )
    trainer.strategy.connect(stage)
    trainer.save_checkpoint(path)
    return path


def shifted_flow(height: int, width: int) -> np.ndarray:
    """The identity pair's flow (dx, dy) in original pixels under the shifted checkpoint: the
    shift in input pixels (16 per cell) divided by the per-axis resize factor."""
    return np.array(SHIFT_CELLS) * 16 * np.array([width, height]) / SIZE


@pytest.fixture(scope="module")
def matcher() -> GuidedSemanticFlow:
    return GuidedSemanticFlow.untrained(input_size=SIZE)


# --- mapping to original pixels -----------------------------------------------------------------


def test_zero_input_flow_maps_each_pixel_to_its_proportional_position():
    source_size, target_size = (30, 50), (60, 20)  # opposite aspect ratios
    flow = flow_to_original_pixels(torch.zeros(2, 16, 16), source_size, target_size)
    assert flow.shape == (30, 50, 2)
    ys, xs = np.mgrid[0:30, 0:50]
    positions = torch.from_numpy(np.stack((xs, ys), axis=-1).astype(np.float64))
    scale = torch.tensor([20 / 50, 60 / 30], dtype=torch.float64)
    expected = rescale_points(positions, scale) - positions
    np.testing.assert_allclose(flow.numpy(), expected.numpy(), atol=1e-4)


def test_a_constant_input_flow_is_scaled_per_axis():
    flow_input = torch.tensor([2.0, 3.0]).view(2, 1, 1).expand(2, 16, 16)
    flow = flow_to_original_pixels(flow_input, (30, 50), (30, 50))
    np.testing.assert_allclose(flow[..., 0].numpy(), 2.0 * 50 / 16, atol=1e-4)
    np.testing.assert_allclose(flow[..., 1].numpy(), 3.0 * 30 / 16, atol=1e-4)


def test_warp_source_follows_the_flow_onto_the_target_grid():
    source = textured_image(40, 60)
    flow_t2s = np.zeros((30, 50, 2), dtype=np.float32)
    flow_t2s[..., 0], flow_t2s[..., 1] = 7.0, 4.0
    warped = api.warp_source(source, flow_t2s)
    assert warped.shape == (30, 50, 3) and warped.dtype == np.uint8
    np.testing.assert_array_equal(warped[:30, :50], source[4:34, 7:57])
    flow_t2s[..., 0] = 100.0  # everything falls outside the source
    assert not api.warp_source(source, flow_t2s).any()


# --- matching -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image", [textured_image(120, 200), skdata.chelsea()], ids=["generated", "photograph"]
)
def test_the_identity_pair_gives_zero_flow(image):
    kps = [[10.0, 20.0], [150.5, 99.25]]
    # tau = G' (the paper's base): exactly zero on an identity pair
    matcher = GuidedSemanticFlow.untrained(input_size=SIZE, flow_base="guidance")
    result = matcher.match(image, image, source_kps=kps)
    height, width = image.shape[:2]
    assert result.flow_s2t.shape == (height, width, 2) and result.flow_s2t.dtype == np.float32
    np.testing.assert_allclose(result.flow_s2t, 0.0, atol=1e-3)
    np.testing.assert_allclose(result.flow_t2s, 0.0, atol=1e-3)
    np.testing.assert_allclose(result.keypoints, kps, atol=1e-3)
    assert result.confidence.shape == (height, width)
    assert (result.confidence > 0.9).all() and (result.confidence <= 1.0).all()
    source_points, target_points = result.confident_matches
    assert len(source_points) == (SIZE // 16) ** 2  # every cell is its own confident match
    np.testing.assert_allclose(source_points, target_points, atol=1e-3)


def test_every_input_type_gives_the_same_result(matcher, tmp_path):
    source, target = textured_image(90, 130, seed=1), textured_image(110, 70, seed=2)
    path = tmp_path / "source.png"
    Image.fromarray(source).save(path)
    reference = matcher.match(source, target).flow_s2t
    as_tensor = torch.from_numpy(source).permute(2, 0, 1)
    for given in (
        path,
        str(path),
        Image.fromarray(source),
        source.astype(np.float32) / 255.0,
        as_tensor,
        as_tensor.float() / 255.0,
    ):
        np.testing.assert_allclose(matcher.match(given, target).flow_s2t, reference, atol=1e-4)


def test_any_sizes_give_finite_results_on_the_original_grids(matcher):
    source, target = textured_image(90, 200, seed=3), textured_image(150, 64, seed=4)
    kps = np.array([[0.0, 0.0], [12.0, 40.0], [199.0, 89.0], [57.0, 3.0]])
    result = matcher.match(source, target, source_kps=kps)
    assert result.flow_s2t.shape == (90, 200, 2) and result.flow_t2s.shape == (150, 64, 2)
    assert result.confidence.shape == (90, 200)
    for array in (result.flow_s2t, result.flow_t2s, result.confidence, result.keypoints):
        assert np.isfinite(array).all()
    source_points, target_points = result.confident_matches
    assert source_points.shape == target_points.shape and source_points.shape[1] == 2
    # Keypoints at whole pixels move exactly as the dense flow says.
    xs, ys = kps[:, 0].astype(int), kps[:, 1].astype(int)
    np.testing.assert_allclose(result.keypoints, kps + result.flow_s2t[ys, xs], atol=1e-3)
    assert api.warp_source(source, result.flow_t2s).shape == (150, 64, 3)
    assert matcher.match(source, target, source_kps=[]).keypoints.shape == (0, 2)


def test_a_crop_is_found_at_its_offset_despite_an_anisotropic_resize(matcher):
    source = skdata.astronaut()  # 512 x 512
    target = source[100:400, 60:460]  # 300 x 400: the true flow is (-60, -100) on the crop
    flow = matcher.match(source, target).flow_s2t[100:400, 60:460].reshape(-1, 2)
    # Within a third of a feature cell (16 input pixels = 51 source pixels).
    np.testing.assert_allclose(np.median(flow, axis=0), [-60.0, -100.0], atol=15.0)


@pytest.mark.parametrize("input_size", [320, 640])
@pytest.mark.parametrize(
    "image",
    [textured_image(120, 200), skdata.chelsea(), skdata.astronaut()],
    ids=["generated", "photograph", "square"],
)
def test_the_weight_free_default_gives_an_identity_pair_no_flow(image, input_size):
    # S alone is pulled by alike neighbours and by windows the border cuts; refined, it is exact
    result = GuidedSemanticFlow.untrained(input_size=input_size).match(image, image)
    assert np.abs(result.flow_s2t).max() <= 0.05 and np.abs(result.flow_t2s).max() <= 0.05


# --- construction -------------------------------------------------------------------------------


def test_the_default_is_the_untrained_method_at_320_pixels():
    matcher = GuidedSemanticFlow()
    assert matcher.input_size == (320, 320) and matcher.checkpoint is None
    assert matcher.model.backbone.name == "efficientnet_lite0"
    assert not matcher.model.training
    # the best weight-free setting on held-out real pairs: the guided soft-argmax base
    assert (matcher.model.flow_base, matcher.model.soft_argmax_beta) == ("soft_argmax", 50.0)
    assert GuidedSemanticFlow.untrained(flow_base="guidance").model.flow_base == "guidance"


def test_a_checkpoint_brings_its_trained_networks(tmp_path):
    path = write_shifted_checkpoint(tmp_path / "shifted.ckpt")
    matcher = GuidedSemanticFlow.from_checkpoint(path)
    assert matcher.checkpoint == str(path) and matcher.input_size == (SIZE, SIZE)
    image = textured_image(100, 180)
    flow = matcher.match(image, image).flow_s2t
    np.testing.assert_allclose(flow, np.broadcast_to(shifted_flow(100, 180), flow.shape), atol=1e-3)


def test_bad_checkpoints_raise_an_error_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_text("not a checkpoint")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {"model.x": torch.zeros(1)}, "hyper_parameters": {}}, foreign)
    no_state = tmp_path / "weights.pth"
    torch.save({"weight": torch.zeros(1)}, no_state)
    for path in (tmp_path / "missing.ckpt", garbage, foreign, no_state):
        with pytest.raises(CheckpointError, match=path.name) as caught:
            GuidedSemanticFlow.from_checkpoint(path)
        assert isinstance(caught.value, GuidedFlowError)


@pytest.mark.parametrize(
    "image, error",
    [
        (42, TypeError),
        (np.zeros((5, 5, 2), dtype=np.uint8), ValueError),
        (np.zeros((5, 5, 3), dtype=np.int32), ValueError),
        (torch.zeros(5, 5, 3), ValueError),
        ("missing.png", DataError),
    ],
)
def test_bad_images_are_refused(matcher, image, error):
    with pytest.raises(error):
        matcher.match(image, textured_image(32, 32))


@pytest.mark.parametrize("kps", [[[1.0, 2.0, 3.0]], [[1.0, float("nan")]], [[1.0], [2.0, 3.0]]])
def test_bad_keypoints_are_refused(matcher, kps):
    image = textured_image(32, 32)
    with pytest.raises(ValueError, match="keypoints"):
        matcher.match(image, image, source_kps=kps)


def test_the_package_exports_the_class_lazily():
    assert guided_flow.GuidedSemanticFlow is GuidedSemanticFlow
    assert guided_flow.MatchResult is api.MatchResult
    code = (
        "import sys, guided_flow; print('torch' in sys.modules, 'guided_flow.api' in sys.modules)"
    )
    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert output.split() == ["False", "False"]


def test_a_model_config_builds_the_untrained_method():
    matcher = GuidedSemanticFlow.from_config(ModelConfig(input_size=64, rho=0.7, c_m=2.0))
    assert matcher.input_size == (64, 64)
    assert (matcher.model.rho, matcher.model.c_m, matcher.checkpoint) == (0.7, 2.0, None)
