"""Big pictures: the code paths that keep memory bounded (bands of rows, blocks, reduced JPEG
decoding, streamed PNGs, shrunk page pictures) give what the whole-picture computations give.
They run here on small pictures with tiny bands; the memory and time of a 24-megapixel pair are
measured by ``benchmarks/big_pictures.py``."""

from __future__ import annotations

import base64
import io
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image

from guided_flow.api import GuidedSemanticFlow
from guided_flow.io import images, resample
from guided_flow.io.images import read_image, resize_image, write_png
from guided_flow.io.resample import shrink_image, upsample_flow, warp_picture
from guided_flow.model.geometry import cell_positions, transfer_original_points
from guided_flow.viz import drawing
from guided_flow.viz.drawing import draw_matches, flow_to_color, save_png
from guided_flow.viz.match_page import EMBEDDED_SIZE, write_match_page


def smooth_flow(height: int, width: int, amplitude: float, seed: int = 0) -> torch.Tensor:
    """``2 x height x width`` float32: random values on a 4 x 4 grid, bilinearly resized."""
    coarse = torch.from_numpy(np.random.default_rng(seed).normal(size=(1, 2, 4, 4)) * amplitude)
    return torch.nn.functional.interpolate(
        coarse.float(), size=(height, width), mode="bilinear", align_corners=False
    )[0]


def reference_upsample(flow: torch.Tensor, source_size, target_size) -> np.ndarray:
    """Every source pixel mapped on its own, in float64 (keypoint transfer)."""
    positions = cell_positions(*source_size, dtype=torch.float64)
    matched = transfer_original_points(flow, positions, source_size, target_size)
    return (matched - positions).view(*source_size, 2).numpy()


