"""Pictures of flows and matches for loggers and files: colour-coded flow, warped images, matched
points side by side, keypoints, titled strips, and atomic PNG writing.

Images are ``H x W x 3`` uint8 arrays (``H x W`` uint8 or bool masks are accepted and shown in
grey). Flows are ``H x W x 2`` arrays or ``2 x H x W`` tensors in pixels (channel 0 = dx,
channel 1 = dy, y pointing down); points are ``N x 2`` (x, y) pixels with centres at integers.

Direction: :func:`warp_image` samples its image at ``q + flow(q)``, so the flow must live on the
grid of the picture being produced. To show the source warped onto the target, pass the source
image and ``flow_t2s`` (defined on the target grid, pointing into the source), which is what the
model returns when run on (target, source).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from guided_flow.io.atomic import atomic_open
from guided_flow.io.flow_files import UNKNOWN_FLOW, flow_to_numpy
from guided_flow.io.images import STREAMED_PNG_PIXELS, write_png
from guided_flow.io.resample import resize_bilinear
from guided_flow.model.geometry import warp_by_flow

_WHEEL_ANCHORS = np.array(
    [[255, 0, 0], [255, 255, 0], [0, 255, 0], [0, 255, 255], [0, 0, 255], [255, 0, 255]],
    dtype=np.float64,
)
_WHEEL_STEPS = (15, 6, 4, 11, 13, 6)  # red-yellow, yellow-green, ..., magenta-red
_TITLE_PAD = 2  # pixels around a panel title
_PANEL_GAP = 4  # white pixels between panel tiles
_COLOUR_BAND = 1 << 18  # pixels per band of rows in flow_to_color (float64 temporaries)
FLOW_PICTURE_DETAIL = 512
"""The longest side at which :func:`flow_picture` colours a bigger flow."""


def _colour_wheel() -> np.ndarray:
    """The Middlebury hue ring, ``55 x 3`` in 0..255: red, yellow, green, cyan, blue, magenta and
    back to red, each segment a linear ramp of one channel in ``_WHEEL_STEPS`` steps."""
    ends = np.roll(_WHEEL_ANCHORS, -1, axis=0)
    segments = [
        start + np.sign(end - start) * np.floor(255 * np.arange(steps) / steps)[:, None]
        for start, end, steps in zip(_WHEEL_ANCHORS, ends, _WHEEL_STEPS, strict=True)
    ]
    return np.concatenate(segments)


_WHEEL = _colour_wheel()
_WHEEL_CHANNELS = [np.ascontiguousarray(_WHEEL[:, channel]) for channel in range(3)]


def flow_to_color(flow: np.ndarray | torch.Tensor, max_norm: float | None = None) -> np.ndarray:
    """Colour-code a flow (``H x W x 2`` array or ``2 x H x W`` tensor, pixels) with the Middlebury
    wheel (Baker et al.): hue gives the direction, saturation the magnitude over ``max_norm``
    (pixels; default the largest known magnitude). Zero flow is white, +x red, +y (down) yellow,
    -x cyan, -y blue-violet; flows longer than ``max_norm`` keep full saturation and are darkened
    to 75 %; unknown flows (non-finite or beyond :data:`~guided_flow.io.flow_files.UNKNOWN_FLOW`)
    are black. The direction is spread over all 55 wheel entries, so the ring closes without a
    seam. Computed a band of rows at a time (float64 within a band). Returns ``H x W x 3``
    uint8."""
    array = flow_to_numpy(flow)
    height, width = array.shape[:2]
    rows = max(1, _COLOUR_BAND // max(width, 1))
    bands = [array[top : top + rows] for top in range(0, height, rows)]
    if max_norm is None:
        max_norm = max((float(_known_uv(band)[3].max(initial=0.0)) for band in bands), default=0.0)
    elif max_norm <= 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    colours = np.empty((height, width, 3), dtype=np.uint8)
    for top, band in zip(range(0, height, rows), bands, strict=True):
        colours[top : top + rows] = _colour_band(band, max_norm)
    return colours


def flow_picture(flow: np.ndarray, detail: int = FLOW_PICTURE_DETAIL) -> np.ndarray:
    """:func:`flow_to_color` of a flow that is smooth at ``detail`` pixels along its longest
    side, as a network's flow resized to a big picture is: such a flow is sampled bilinearly at
    that size, coloured, and the colours are resized back bilinearly: within a few levels of
    colouring every pixel (most within one), for a fraction of the time. Flows no bigger, and
    flows with unknown values, are coloured pixel by pixel. ``H x W x 2`` -> ``H x W x 3``
    uint8."""
    height, width = flow.shape[:2]
    if max(height, width) <= detail or not np.isfinite(flow.sum()):  # sum: one fast pass
        return flow_to_color(flow)
    scale = detail / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    reduced = resize_bilinear(np.asarray(flow, dtype=np.float32), size)
    return resize_bilinear(flow_to_color(reduced), (height, width))


def _known_uv(flow: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``h x w x 2`` flow -> (known, u, v, magnitude), ``h x w`` each, float64 with unknown
    flows set to zero."""
    u, v = flow[..., 0].astype(np.float64), flow[..., 1].astype(np.float64)
    known = (np.abs(u) <= UNKNOWN_FLOW) & (np.abs(v) <= UNKNOWN_FLOW)  # False for NaN and inf
    u[~known] = 0.0
    v[~known] = 0.0
    return known, u, v, np.hypot(u, v)


