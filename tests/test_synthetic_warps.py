"""Random affine + TPS warps: exact ground truth, determinism, parameter ranges."""

from __future__ import annotations

import math

import pytest
import torch

from data_modules import warps
from data_modules.warps import (
    WarpConfig,
    WarpParams,
    dense_flow,
    sample_warp_params,
    synthesize_pairs,
    thin_plate_spline,
    tps_control_points,
    warp_key,
    warp_points,
)
from guided_flow.errors import ConfigError
from guided_flow.model.geometry import cell_positions, warp_by_flow


def smooth_image(batch: int, height: int, width: int, dtype=torch.float32) -> torch.Tensor:
    """``B x 3 x H x W`` images of low-frequency sinusoids, analytic through :func:`smooth_at`."""
    grid = cell_positions(height, width, dtype=torch.float64).view(1, height, width, 2)
    return smooth_at(grid.expand(batch, -1, -1, -1)).to(dtype)


def smooth_at(points: torch.Tensor) -> torch.Tensor:
    """The smooth image evaluated at pixel positions ``... x H x W x 2`` -> ``... x 3 x H x W``."""
    x, y = points[..., 0], points[..., 1]
    channels = (torch.sin(0.11 * x + 0.05 * y), torch.cos(0.07 * x - 0.09 * y), 0.01 * (x + y))
    return torch.stack(channels, dim=-3)


def params_of(affine: list[list[float]], offsets: torch.Tensor | None = None) -> WarpParams:
    identity = WarpParams.identity(1)
    tps = identity.tps_offsets if offsets is None else offsets
    return WarpParams(torch.tensor([affine], dtype=torch.float32), tps)


def test_identity_gives_zero_flow_and_equal_images() -> None:
    images = torch.rand(2, 3, 40, 56)
    pair = synthesize_pairs(images, WarpParams.identity(2))
    assert pair.flow_s2t.shape == (2, 2, 40, 56) and pair.flow_valid.shape == (2, 1, 40, 56)
    assert pair.flow_s2t.abs().max() < 1e-4
    assert torch.allclose(pair.source, images, atol=1e-4)
    assert pair.target is images
    assert pair.flow_valid.all()


def test_translation_gives_constant_analytic_flow() -> None:
    height, width = 48, 80
    params = params_of([[1, 0, 0.1], [0, 1, -0.05]])
    pair = synthesize_pairs(torch.rand(1, 3, height, width), params)
    expected = torch.tensor([0.1 * width, -0.05 * height]).view(1, 2, 1, 1)
    assert torch.allclose(pair.flow_s2t, expected.expand_as(pair.flow_s2t), atol=1e-3)
    xs = torch.arange(width).view(1, 1, 1, width)
    ys = torch.arange(height).view(1, 1, height, 1)
    assert torch.equal(pair.flow_valid, (xs + 8 <= width - 1) & (ys - 2.4 >= 0))


def test_rotation_and_scale_act_about_the_image_centre() -> None:
    size, angle, scale = 64, math.radians(8.0), 1.1
    cos, sin = scale * math.cos(angle), scale * math.sin(angle)
    flow, _ = dense_flow(params_of([[cos, -sin, 0], [sin, cos, 0]]), (size, size))
    q = cell_positions(size, size) - (size - 1) / 2
    matrix = torch.tensor([[cos, -sin], [sin, cos]])
    expected = (q @ matrix.T - q).view(size, size, 2).permute(2, 0, 1)
    assert torch.allclose(flow[0], expected, atol=1e-3)


def test_tps_moves_control_points_and_composes_affine_after_it() -> None:
    height, width = 50, 70
    offsets = torch.rand(1, 9, 2) * 0.2 - 0.1
    side, centre = torch.tensor([width, height]), torch.tensor([width - 1, height - 1]) / 2
    controls = tps_control_points(3)[None] * side + centre
    moved = warp_points(params_of([[1, 0, 0], [0, 1, 0]], offsets), controls, (height, width))
    assert torch.allclose(moved, controls + offsets * side, atol=1e-3)
    affine = [[0.9, -0.2, 0.05], [0.2, 0.9, 0.1]]
    composed = warp_points(params_of(affine, offsets), controls, (height, width))
    unit = tps_control_points(3)[None] + offsets
    expected = (unit @ torch.tensor(affine)[:, :2].T + torch.tensor(affine)[:, 2]) * side + centre
    assert torch.allclose(composed, expected, atol=1e-3)