def exact_warp(source: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Bilinear sampling at ``q + flow(q)`` in float64, zero outside: ``H x W x 3`` unrounded."""
    height, width = flow.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    known = np.isfinite(flow).all(axis=-1)
    x = np.where(known, xs + flow[..., 0], -1e4)
    y = np.where(known, ys + flow[..., 1], -1e4)
    x0, y0 = np.floor(x), np.floor(y)
    total = np.zeros((height, width, 3))
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        cx, cy = x0 + dx, y0 + dy
        weight = (1 - np.abs(x - cx)) * (1 - np.abs(y - cy))
        inside = (cx >= 0) & (cx < source.shape[1]) & (cy >= 0) & (cy < source.shape[0])
        rows = np.clip(cy, 0, source.shape[0] - 1).astype(int)
        columns = np.clip(cx, 0, source.shape[1] - 1).astype(int)
        total += source[rows, columns] * np.where(inside, weight, 0.0)[..., None]
    return total


@pytest.mark.parametrize(
    ("source_size", "target_size", "grid"),
    [((30, 50), (60, 20), 16), ((97, 131), (40, 45), 32), ((7, 300), (300, 7), 16)],
)
def test_the_upsampled_flow_is_the_pointwise_mapping(source_size, target_size, grid):
    for amplitude in (0.0, 3.0, 40.0):
        flow = smooth_flow(grid, grid, amplitude) + torch.randn(2, grid, grid)
        result = upsample_flow(flow, source_size, target_size)
        assert result.shape == (*source_size, 2) and result.dtype == torch.float32
        expected = reference_upsample(flow, source_size, target_size)
        np.testing.assert_allclose(result.numpy(), expected, atol=2e-3, rtol=1e-5)
    double = upsample_flow(flow.double(), source_size, target_size)
    assert double.dtype == torch.float64  # resized with float32 weights (OpenCV's)
    np.testing.assert_allclose(double.numpy(), expected, atol=2e-3, rtol=1e-5)


@pytest.mark.parametrize("sampler", ["remap", "exact"])
@pytest.mark.parametrize("bands", ["default", "tiny"])
def test_the_picture_warped_in_bands_is_bilinear_sampling(monkeypatch, bands, sampler):
    if bands == "tiny":  # chunks and source bands of two rows
        monkeypatch.setattr(resample, "BAND_PIXELS", 100)
    if sampler == "exact":  # every source past remap's limit
        monkeypatch.setattr(resample, "REMAP_MAX_SIDE", 0)
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    grid = cell_positions(50, 60).view(50, 60, 2).numpy()
    flows = {
        "shift": np.broadcast_to(np.float32([7.25, -3.5]), (50, 60, 2)),
        "smooth": smooth_flow(50, 60, 20.0).permute(1, 2, 0).numpy(),
        "wild": rng.normal(0.0, 40.0, (50, 60, 2)),
        "shrink": grid * 0.3 - grid,  # the source's top left corner, three times smaller
        "enlarge": grid * 1.6 - grid + 2.0,  # samples past the source's right and bottom
    }
    line = source[:1, :1]  # a one-pixel source, bilinearly faded to black around it
    around = np.ascontiguousarray(rng.uniform(-2, 2, (50, 60, 2)) - grid, dtype=np.float32)
    for name, flow in [*flows.items(), ("one pixel", around)]:
        flow = np.ascontiguousarray(flow, dtype=np.float32)
        if name == "wild":
            flow[3, 4] = np.nan
            flow[5, 6, 1] = np.inf
        picture = line if name == "one pixel" else source
        warped = warp_picture(picture, flow)
        assert warped.shape == (50, 60, 3) and warped.dtype == np.uint8
        # Rounded right, up to float32 noise at the halves.
        assert np.abs(warped - exact_warp(picture, flow)).max() <= 0.5 + 0.01, name
        if name == "wild":
            assert not warped[3, 4].any() and not warped[5, 6].any()  # non-finite: black
    whole = np.zeros((50, 60, 2), np.float32)
    np.testing.assert_array_equal(warp_picture(source, whole), source[:50, :60])


def test_colouring_in_bands_gives_the_pixels_of_colouring_at_once(monkeypatch):
    rng = np.random.default_rng(1)
    flow = rng.normal(0.0, 5.0, (37, 53, 2))
    flow[2, 3] = np.nan
    whole = (flow_to_color(flow), flow_to_color(flow, 3.0))
    monkeypatch.setattr(drawing, "_COLOUR_BAND", 60)  # one row and a bit
    banded = (flow_to_color(flow), flow_to_color(flow, 3.0))
    for expected, result in zip(whole, banded, strict=True):
        np.testing.assert_array_equal(result, expected)


def test_matches_are_drawn_on_the_pair_and_the_pictures_are_left_as_they_were():
    rng = np.random.default_rng(1)
    source = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    target = rng.integers(0, 256, (44, 21, 3), dtype=np.uint8)
    kept = source.copy(), target.copy()
    starts, ends = rng.uniform(-2, 55, (150, 2)), rng.uniform(-2, 45, (150, 2))
    drawn = draw_matches(source, target, starts, ends)
    canvas = np.zeros((44, 74, 3), np.uint8)
    canvas[:37, :53], canvas[:, 53:] = source, target
    changed = (drawn != canvas).any(axis=-1)
    assert changed.sum() > 500  # the lines and dots are there
    np.testing.assert_array_equal(source, kept[0])
    np.testing.assert_array_equal(target, kept[1])


def test_big_pngs_are_streamed_and_read_back_exactly(tmp_path, monkeypatch):
    picture = np.random.default_rng(2).integers(0, 256, (45, 31, 3), dtype=np.uint8)
    write_png(tmp_path / "bands.png", picture, block_rows=7)
    monkeypatch.setattr(drawing, "STREAMED_PNG_PIXELS", 100)
    save_png(tmp_path / "deep" / "saved.png", picture)
    for path in (tmp_path / "bands.png", tmp_path / "deep" / "saved.png"):
        with Image.open(path) as image:
            assert image.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(image), picture)
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["saved.png"]  # atomic
    with pytest.raises(ValueError, match="H x W x 3 uint8"):
        write_png(tmp_path / "grey.png", picture[..., 0])


@pytest.mark.parametrize("block_rows", [1, 9, 15, 45, 256])
def test_a_png_compressed_band_by_band_is_one_valid_zlib_stream(tmp_path, block_rows):
    picture = np.random.default_rng(4).integers(0, 256, (45, 31, 3), dtype=np.uint8)
    picture[10:30] = 7  # compressible rows too
    write_png(tmp_path / "bands.png", picture, block_rows=block_rows)
    data, position, stream = (tmp_path / "bands.png").read_bytes(), 8, b""
    while position < len(data):  # the chunks: length, type, payload, CRC
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind, payload = (
            data[position + 4 : position + 8],
            data[position + 8 : position + 8 + length],
        )
        assert (
            zlib.crc32(kind + payload) == struct.unpack(">I", data[position + 8 + length :][:4])[0]
        )
        stream += payload if kind == b"IDAT" else b""
        position += 12 + length
    rows = np.frombuffer(zlib.decompress(stream), np.uint8).reshape(
        45, 31 * 3 + 1
    )  # checks Adler-32
    assert (rows[:, 0] == 2).all()
    unfiltered = np.cumsum(rows[:, 1:], axis=0, dtype=np.uint8)  # the Up filter undone
    np.testing.assert_array_equal(unfiltered.reshape(45, 31, 3), picture)


def test_shrinking_keeps_the_aspect_and_the_colours():
    rng = np.random.default_rng(3)
    picture = np.repeat(
        np.repeat(rng.integers(0, 256, (10, 15, 3), dtype=np.uint8), 100, 0), 100, 1
    )
    small = shrink_image(picture, 150)
    assert small.shape == (100, 150, 3)
    expected = resize_image(picture, (100, 150))
    assert np.abs(small.astype(int) - expected).mean() < 4
    assert shrink_image(small, 150) is small


def test_the_match_page_embeds_shrunk_pictures_and_keeps_original_positions(tmp_path):
    source = np.random.default_rng(4).integers(0, 256, (1500, 2200, 3), dtype=np.uint8)
    target = source[:1000, :1200].copy()
    flow_input = np.zeros((2, 16, 16), np.float32)
    path = tmp_path / "index.html"
    write_match_page(path, source, target, flow_input, (np.zeros((0, 2)),) * 2, source, target)
    text = path.read_text()
    sizes = []
    for encoded in re.findall(r'src="data:image/\w+;base64,([^"]+)"', text):
        with Image.open(io.BytesIO(base64.b64decode(encoded))) as image:
            sizes.append(image.size)
    assert sizes == [(EMBEDDED_SIZE, 655)] * 2 + [(EMBEDDED_SIZE, 800)] * 2
    assert '"sourceSize":[1500,2200]' in text and '"targetSize":[1000,1200]' in text


def test_a_jpeg_read_for_the_network_is_reduced_but_keeps_its_full_size(tmp_path):
    stored = resize_image(
        np.random.default_rng(5).integers(0, 256, (6, 8, 3), np.uint8), (600, 800)
    )
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    Image.fromarray(stored).save(tmp_path / "photo.jpg", quality=95, exif=exif)
    reduced, size = read_image(tmp_path / "photo.jpg", min_side=128)
    assert size == (800, 600)  # upright
    assert reduced.shape == (200, 150, 3)  # a quarter: an eighth would go below 128
    full, same = read_image(tmp_path / "photo.jpg")
    assert same == size and full.shape == (800, 600, 3)
    difference = resize_image(reduced, (64, 64)).astype(int) - resize_image(full, (64, 64))
    assert np.abs(difference).mean() < 2  # the network sees the same picture
    Image.fromarray(stored).save(tmp_path / "photo.png")
    assert read_image(tmp_path / "photo.png", min_side=128)[0].shape == (600, 800, 3)  # in full


def test_a_24_megapixel_phone_photo_gives_a_full_size_upright_flow(tmp_path):
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    stored = Image.new("RGB", (6000, 4000), (90, 120, 150))
    stored.paste((250, 30, 30), (0, 0, 3000, 2000))
    stored.save(tmp_path / "phone.jpg", quality=80, exif=exif)
    del stored
    matcher = GuidedSemanticFlow.untrained(input_size=64)
    result = matcher.match(tmp_path / "phone.jpg", np.zeros((40, 40, 3), np.uint8))
    assert result.flow_s2t.shape == (6000, 4000, 2) and result.flow_s2t.dtype == np.float32
    assert result.confidence.shape == (6000, 4000) and result.flow_t2s.shape == (40, 40, 2)
    assert np.isfinite(result.flow_s2t[::97, ::89]).all()
    assert images.DEFAULT_MAX_PIXELS > 6000 * 4000


def test_a_big_smooth_flow_is_coloured_within_a_few_levels_of_every_pixel():
    # Bilinear over a 4 x 4 grid, coloured at 25 samples a cell: what the default detail gives
    # a network's 20 x 20 cell flow (512 / 20)
    flow = smooth_flow(400, 600, 30.0).permute(1, 2, 0).numpy()
    exact = drawing.flow_to_color(flow).astype(int)
    fast = drawing.flow_picture(flow, detail=100)
    assert fast.shape == (400, 600, 3) and fast.dtype == np.uint8
    error = np.abs(fast - exact)
    assert error.max() <= 8 and np.percentile(error, 99.9) <= 4 and error.mean() < 0.25
    np.testing.assert_array_equal(drawing.flow_picture(flow, detail=600), exact)  # no bigger
    flow[10, 20] = np.nan  # unknown: coloured pixel by pixel, black there
    np.testing.assert_array_equal(drawing.flow_picture(flow, detail=150), flow_to_color(flow))


def test_maps_are_resized_as_bilinear_resizing_does():
    values = torch.rand(5, 7, 3)
    for channels in (1, 3):
        given = values[..., :channels].squeeze(-1) if channels == 1 else values
        expected = torch.nn.functional.interpolate(
            values[None, ..., :channels].permute(0, 3, 1, 2), (23, 11), mode="bilinear"
        )[0].permute(1, 2, 0)
        result = resample.resize_bilinear(given.numpy(), (23, 11))
        assert result.shape == (23, 11, 3)[: 2 if channels == 1 else 3]
        assert result.dtype == np.float32
        np.testing.assert_allclose(result, expected.squeeze(-1).numpy(), atol=1e-6)


def test_a_big_shrink_first_reduces_by_blocks_and_stays_within_a_few_levels_of_the_filter():
    from skimage import data

    photo = np.asarray(Image.fromarray(data.astronaut()).resize((2048, 1536), Image.BICUBIC))
    direct = np.asarray(Image.fromarray(photo).resize((320, 240), Image.Resampling.BILINEAR))
    shrunk = resize_image(photo, (240, 320))
    difference = np.abs(shrunk.astype(int) - direct.astype(int))
    assert 0 < difference.mean() < 0.5 and difference.max() <= 4  # reduced first, yet alike
    # Within the gap (a threefold shrink or less) it is the filter itself.
    medium = photo[:720, :960]
    expected = np.asarray(Image.fromarray(medium).resize((320, 240), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(resize_image(medium, (240, 320)), expected)