def _colour_band(flow: np.ndarray, max_norm: float) -> np.ndarray:
    """The wheel colours of a band of a flow (``h x w x 2``) at ``max_norm``: ``h x w x 3``,
    one channel at a time."""
    known, u, v, magnitude = _known_uv(flow)
    radius = magnitude / max(max_norm, np.finfo(np.float64).eps)
    inside = radius <= 1.0
    position = (np.arctan2(-v, -u) / np.pi + 1.0) / 2.0 * len(_WHEEL)  # in [0, 55]
    lower = np.floor(position)
    frac = position - lower
    rest = 1.0 - frac
    k0 = lower.astype(np.int64) % len(_WHEEL)
    k1 = (k0 + 1) % len(_WHEEL)
    colours = np.empty((*flow.shape[:2], 3), dtype=np.uint8)
    for channel, wheel in enumerate(_WHEEL_CHANNELS):
        hue = (rest * wheel.take(k0) + frac * wheel.take(k1)) / 255.0
        colour = np.where(inside, 1.0 - radius * (1.0 - hue), 0.75 * hue)
        colour[~known] = 0.0
        colours[..., channel] = np.rint(255.0 * colour)
    return colours


def warp_image(image: np.ndarray, flow: np.ndarray | torch.Tensor) -> np.ndarray:
    """Backward-warp ``image`` (``H x W x 3`` uint8) by ``flow`` (``H x W x 2`` array or
    ``2 x H x W`` tensor, pixels, same ``H x W``): the result at pixel q is ``image`` bilinearly
    sampled at ``q + flow(q)``. The flow lives on the output's grid and points into ``image``:
    the source warped onto the target needs ``flow_t2s``. Samples outside ``image`` and unknown
    (non-finite) flows give black. Returns ``H x W x 3`` uint8."""
    rgb = _as_rgb(image)
    offsets = flow_to_numpy(flow)
    if offsets.shape[:2] != rgb.shape[:2]:
        raise ValueError(
            f"flow is {offsets.shape[0]} x {offsets.shape[1]} but the image is "
            f"{rgb.shape[0]} x {rgb.shape[1]}: warp_image needs both on one grid"
        )
    known = np.isfinite(offsets).all(axis=-1)
    pixels = torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)[None]
    flow_tensor = torch.from_numpy(np.where(known[..., None], offsets, 0.0).astype(np.float32))
    warped = warp_by_flow(pixels, flow_tensor.permute(2, 0, 1)[None])[0]
    result = warped.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    result[~known] = 0
    return result


