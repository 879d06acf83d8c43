"""Image files and ImageNet normalisation.

Arrays read from files are ``H x W x 3`` uint8 (RGB); network inputs are ``B x 3 x H x W`` float
tensors normalised with the ImageNet statistics below.

Reading a file (:func:`load_image`):

- **Orientation**: with ``upright=True`` (the default, for the user's own pictures) the EXIF
  orientation tag is applied, so the array is the picture an image viewer shows; benchmark
  loaders pass ``upright=False`` because their annotations are in the stored pixel frame.
- **Bit depth**: 16-bit greyscale (``I;16``, and ``I`` read as 16-bit) is scaled to 8 bits by
  ``round(v * 255 / 65535)``, not clipped; 16-bit RGB(A) is scaled by Pillow's decoder (its top
  byte); 32-bit float greyscale (``F``) is taken in [0, 1], like float arrays.
- **Transparency**: alpha is dropped (the colour stored under it is kept), for RGBA, LA and
  palette images with a transparent entry alike.
- **Multi-frame files** (animated GIF, WebP or PNG, multi-page TIFF): the first frame.
- **Size**: a picture of more than ``max_pixels`` pixels (default Pillow's decompression-bomb
  limit, :data:`DEFAULT_MAX_PIXELS`) is refused with a :class:`~guided_flow.errors.DataError`
  naming the option that lifts it.
"""

from __future__ import annotations

import os
import struct
import threading
import warnings
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image

from guided_flow.errors import DataError, one_line
from guided_flow.io.atomic import atomic_open

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

DEFAULT_MAX_PIXELS: int = 89_478_485
"""Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, about 89.5 megapixels): a
larger picture is read only when the caller raises ``max_pixels`` (``--max-pixels``)."""

STREAMED_PNG_PIXELS = 4_000_000
"""Pictures larger than this are written by :func:`write_png` in row blocks (Up filter, zlib
level 1) rather than through Pillow, which would copy the whole picture first."""

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
REDUCING_GAP = 3.0
"""Shrinking factor past which :func:`resize_image` first reduces by a whole factor (Pillow)."""
# EXIF orientation -> the transposition that makes the stored pixels upright (as
# PIL.ImageOps.exif_transpose); 5 to 8 swap the axes.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPPING = frozenset(_UPRIGHT[key] for key in (5, 6, 7, 8))
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error)
_PILLOW_LIMIT = threading.Lock()  # Pillow's limit is a module global: change it under a lock