def test_spline_is_bookstein_thin_plate_spline_of_the_control_grid() -> None:
    """Independent of kornia: scipy's thin-plate RBF with a linear term is Bookstein's spline."""
    interpolator = pytest.importorskip("scipy.interpolate").RBFInterpolator
    generator = torch.Generator().manual_seed(5)
    controls = tps_control_points(3, dtype=torch.float64)[None]
    moved = controls + torch.rand(1, 9, 2, generator=generator, dtype=torch.float64) * 0.2 - 0.1
    points = torch.rand(1, 200, 2, generator=generator, dtype=torch.float64) * 1.2 - 0.6
    expected = interpolator(controls[0].numpy(), moved[0].numpy(), kernel="thin_plate_spline")(
        points[0].numpy()
    )
    bent = thin_plate_spline(controls, moved, points)
    assert torch.allclose(bent[0], torch.from_numpy(expected), atol=1e-9)
    assert torch.allclose(thin_plate_spline(controls, moved, controls), moved, atol=1e-12)


def test_a_spline_that_misses_its_control_points_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    real = warps.warp_points_tps

    def off_centre(points, centres, kernel_weights, affine_weights):
        return real(points, centres + 0.05, kernel_weights, affine_weights)

    warps.check_kornia_spline.cache_clear()
    monkeypatch.setattr(warps, "warp_points_tps", off_centre)
    try:
        with pytest.raises(RuntimeError, match=r"control point .* kornia>=0\.9\.2,<0\.10"):
            dense_flow(sample_warp_params(0, torch.arange(2)), (16, 16))
    finally:
        warps.check_kornia_spline.cache_clear()


def test_source_is_the_target_sampled_at_the_flow() -> None:
    height, width = 72, 96
    target = smooth_image(4, height, width)
    pair = synthesize_pairs(target, sample_warp_params(3, torch.arange(4)))
    assert torch.allclose(pair.source, warp_by_flow(target, pair.flow_s2t), atol=1e-5)
    # independent of any warping helper: compare with the analytic image at q + flow(q)
    grid = cell_positions(height, width).view(1, height, width, 2)
    matches = grid + pair.flow_s2t.permute(0, 2, 3, 1)
    expected = smooth_at(matches.double()).float()
    interior = pair.flow_valid.clone()
    interior &= (matches[..., 0] >= 1).unsqueeze(1) & (matches[..., 0] <= width - 2).unsqueeze(1)
    interior &= (matches[..., 1] >= 1).unsqueeze(1) & (matches[..., 1] <= height - 2).unsqueeze(1)
    assert interior.float().mean() > 0.5
    error = (pair.source - expected).abs().amax(dim=1, keepdim=True)[interior]
    assert error.max() < 0.01
    far = (matches[..., 0] < -1) | (matches[..., 0] > width) | (matches[..., 1] < -1)
    far |= matches[..., 1] > height
    assert far.any()
    assert pair.source.permute(0, 2, 3, 1)[far].abs().max() == 0  # zero outside the target


def test_valid_mask_marks_matches_inside_the_target() -> None:
    params = sample_warp_params(0, torch.arange(8))
    flow, valid = dense_flow(params, (40, 40))
    matches = cell_positions(40, 40).view(1, 40, 40, 2) + flow.permute(0, 2, 3, 1)
    inside = ((matches >= 0) & (matches <= 39)).all(dim=-1)
    assert torch.equal(valid[:, 0], inside)
    assert 0.3 < valid.float().mean() < 1.0


def test_params_are_a_pure_function_of_seed_and_key() -> None:
    keys = torch.tensor([5, 17, 2**40 + 3, 9])
    first = sample_warp_params(11, keys)
    torch.manual_seed(1234)  # the global generator plays no part
    again = sample_warp_params(11, keys)
    assert torch.equal(first.affine, again.affine)
    assert torch.equal(first.tps_offsets, again.tps_offsets)
    # batch-independent: a key gets the same warp whatever its neighbours
    alone = sample_warp_params(11, keys[2:3])
    shuffled = sample_warp_params(11, keys.flip(0))
    assert torch.equal(alone.affine[0], first.affine[2])
    assert torch.equal(shuffled.tps_offsets.flip(0), first.tps_offsets)
    # different keys and seeds differ
    assert not torch.allclose(first.affine[0], first.affine[1])
    other_seed = sample_warp_params(12, keys)
    assert (other_seed.tps_offsets - first.tps_offsets).abs().amax(dim=(1, 2)).min() > 1e-4