def draw_keypoints(
    image: np.ndarray,
    pts: np.ndarray | torch.Tensor,
    colors: np.ndarray | None = None,
    radius: int = 3,
) -> np.ndarray:
    """Draw keypoints (``N x 2`` pixels) on a copy of ``image`` (``H x W x 3`` uint8) as filled
    discs of ``radius`` pixels with a white rim. ``colors`` is ``N x 3`` uint8; by default point
    k gets the k-th of N hues spread around the wheel, so the same keypoint list drawn on two
    images gets matching colours. Points outside the image (or non-finite) are skipped.
    Returns ``H x W x 3`` uint8."""
    rgb = _as_rgb(image)
    points = _as_points(pts)
    if colors is None:
        colors = _distinct_colors(len(points))
    colors = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
    if len(colors) != len(points):
        raise ValueError(f"{len(points)} keypoints but {len(colors)} colours")
    keep = _inside(points, *rgb.shape[:2])
    canvas = rgb.copy()
    _draw_dots(canvas, points[keep], colors[keep], radius)
    return canvas


def draw_matches(
    source: np.ndarray,
    target: np.ndarray,
    src_pts: np.ndarray | torch.Tensor,
    trg_pts: np.ndarray | torch.Tensor,
    max_lines: int = 200,
) -> np.ndarray:
    """Put ``source`` and ``target`` (uint8 ``H x W x 3``, sizes may differ) side by side, padded
    with black to the taller height, and join each match ``src_pts[i] -> trg_pts[i]`` (``N x 2``
    pixels in their own images) with a line in its own hue and a dot at each end. Matches with an
    end outside its image are skipped; of the rest at most ``max_lines``, evenly spaced in the
    given order, are drawn, in place on the canvas (OpenCV), so that a big pair is copied once.
    Returns ``max(Hs, Ht) x (Ws + Wt) x 3`` uint8."""
    if max_lines < 0:
        raise ValueError(f"max_lines must be non-negative, got {max_lines}")
    src, trg = _as_rgb(source), _as_rgb(target)
    src_points, trg_points = _as_points(src_pts), _as_points(trg_pts)
    if len(src_points) != len(trg_points):
        raise ValueError(f"{len(src_points)} source points but {len(trg_points)} target points")
    (hs, ws), (ht, wt) = src.shape[:2], trg.shape[:2]
    canvas = np.empty((max(hs, ht), ws + wt, 3), dtype=np.uint8)
    canvas[:hs, :ws], canvas[hs:, :ws] = src, 0
    canvas[:ht, ws:], canvas[ht:, ws:] = trg, 0

    keep = np.flatnonzero(_inside(src_points, hs, ws) & _inside(trg_points, ht, wt))
    if len(keep) > max_lines:
        keep = keep[np.rint(np.linspace(0, len(keep) - 1, max_lines)).astype(np.int64)]
    starts, ends = src_points[keep], trg_points[keep] + np.array([ws, 0.0])
    colors = _distinct_colors(len(keep))
    for start, end, color in zip(starts.astype(int), ends.astype(int), colors, strict=True):
        cv2.line(canvas, tuple(start.tolist()), tuple(end.tolist()), color.tolist(), 1)
    _draw_dots(canvas, starts, colors, radius=2)
    _draw_dots(canvas, ends, colors, radius=2)
    return canvas


