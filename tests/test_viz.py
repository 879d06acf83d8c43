"""Tests of guided_flow.viz.drawing and guided_flow.io.flow_files."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch
from PIL import Image

from guided_flow.errors import DataError
from guided_flow.io.flow_files import FLO_MAGIC, read_flo, write_flo, write_flow_npy
from guided_flow.viz.drawing import (
    draw_keypoints,
    draw_matches,
    flow_to_color,
    panel,
    save_png,
    warp_image,
)


def _colour_of(dx: float, dy: float, max_norm: float = 1.0) -> np.ndarray:
    flow = np.array([dx, dy], dtype=np.float32).reshape(1, 1, 2)
    return flow_to_color(flow, max_norm=max_norm)[0, 0].astype(int)


def _saturation(rgb: np.ndarray) -> float:
    return float((rgb.max() - rgb.min()) / max(rgb.max(), 1))


def _random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# --- colour wheel -------------------------------------------------------------------------------


def test_zero_flow_is_white() -> None:
    colours = flow_to_color(np.zeros((4, 5, 2), dtype=np.float32))
    assert colours.shape == (4, 5, 3) and colours.dtype == np.uint8
    assert np.all(colours == 255)


def test_cardinal_directions_follow_the_standard_wheel() -> None:
    right, down, left, up = (_colour_of(*d) for d in [(1, 0), (0, 1), (-1, 0), (0, -1)])
    np.testing.assert_array_equal(right, [255, 0, 0])  # +x: red
    assert down[0] == 255 and down[1] > 200 and down[2] == 0  # +y (down): yellow
    assert left[0] == 0 and left[1] > 150 and left[2] == 255  # -x: cyan
    assert up[2] == 255 and up[1] == 0 and 50 < up[0] < 150  # -y: blue-violet
    assert len({tuple(c) for c in (right, down, left, up)}) == 4
    for a, b in [(right, left), (down, up)]:  # opposite directions are complementary-ish
        assert np.all(np.maximum(a, b) >= 190) and np.all(np.minimum(a, b) <= 120)


def test_saturation_grows_with_magnitude_and_overflow_darkens() -> None:
    angles = np.linspace(0, 2 * np.pi, 7, endpoint=False)
    for angle in angles:
        direction = np.array([np.cos(angle), np.sin(angle)])
        saturations = [_saturation(_colour_of(*(t * direction))) for t in np.linspace(0, 1, 6)]
        assert saturations[0] == 0 and np.all(np.diff(saturations) > 0)
        assert _colour_of(*(2 * direction)).max() < _colour_of(*(0.99 * direction)).max()


def test_default_max_norm_is_the_largest_magnitude_and_tensor_layout() -> None:
    flow = torch.zeros(2, 3, 4)
    flow[0, 1, 2] = 5.0  # one pixel moving 5 px to the right
    colours = flow_to_color(flow)
    assert colours.shape == (3, 4, 3)
    np.testing.assert_array_equal(colours[1, 2], [255, 0, 0])
    np.testing.assert_array_equal(colours, flow_to_color(flow.permute(1, 2, 0).numpy()))
    np.testing.assert_array_equal(flow_to_color(flow, max_norm=10.0)[1, 2], [255, 128, 128])


def test_unknown_flow_is_black() -> None:
    flow = np.zeros((2, 2, 2), dtype=np.float32)
    flow[0, 0] = np.nan
    flow[1, 1, 0] = 2e9
    colours = flow_to_color(flow, max_norm=1.0)
    assert np.all(colours[0, 0] == 0) and np.all(colours[1, 1] == 0)
    assert np.all(colours[0, 1] == 255)


# --- warping ------------------------------------------------------------------------------------


def test_warp_with_zero_flow_is_identity() -> None:
    image = _random_image(9, 11)
    np.testing.assert_array_equal(warp_image(image, np.zeros((9, 11, 2), np.float32)), image)


def test_warp_with_constant_integer_flow_is_a_shift() -> None:
    image = _random_image(12, 10)
    flow = torch.zeros(2, 12, 10)
    flow[0], flow[1] = 2.0, -3.0  # result(x, y) = image(x + 2, y - 3)
    warped = warp_image(image, flow)
    np.testing.assert_array_equal(warped[3:, :-2], image[:-3, 2:])
    assert np.all(warped[:3] == 0) and np.all(warped[:, -2:] == 0)  # sampled outside: black


def test_warp_rejects_mismatched_grids() -> None:
    with pytest.raises(ValueError, match="one grid"):
        warp_image(_random_image(4, 4), np.zeros((4, 5, 2), np.float32))


# --- drawing ------------------------------------------------------------------------------------


def test_draw_matches_size_padding_and_line_colour() -> None:
    source, target = _random_image(20, 30, seed=1), _random_image(26, 16, seed=2)
    source[10] = 0
    target[10] = 0
    src_pts = np.array([[2.0, 10.0], [50.0, 1.0], [np.nan, 3.0]])
    trg_pts = np.array([[13.0, 10.0], [1.0, 1.0], [1.0, 1.0]])
    out = draw_matches(source, target, src_pts, trg_pts)
    assert out.shape == (26, 46, 3) and out.dtype == np.uint8
    assert np.all(out[20:, :30] == 0)  # the shorter image is padded with black
    # Only the first match is inside both images: it gets the first hue (red) along row 10.
    np.testing.assert_array_equal(out[10, 15], [255, 0, 0])
    np.testing.assert_array_equal(out[10, 35], [255, 0, 0])
    np.testing.assert_array_equal(out[1, 30:], target[1])  # the skipped matches left no trace


def test_draw_matches_caps_the_number_of_lines() -> None:
    blank = np.zeros((10, 10, 3), np.uint8)
    pts = np.stack([np.full(10, 5.0), np.arange(10.0)], axis=1)
    out = draw_matches(blank, blank, pts, pts, max_lines=0)
    assert np.all(out == 0)
    out = draw_matches(blank, blank, pts, pts, max_lines=3)
    rows = {int(y) for y in np.flatnonzero(out[:, 10].any(axis=1))}
    assert len(rows) == 3 and {0, 9} <= rows  # evenly spaced over the matches, ends included


def test_draw_keypoints_colours_and_skips_outside() -> None:
    image = np.zeros((20, 20, 3), np.uint8)
    colours = np.array([[10, 200, 30], [1, 2, 3]], np.uint8)
    out = draw_keypoints(image, torch.tensor([[5.0, 6.0], [-4.0, 2.0]]), colours)
    np.testing.assert_array_equal(out[6, 5], [10, 200, 30])
    assert np.all(image == 0)  # the input is not modified
    assert not np.any(np.all(out == [1, 2, 3], axis=-1))


def test_panel_size() -> None:
    images = [_random_image(20, 30), _random_image(40, 20), np.zeros((10, 10), np.uint8)]
    strip = panel(images, ["a", "b", "mask"])
    band = strip.shape[0] - 40
    assert 8 <= band <= 30
    assert strip.shape == (40 + band, 60 + 20 + 40 + 2 * 4, 3) and strip.dtype == np.uint8
    assert panel(images, ["a", "b", "c"], height=10).shape[0] == 10 + band
    with pytest.raises(ValueError):
        panel(images, ["a"])


def test_save_png_round_trip(tmp_path) -> None:
    image = _random_image(7, 9)
    path = save_png(tmp_path / "nested" / "dir" / "picture.png", image)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
    assert [p.name for p in path.parent.iterdir()] == ["picture.png"]  # no temporary left


# --- .flo files ---------------------------------------------------------------------------------


def test_flo_round_trip_and_header(tmp_path) -> None:
    flow = np.random.default_rng(3).normal(scale=20, size=(5, 7, 2)).astype(np.float32)
    flow[0, 0] = [np.inf, -0.0]
    path = tmp_path / "sub" / "flow.flo"
    write_flo(path, flow)
    data = path.read_bytes()
    assert struct.unpack("<fii", data[:12]) == (FLO_MAGIC, 7, 5)
    assert data[:4] == b"PIEH" and len(data) == 12 + 5 * 7 * 2 * 4
    np.testing.assert_array_equal(np.frombuffer(data[12:20], "<f4"), [np.inf, -0.0])
    back = read_flo(path)
    assert back.dtype == np.float32 and back.shape == (5, 7, 2)
    assert back.tobytes() == flow.tobytes()  # bit-exact
    write_flo(path, torch.from_numpy(flow).permute(2, 0, 1))  # tensor layout, overwrite
    assert read_flo(path).tobytes() == flow.tobytes()
    assert [p.name for p in path.parent.iterdir()] == ["flow.flo"]


def test_flo_bad_magic_names_the_file(tmp_path) -> None:
    path = tmp_path / "bad_magic.flo"
    path.write_bytes(struct.pack("<fii", 1.0, 1, 1) + bytes(8))
    with pytest.raises(DataError, match="bad_magic.flo.*not a .flo"):
        read_flo(path)


@pytest.mark.parametrize("keep", [5, 12, 12 + 8 * 6 - 1])
def test_flo_truncated_names_the_file(tmp_path, keep: int) -> None:
    path = tmp_path / "cut.flo"
    write_flo(path, np.ones((2, 3, 2), np.float32))
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(DataError, match="cut.flo.*truncated"):
        read_flo(path)


def test_flo_missing_file_is_a_data_error(tmp_path) -> None:
    with pytest.raises(DataError, match="absent.flo"):
        read_flo(tmp_path / "absent.flo")


def test_write_flow_npy(tmp_path) -> None:
    flow = np.arange(24, dtype=np.float32).reshape(3, 4, 2)
    path = tmp_path / "out" / "flow_s2t"
    write_flow_npy(path, torch.from_numpy(flow).permute(2, 0, 1))
    back = np.load(path)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, flow)
    with pytest.raises(ValueError, match="H x W x 2"):
        write_flow_npy(path, np.zeros((2, 3, 4), np.float32))
