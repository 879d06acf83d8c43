"""Odd picture files, each generated here: EXIF orientation, 16-bit greyscale and RGB (PNG and
TIFF), palettes with transparency, multi-frame files, and pictures past the pixel limit; read
for matching, through the Python API, the command line, the folders data module, and a benchmark
loader (which must keep the stored frame of its annotations)."""

from __future__ import annotations

import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import ExifTags, Image, ImageOps

from data_modules.folders import ImageFoldersDataModule
from data_modules.pf_willow import PFWillowDataModule
from guided_flow.api import GuidedSemanticFlow, as_rgb
from guided_flow.cli import match as match_command
from guided_flow.errors import DataError
from guided_flow.io.images import load_image, read_image
from tests.test_pf_willow import image as willow_image
from tests.test_pf_willow import willow_row, write_willow

STORED = (30, 48)  # (H, W) of the stored pixels of the rotated pictures


def picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An ``height x width x 3`` uint8 picture with no symmetry: noise over a colour ramp."""
    rng = np.random.default_rng(seed)
    ramp = (
        np.linspace(0, 200, width, dtype=np.float64)[None, :, None]
        + np.linspace(0, 50, height)[:, None, None]
    )
    return np.clip(ramp + rng.integers(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)


def save_oriented(path: Path, stored: np.ndarray, orientation: int, **options) -> Path:
    """``stored`` saved as it is, with an EXIF orientation tag."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    Image.fromarray(stored).save(path, exif=exif, **options)
    return path


def png_rgb16(path: Path, values: np.ndarray) -> Path:
    """``values`` (``H x W x 3`` uint16) as a 16-bit RGB PNG (written by hand: Pillow cannot)."""
    height, width = values.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    data = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + data)
    return path


@pytest.fixture(scope="module")
def matcher() -> GuidedSemanticFlow:
    return GuidedSemanticFlow.untrained(input_size=64, flow_base="guidance")


# --- orientation --------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_reads_as_an_image_viewer_shows_it(tmp_path, orientation):
    stored = picture(*STORED)
    path = save_oriented(tmp_path / "photo.png", stored, orientation)
    with Image.open(path) as image:
        shown = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    rgb, size = read_image(path)
    np.testing.assert_array_equal(rgb, shown)
    assert size == shown.shape[:2]
    assert (shown.shape[:2] != STORED) == (orientation >= 5)  # 5 to 8 swap the axes
    np.testing.assert_array_equal(load_image(path, upright=False), stored)


def test_a_phone_jpeg_with_orientation_6_is_turned_clockwise(tmp_path):
    stored = np.zeros((*STORED, 3), dtype=np.uint8)
    stored[:16, :16] = (250, 40, 40)  # a red corner at the stored top left
    path = save_oriented(tmp_path / "phone.jpg", stored, 6, quality=100, subsampling=0)
    upright = load_image(path)
    assert upright.shape == (STORED[1], STORED[0], 3)
    # Tag 6: the stored picture is shown turned 90 degrees clockwise (JPEG: within its loss).
    assert np.abs(upright.astype(int) - np.rot90(stored, k=-1)).mean() < 2
    assert upright[:16, -16:, 0].mean() > 200 and upright[:16, :8, 0].mean() < 20  # top right


def test_matching_an_oriented_file_gives_flows_in_the_upright_frame(tmp_path, matcher):
    upright = picture(STORED[1], STORED[0], seed=1)  # 48 x 30, stored turned to 30 x 48
    path = save_oriented(tmp_path / "turned.png", np.rot90(upright, k=1).copy(), 6)
    target = picture(40, 40, seed=2)
    result = matcher.match(path, target, source_kps=[[5.0, 40.0]])
    reference = matcher.match(upright, target, source_kps=[[5.0, 40.0]])
    assert result.flow_s2t.shape == (48, 30, 2) and result.confidence.shape == (48, 30)
    np.testing.assert_allclose(result.flow_s2t, reference.flow_s2t, atol=1e-4)
    np.testing.assert_allclose(result.flow_t2s, reference.flow_t2s, atol=1e-4)
    np.testing.assert_allclose(result.keypoints, reference.keypoints, atol=1e-4)
    # A PIL image carrying the tag is turned as well; a plain array is taken as it is.
    with Image.open(path) as image:
        np.testing.assert_array_equal(as_rgb(image), upright)
    assert as_rgb(np.rot90(upright, k=1)).shape == (30, 48, 3)