def _statistics(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as ``3 x 1 x 1`` tensors on ``images``' device and dtype."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(3, 1, 1)
    return mean, std


def normalise(images: torch.Tensor) -> torch.Tensor:
    """Normalise RGB images in [0, 1] (``... x 3 x H x W`` float) with the ImageNet statistics."""
    mean, std = _statistics(images)
    return (images - mean) / std


def denormalise(images: torch.Tensor) -> torch.Tensor:
    """Undo :func:`normalise`: ``... x 3 x H x W`` normalised -> RGB in [0, 1] (not clamped)."""
    mean, std = _statistics(images)
    return images * std + mean


def scale_16bit(values: np.ndarray) -> np.ndarray:
    """16-bit samples (any shape, integers in 0..65535; beyond is clipped) -> uint8
    ``round(v * 255 / 65535)``, the same shape (no float intermediate)."""
    wide = values.astype(np.uint32) if values.dtype == np.uint16 else np.clip(values, 0, 65535)
    return ((wide.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _rgb_array(image: Image.Image) -> np.ndarray:
    """A loaded Pillow image of any mode -> ``H x W x 3`` uint8 (module docstring: bit depth,
    transparency)."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        values = np.asarray(image)
        if image.mode == "F":
            grey = np.rint(np.clip(np.nan_to_num(values), 0.0, 1.0) * 255.0).astype(np.uint8)
        else:
            grey = scale_16bit(values)
        return np.ascontiguousarray(np.broadcast_to(grey[..., None], (*grey.shape, 3)))
    if image.mode == "PA" or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")  # Pillow warns when a palette with alpha goes to RGB
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)


def orientation(image: Image.Image) -> int:
    """The EXIF orientation tag of ``image`` (1 to 8; 1 when absent or invalid)."""
    value = image.getexif().get(ExifTags.Base.Orientation, 1)
    return value if value in _UPRIGHT else 1


def upright_image(image: Image.Image) -> Image.Image:
    """``image`` turned by its EXIF orientation (itself when there is nothing to turn)."""
    method = _UPRIGHT.get(orientation(image))
    return image if method is None else image.transpose(method)


def pil_to_rgb(image: Image.Image, upright: bool = True) -> np.ndarray:
    """A Pillow image (its current frame) -> ``H x W x 3`` uint8 RGB, turned upright by its EXIF
    orientation when ``upright`` (module docstring for modes and transparency)."""
    return _rgb_array(upright_image(image) if upright else image)


@contextmanager
def _pillow_limit_lifted() -> Iterator[None]:
    """Open images without Pillow's own decompression-bomb check (this module checks
    ``max_pixels`` itself, which may be above Pillow's limit)."""
    with _PILLOW_LIMIT, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _check_pixels(path: Path, size: tuple[int, int], max_pixels: int | None) -> None:
    """Raise :class:`DataError` when a ``size = (W, H)`` picture is past ``max_pixels``."""
    width, height = size
    if max_pixels is not None and width * height > max_pixels:
        raise DataError(
            f"{path}: {width} x {height} = {width * height:,} pixels is past the limit of "
            f"{max_pixels:,} pixels (a guard against decompression bombs); raise it with "
            f"--max-pixels {width * height} (guided-flow match) or max_pixels={width * height} "
            "(Python API)"
        )


def read_image(
    path: str | os.PathLike[str],
    upright: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_side: int | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Read an image file (its first frame) as RGB, and its full size.

    ``min_side``: when given, a JPEG is decoded at a reduced scale (1/2, 1/4 or 1/8, Pillow's
    draft mode, no dearer than its header) that keeps both sides at least ``min_side`` pixels;
    other formats are decoded in full. Returns ``(rgb, (H, W))``: ``rgb`` ``h x w x 3`` uint8
    (``h x w`` = ``H x W`` unless reduced) and the full size of the picture, both upright when
    ``upright`` (module docstring). A missing, unreadable or truncated file, or one past
    ``max_pixels`` (None: no limit), raises :class:`~guided_flow.errors.DataError` naming it."""
    path = Path(path)
    try:
        with _pillow_limit_lifted():
            image = Image.open(path)
        with image:
            _check_pixels(path, image.size, max_pixels)
            width, height = image.size
            if min_side is not None and image.format == "JPEG":
                image.draft(None, (min_side, min_side))
            image.load()  # decode everything now, so a truncated file fails here
            turn = _UPRIGHT.get(orientation(image)) if upright else None
            rgb = _rgb_array(image if turn is None else image.transpose(turn))
    except _READ_ERRORS as error:
        raise DataError(f"{path}: cannot read the image ({one_line(error)})") from error
    return rgb, ((width, height) if turn in _SWAPPING else (height, width))


def load_image(
    path: str | os.PathLike[str],
    upright: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Read an image file as RGB: ``H x W x 3`` uint8, upright by its EXIF orientation unless
    ``upright=False`` (benchmark annotations use the stored frame). Greyscale, 16-bit, palette,
    RGBA/LA and CMYK images are converted (alpha is dropped); multi-frame files give their first
    frame. A missing, unreadable or truncated file, or one of more than ``max_pixels`` pixels
    (None: no limit), raises :class:`~guided_flow.errors.DataError` naming the file."""
    return read_image(path, upright=upright, max_pixels=max_pixels)[0]


def resize_image(
    array: np.ndarray, size: tuple[int, int], interpolation: str = "bilinear"
) -> np.ndarray:
    """Resize an ``H x W x 3`` or ``H x W`` uint8 array to ``size = (H', W')`` pixels (anisotropic
    when the aspect ratios differ). ``interpolation``: ``bilinear`` (antialiased when shrinking,
    for images), ``bicubic`` or ``nearest`` (for masks and label maps). A picture shrunk more
    than :data:`REDUCING_GAP` times is first averaged over whole blocks of pixels (Pillow's
    ``reducing_gap``), which Pillow documents as indistinguishable from the direct filter in
    most cases, for a fraction of the time. Returns uint8."""
    if interpolation not in _RESAMPLING:
        choices = sorted(_RESAMPLING)
        raise ValueError(f"interpolation must be one of {choices}, not {interpolation!r}")
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"expected an H x W (x 3) uint8 array, got {array.dtype} {array.shape}")
    height, width = size
    if array.shape[:2] == (height, width):
        return array.copy()
    resample = _RESAMPLING[interpolation]
    gap = None if interpolation == "nearest" else REDUCING_GAP
    resized = Image.fromarray(array).resize((width, height), resample=resample, reducing_gap=gap)
    return np.asarray(resized, dtype=np.uint8).copy()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _deflate_band(rows: np.ndarray, last: bool) -> bytes:
    """One band of a PNG's filtered rows as raw deflate blocks (zlib level 1) on which the next
    band's blocks follow: ended byte-aligned by a sync flush, or final for the ``last`` band."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, -15)
    return compressor.compress(rows.data) + compressor.flush(
        zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH
    )


def write_png(path: str | os.PathLike, rgb: np.ndarray, block_rows: int = 256) -> None:
    """Write ``rgb`` (``H x W x 3`` uint8) as an 8-bit RGB PNG at ``path``, atomically, a band of
    ``block_rows`` rows at a time (PNG's Up filter, zlib level 1): memory stays a few bands
    whatever the picture's size. Bands are compressed independently on all CPU cores and joined
    into one zlib stream (as pigz does: sync-flushed raw deflate, one Adler-32 over all)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"write_png needs an H x W x 3 uint8 array, got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    workers = os.cpu_count() or 1
    previous = np.zeros(width * 3, dtype=np.uint8)
    checksum = zlib.adler32(b"")
    pending: deque[Future[bytes]] = deque()
    with ThreadPoolExecutor(workers) as pool, atomic_open(path) as handle:
        handle.write(b"\x89PNG\r\n\x1a\n")
        handle.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        handle.write(_png_chunk(b"IDAT", b"\x78\x01"))  # zlib header: deflate, fastest level
        for top in range(0, height, block_rows):
            band = rgb[top : top + block_rows].reshape(-1, width * 3)
            rows = np.empty((len(band), width * 3 + 1), dtype=np.uint8)
            rows[:, 0] = 2  # filter type Up: each byte minus the byte above it, modulo 256
            np.subtract(band[:1], previous, out=rows[:1, 1:])
            np.subtract(band[1:], band[:-1], out=rows[1:, 1:])
            previous = band[-1].copy()
            checksum = zlib.adler32(rows.data, checksum)
            pending.append(pool.submit(_deflate_band, rows, top + block_rows >= height))
            while len(pending) > 2 * workers or (pending and pending[0].done()):
                handle.write(_png_chunk(b"IDAT", pending.popleft().result()))
        while pending:
            handle.write(_png_chunk(b"IDAT", pending.popleft().result()))
        handle.write(_png_chunk(b"IDAT", struct.pack(">I", checksum)))
        handle.write(_png_chunk(b"IEND", b""))