def panel(images: list[np.ndarray], titles: list[str], height: int | None = None) -> np.ndarray:
    """A horizontal strip of ``images`` (uint8 ``H x W x 3``), each resized bilinearly to
    ``height`` pixels (default the tallest) keeping its aspect ratio, with its title in Pillow's
    default font on a white band above it (clipped to the image's width) and white gaps between
    tiles. Returns ``(band + height) x total_width x 3`` uint8."""
    if not images or len(images) != len(titles):
        raise ValueError(f"panel needs one title per image, got {len(images)} and {len(titles)}")
    rgbs = [_as_rgb(image) for image in images]
    height = max(rgb.shape[0] for rgb in rgbs) if height is None else height
    if height <= 0:
        raise ValueError(f"height must be positive, got {height}")
    font = ImageFont.load_default()
    band = int(font.getbbox("Ag")[3]) + 2 * _TITLE_PAD  # int pixels (typed float by Pillow)

    tiles = []
    for rgb, title in zip(rgbs, titles, strict=True):
        width = max(1, round(rgb.shape[1] * height / rgb.shape[0]))
        tile = Image.new("RGB", (width, band + height), "white")
        resized = Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR)
        tile.paste(resized, (0, band))
        ImageDraw.Draw(tile).text((_TITLE_PAD, _TITLE_PAD), title, fill="black", font=font)
        tiles.append(tile)

    total = sum(tile.width for tile in tiles) + _PANEL_GAP * (len(tiles) - 1)
    strip = Image.new("RGB", (total, band + height), "white")
    x = 0
    for tile in tiles:
        strip.paste(tile, (x, 0))
        x += tile.width + _PANEL_GAP
    return np.array(strip)


def save_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write ``image`` (uint8 ``H x W x 3``) as a PNG at ``path`` atomically, creating parent
    folders; pictures past :data:`~guided_flow.io.images.STREAMED_PNG_PIXELS` are written a band
    of rows at a time (:func:`~guided_flow.io.images.write_png`). Returns the path."""
    rgb = _as_rgb(image)
    if rgb.shape[0] * rgb.shape[1] > STREAMED_PNG_PIXELS:
        write_png(path, rgb)
        return Path(path)
    with atomic_open(path) as handle:
        Image.fromarray(rgb).save(handle, format="PNG")
    return Path(path)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """Validate an image and return it as ``H x W x 3`` uint8 (``H x W`` / ``H x W x 1`` grey
    repeated; bool masks become 0 / 255)."""
    array = np.asarray(image)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (or bool masks), got {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(f"images must be H x W, H x W x 1 or H x W x 3, got {array.shape}")
    return np.ascontiguousarray(np.broadcast_to(array, (*array.shape[:2], 3)))


def _as_points(pts: np.ndarray | torch.Tensor) -> np.ndarray:
    """Points as a float64 ``N x 2`` array of (x, y) pixels."""
    if isinstance(pts, torch.Tensor):
        pts = pts.detach().cpu().numpy()
    points = np.asarray(pts, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must be N x 2 (x, y), got {points.shape}")
    return points


def _inside(points: np.ndarray, h: int, w: int) -> np.ndarray:
    """``N`` bool: which points (``N x 2`` pixels) lie on an ``h x w`` image (NaN is outside)."""
    x, y = points[:, 0], points[:, 1]
    return (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)


def _distinct_colors(n: int) -> np.ndarray:
    """``n x 3`` uint8 fully saturated colours spread evenly around the flow wheel."""
    return _WHEEL[np.arange(n) * len(_WHEEL) // max(n, 1)].astype(np.uint8)


def _draw_dots(canvas: np.ndarray, points: np.ndarray, colors: np.ndarray, radius: int) -> None:
    """Draw filled discs with a white rim at ``points`` (``N x 2`` pixels, truncated to whole
    pixels) in ``colors`` (``N x 3`` uint8), in place on ``canvas`` (``H x W x 3`` uint8)."""
    for point, color in zip(np.trunc(points).astype(int), colors, strict=True):
        centre = tuple(point.tolist())
        cv2.circle(canvas, centre, radius, color.tolist(), thickness=-1)
        cv2.circle(canvas, centre, radius, (255, 255, 255), thickness=1)