def test_the_match_command_writes_upright_results(tmp_path):
    source = save_oriented(tmp_path / "source.jpg", picture(*STORED), 6, quality=95)
    target = tmp_path / "target.png"
    Image.fromarray(picture(36, 20, seed=3)).save(target)
    out = tmp_path / "out"
    match_command.main([str(source), str(target), "--out", str(out), "--input-size", "64"])
    assert np.load(out / "flow_s2t.npy").shape == (STORED[1], STORED[0], 2)
    with Image.open(out / "flow.png") as flow, Image.open(out / "warped.png") as warped:
        assert flow.size == STORED and warped.size == (20, 36)  # (W, H): source turned upright


def test_folders_module_reads_images_and_masks_upright(tmp_path):
    root, masks = tmp_path / "root", tmp_path / "masks"
    upright = picture(STORED[1], STORED[0])  # 48 x 30
    (root / "cat").mkdir(parents=True)
    save_oriented(root / "cat" / "turned.jpg", np.rot90(upright, k=1).copy(), 6, quality=100)
    Image.fromarray(picture(48, 30, seed=4)).save(root / "cat" / "plain.png")
    mask = np.zeros((48, 30), dtype=np.uint8)
    mask[:24] = 255  # the top half of the picture as seen
    (masks / "cat").mkdir(parents=True)
    Image.fromarray(mask).save(masks / "cat" / "turned.png")
    options = {"image_size": 32, "batch_size": 1, "hflip_p": 0.0, "swap_p": 0.0}
    module = ImageFoldersDataModule(
        str(root), mask_dir=str(masks), cache_dir=str(tmp_path / "cache"), **options
    )
    module.prepare_data()
    module.setup("fit")
    item = next(
        module.dataset[i]
        for i in range(len(module.dataset))
        if module.dataset[i]["meta"]["source_name"] == "cat/turned.jpg"
    )
    assert item["meta"]["source_size"].tolist() == [48, 30]
    assert item["source_mask"][0, :16].eq(1).all() and item["source_mask"][0, 16:].eq(0).all()
    # The cached picture is the upright one: its top left corner is darker than its bottom right.
    source = item["source_image"]
    assert source[:, :8, :8].mean() < source[:, -8:, -8:].mean()


def test_a_benchmark_loader_keeps_the_stored_frame_of_its_annotations(tmp_path):
    """PF-WILLOW (as PF-PASCAL, Caltech-101 and SPair-71k, through the pair-list base) annotates
    keypoints on the stored pixels: a file carrying an orientation tag must not be turned."""
    root = tmp_path / "willow"
    source, target = willow_image("car(G)", 1), willow_image("car(G)", 2)
    # x = 190 lies inside the stored 200 x 150 picture, outside the 150 x 200 turned one.
    row = willow_row(source, target, [(190, 20), (10, 140)], [(15, 25), (100, 100)])
    write_willow(root, [row], name="image_pairs/test_pairs.csv")
    stored = np.zeros((150, 200, 3), dtype=np.uint8)
    stored[:50, :50] = 255  # a white top-left corner in the stored frame
    save_oriented(root / source, stored, 6)
    module = PFWillowDataModule(str(root), image_size=64, batch_size=1)
    module.prepare_data()
    module.setup("test")
    batch = next(iter(module.test_dataloader()))
    assert batch["meta"]["source_size"].tolist() == [[150, 200]]
    assert batch["meta"]["source_kps"][0, 0].tolist() == [190, 20]
    image = batch["source_image"][0]
    assert image[:, :16, :16].mean() > image[:, -16:, :16].mean()  # still top left


# --- bit depth ----------------------------------------------------------------------------------


def ramp16(height: int = 20, width: int = 64) -> np.ndarray:
    """``height x width`` uint16 over the whole 16-bit range, ends included."""
    row = np.linspace(0, 65535, width).round().astype(np.uint16)
    return np.repeat(row[None], height, axis=0)


def test_16_bit_greyscale_png_and_tiff_are_scaled_not_clipped(tmp_path, matcher):
    values = ramp16()
    expected = np.repeat(np.rint(values / 257.0).astype(np.uint8)[..., None], 3, axis=2)
    for suffix in ("png", "tif"):
        path = tmp_path / f"grey16.{suffix}"
        Image.fromarray(values).save(path)
        with Image.open(path) as image:
            assert image.mode.startswith("I;16")
        rgb = load_image(path)
        np.testing.assert_array_equal(rgb, expected)
        assert rgb.min() == 0 and rgb.max() == 255 and 100 < rgb.mean() < 155  # not near white
    # The match sees the 16-bit picture as its 8-bit version.
    target = picture(40, 40)
    np.testing.assert_array_equal(
        matcher.match(tmp_path / "grey16.png", target).flow_s2t,
        matcher.match(expected, target).flow_s2t,
    )
    np.testing.assert_array_equal(as_rgb(values), expected)  # uint16 arrays too