def test_params_are_pinned_across_processes_and_versions() -> None:
    params = sample_warp_params(7, torch.tensor([0, 2**40 + 3]), dtype=torch.float64)
    expected_affine = torch.tensor(
        [
            [[0.97390047, -0.12264417, 0.02697222], [0.12264417, 0.97390047, -0.00793226]],
            [[0.91685129, -0.10548885, -0.04509613], [0.10548885, 0.91685129, 0.02606381]],
        ],
        dtype=torch.float64,
    )
    expected_offsets = torch.tensor(
        [
            [[0.09514876, 0.03430865], [0.05197722, 0.07460028]],
            [[-0.07805944, 0.06386024], [-0.09527742, 0.02090785]],
        ],
        dtype=torch.float64,
    )
    assert torch.allclose(params.affine, expected_affine, atol=1e-7)
    assert torch.allclose(params.tps_offsets[:, :2], expected_offsets, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_params_and_flow_agree_across_devices() -> None:
    keys = torch.arange(6)
    on_cpu = sample_warp_params(2, keys)
    on_gpu = sample_warp_params(2, keys.cuda())
    assert on_gpu.affine.is_cuda
    assert torch.equal(on_cpu.affine, on_gpu.affine.cpu())
    images = smooth_image(6, 64, 64)
    cpu_pair = synthesize_pairs(images, on_cpu)
    gpu_pair = synthesize_pairs(images.cuda(), on_gpu)
    assert gpu_pair.flow_s2t.is_cuda and gpu_pair.source.is_cuda
    assert torch.allclose(cpu_pair.flow_s2t, gpu_pair.flow_s2t.cpu(), atol=1e-3)


def test_parameter_ranges_over_many_samples() -> None:
    config = WarpConfig()
    params = sample_warp_params(0, torch.arange(4000), config, dtype=torch.float64)
    linear, translation = params.affine[:, :, :2], params.affine[:, :, 2]
    scale = torch.linalg.det(linear).sqrt()
    angle = torch.rad2deg(torch.atan2(linear[:, 1, 0], linear[:, 0, 0]))
    assert torch.allclose(linear[:, 0, 0], linear[:, 1, 1]) and torch.allclose(
        linear[:, 0, 1], -linear[:, 1, 0]
    )
    assert translation.abs().max() <= 0.15 and translation.abs().max() > 0.12
    assert abs(translation.std().item() - 0.05) < 0.005 and translation.mean().abs() < 0.005
    assert angle.min() >= -10 and angle.max() <= 10 and angle.min() < -9.9 and angle.max() > 9.9
    assert scale.min() >= 0.8 - 1e-9 and scale.max() <= 1.2 + 1e-9
    assert scale.min() < 0.81 and scale.max() > 1.19 and abs(scale.mean().item() - 1.0) < 0.01
    offsets = params.tps_offsets
    assert offsets.shape == (4000, 9, 2)
    assert offsets.abs().max() <= 0.1 and offsets.abs().max() > 0.099
    assert abs(offsets.abs().mean().item() - 0.05) < 0.002  # uniform in +-0.1


def test_config_switches_parts_off_and_rejects_bad_values() -> None:
    still = WarpConfig(
        max_translation=0,
        max_rotation_deg=0,
        min_scale=1,
        max_scale=1,
        max_tps_offset=0,
        tps_grid_size=4,
    )
    params = sample_warp_params(0, torch.arange(3), still)
    assert params.tps_offsets.shape == (3, 16, 2)
    flow, valid = dense_flow(params, (32, 32))
    assert flow.abs().max() < 1e-4 and valid.all()
    for bad in (
        {"max_translation": -0.1},
        {"translation_sigma": 0},
        {"min_scale": 1.3},
        {"min_scale": 0},
        {"tps_grid_size": 1},
        {"max_tps_offset": -1},
    ):
        with pytest.raises(ConfigError):
            WarpConfig(**bad)


def test_warp_keys_of_training_never_meet_evaluation_keys() -> None:
    assert warp_key(0, 0) == 2**32 and warp_key(1, 5) == 2 * 2**32 + 5
    index = torch.arange(10)
    keys = warp_key(3, index)
    assert keys.dtype == torch.int64 and torch.equal(keys - 4 * 2**32, index)
    training = {warp_key(epoch, i) for epoch in range(3) for i in range(50)}
    assert len(training | set(range(50))) == 200


def test_float64_images_keep_float64_geometry() -> None:
    images = smooth_image(2, 32, 48, dtype=torch.float64)
    pair = synthesize_pairs(images, sample_warp_params(0, torch.arange(2)))
    assert pair.source.dtype == torch.float64 and pair.flow_s2t.dtype == torch.float64
    assert torch.allclose(pair.source, warp_by_flow(images, pair.flow_s2t))