def test_16_bit_rgb_png_and_tiff_keep_their_colours(tmp_path):
    values = np.stack([ramp16(), ramp16()[:, ::-1], np.full((20, 64), 30000, np.uint16)], -1)
    expected = values / 257.0
    for path in (
        png_rgb16(tmp_path / "rgb16.png", values),
        tmp_path / "rgb16.tif",
    ):
        if path.suffix == ".tif":
            tifffile.imwrite(path, values, photometric="rgb")
        rgb = load_image(path)
        assert rgb.shape == (20, 64, 3)
        assert np.abs(rgb - expected).max() <= 1.0  # 8 bits of 16, within one level


# --- transparency and frames --------------------------------------------------------------------


def test_palette_images_with_transparency_read_without_warnings(tmp_path):
    indices = np.arange(6, dtype=np.uint8).repeat(4).reshape(4, 6)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9), (200, 100, 0), (0, 50, 60)]
    palette = Image.fromarray(indices, mode="P")
    palette.putpalette([c for colour in colours for c in colour])
    cases = {
        "alpha.png": {"transparency": bytes([0, 128, 255, 255, 0, 255])},
        "index.png": {"transparency": 3},
        "index.gif": {"transparency": 3},
    }
    expected = np.array(colours, dtype=np.uint8)[indices]
    for name, options in cases.items():
        palette.save(tmp_path / name, **options)
        with Image.open(tmp_path / name) as image:
            assert image.mode == "P" and "transparency" in image.info
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            rgb = load_image(tmp_path / name)
        np.testing.assert_array_equal(rgb, expected)  # alpha dropped, the colour kept


def test_multi_frame_files_give_their_first_frame(tmp_path):
    frames = [np.full((12, 16, 3), value, dtype=np.uint8) for value in ((255, 0, 0), (0, 0, 255))]
    first, *rest = [Image.fromarray(frame) for frame in frames]
    for name in ("animated.gif", "pages.tif", "animated.webp"):
        first.save(tmp_path / name, save_all=True, append_images=rest, lossless=True)
        with Image.open(tmp_path / name) as image:
            assert getattr(image, "n_frames", 1) == 2
        np.testing.assert_array_equal(load_image(tmp_path / name), frames[0])


# --- the pixel limit ----------------------------------------------------------------------------


def test_a_picture_past_the_pixel_limit_names_the_option_that_lifts_it(tmp_path, matcher):
    path = tmp_path / "big.png"
    Image.fromarray(picture(40, 60)).save(path)
    with pytest.raises(DataError) as error:
        load_image(path, max_pixels=2399)
    message = str(error.value)
    assert str(path) in message and "2,400 pixels" in message and "\n" not in message
    assert "--max-pixels 2400" in message and "max_pixels=2400" in message
    assert load_image(path, max_pixels=2400).shape == (40, 60, 3)
    with pytest.raises(DataError, match="--max-pixels"):
        matcher.match(path, path, max_pixels=1000)
    with pytest.raises(DataError, match="--max-pixels"):
        match_command.main(
            [str(path), str(path), "--out", str(tmp_path / "o"), "--max-pixels", "9"]
        )


def test_the_limit_can_be_lifted_past_pillows_own(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(picture(40, 60)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow alone refuses 2,400 pixels
    with pytest.raises(Image.DecompressionBombError), Image.open(path):
        pass
    assert load_image(path, max_pixels=None).shape == (40, 60, 3)
    assert load_image(path, max_pixels=5000).shape == (40, 60, 3)
    assert Image.MAX_IMAGE_PIXELS == 1000  # Pillow's own setting is left as it was
    parser = match_command.build_parser()
    assert parser.parse_args(["a", "b", "--out", "o", "--max-pixels", "0"]).max_pixels is None
    with pytest.raises(SystemExit):
        parser.parse_args(["a", "b", "--out", "o", "--max-pixels", "-5"])


@pytest.mark.slow
def test_the_command_prints_the_pixel_limit_on_one_line(tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(picture(40, 60)).save(path)
    script = Path(sys.executable).with_name("guided-flow")
    command = [str(script), "match", str(path), str(path), "--out", str(tmp_path / "o")]
    done = subprocess.run([*command, "--max-pixels", "100"], capture_output=True, text=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "--max-pixels 2400" in lines[0]
