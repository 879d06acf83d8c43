"""Resampling pictures and flows of any size a band of rows at a time, so that memory stays the
result plus one band: flows upsampled from the network's grid to the original pictures, pictures
warped by a flow, and pictures shrunk for display.

Pictures are ``H x W x 3`` uint8; flows are ``2 x H x W`` tensors or ``H x W x 2`` arrays of
(dx, dy) pixels; pixel centres are at integers.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

BAND_PIXELS = 1 << 20
"""Pixels per band of rows (about a megapixel)."""
REMAP_MAX_SIDE = 32766
"""The longest source side OpenCV's ``remap`` reads (it indexes with 16-bit integers)."""


def band_rows(width: int) -> int:
    """Rows per band for pictures ``width`` pixels wide."""
    return max(1, BAND_PIXELS // max(width, 1))


def resize_bilinear(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``values`` (``h x w`` or ``h x w x C``) resized bilinearly to ``size = (H, W)``, sampling
    what resizing with ``align_corners=False`` samples (OpenCV's resize): ``H x W [x C]``, same
    dtype."""
    size_xy = (size[1], size[0])
    resized = cv2.resize(np.ascontiguousarray(values), size_xy, interpolation=cv2.INTER_LINEAR)
    return np.asarray(resized, dtype=values.dtype).reshape(*size, *values.shape[2:])


def _offset_terms(
    size: int, side: int, target_side: int
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Along one axis of :func:`upsample_flow`: the target's factor t, the linear term added on
    the input grid, and the original pixels where resizing clamps to the grid with the
    correction each needs (float64)."""
    scale, target_scale = side / size, side / target_side
    slope = 1 / target_scale - 1 / scale
    p = np.arange(size, dtype=np.float64)
    q = (p + 0.5) * scale - 0.5
    clamped = np.flatnonzero((q < 0) | (q > side - 1))
    offset = (p[clamped] + 0.5) * (scale / target_scale) - 0.5 - p[clamped]
    correction = offset - (np.clip(q[clamped], 0, side - 1) + 0.5) * slope
    return target_scale, (np.arange(side) + 0.5) * slope, clamped, correction


def upsample_flow(
    flow_s2t: torch.Tensor, source_size: tuple[int, int], target_size: tuple[int, int]
) -> torch.Tensor:
    """A flow on an input grid (``2 x H x W`` input pixels) -> the original source's flow into the
    original target (``H_s x W_s x 2`` pixels, same dtype and device), both originals of
    ``source_size`` / ``target_size`` = (H, W) having been resized to ``H x W`` with per-axis
    factors s (source) and t (target).

    Source pixel p reads the flow f at q = (p + 0.5) s - 0.5, clamped to the grid, which is what
    bilinear resizing with ``align_corners=False`` samples; the match (q + f + 0.5) / t - 0.5
    minus p is, per axis, f / t + (q + 0.5) (1 / t - 1 / s). Both terms are resized at once
    from the input grid (OpenCV's bilinear resize on the CPU, which samples the same points
    with float32 weights and keeps a linear term exact), and the few pixels where q is clamped
    to the grid get the rest of their offset: memory is the result alone, written once."""
    input_h, input_w = flow_s2t.shape[-2:]
    (height, width), (target_h, target_w) = source_size, target_size
    dtype = np.float64 if flow_s2t.dtype == torch.float64 else np.float32
    scale_x, term_x, clamped_x, correction_x = _offset_terms(width, input_w, target_w)
    scale_y, term_y, clamped_y, correction_y = _offset_terms(height, input_h, target_h)
    flow = flow_s2t.detach().to("cpu", torch.float64).permute(1, 2, 0).numpy()
    scaled = flow / np.array([scale_x, scale_y])
    scaled[..., 0] += term_x
    scaled[..., 1] += term_y[:, None]
    result = resize_bilinear(np.ascontiguousarray(scaled, dtype=dtype), (height, width))
    result[:, clamped_x, 0] += correction_x.astype(dtype)
    result[clamped_y, :, 1] += correction_y.astype(dtype)[:, None]
    return torch.from_numpy(result).to(flow_s2t.device, flow_s2t.dtype)


def _sample_rows(pixels: torch.Tensor, points: torch.Tensor, first: int, last: int) -> torch.Tensor:
    """``pixels`` (``H x W x 3`` uint8, ``W >= 2``) bilinearly sampled at ``points`` (``N x 2``
    (x, y)) with ``grid_sample`` on the float copy of rows ``first..last`` (``last > first``),
    zero outside: ``N x 3`` float32. Points must read no row of the picture outside them."""
    crop = pixels[first : last + 1].permute(2, 0, 1)[None].float()
    scale = points.new_tensor([2 / (pixels.shape[1] - 1), 2 / (last - first)])
    grid = (points - points.new_tensor([0.0, float(first)])) * scale - 1
    return F.grid_sample(crop, grid[None, None], align_corners=True)[0, :, 0].t()


def warp_picture(source: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """``source`` (``H_s x W_s x 3`` uint8) bilinearly sampled at ``q + flow(q)`` for every pixel
    q of the flow's grid (``flow``: ``H x W x 2`` pixels pointing into ``source``). Samples
    outside ``source`` are black (zero padding, as ``grid_sample``), and so are non-finite flows.
    Returns ``H x W x 3`` uint8.

    OpenCV's ``remap`` (5.0 and later: exact bilinear weights for float positions) samples a
    band of rows at a time. Sources with a side past its limit (:data:`REMAP_MAX_SIDE`) are
    sampled by :func:`warp_picture_exactly`."""
    if max(source.shape[:2]) > REMAP_MAX_SIDE:
        return warp_picture_exactly(source, flow)
    height, width = flow.shape[:2]
    source = np.ascontiguousarray(source)
    warped = np.empty((height, width, 3), dtype=np.uint8)
    rows = min(band_rows(width), height)
    grid = np.empty((rows, width, 2), dtype=np.float32)  # (x, y) of a band's pixels, y from 0
    grid[..., 0] = np.arange(width, dtype=np.float32)
    grid[..., 1] = np.arange(rows, dtype=np.float32)[:, None]
    buffer = np.empty_like(grid)
    for top in range(0, height, rows):
        count = min(rows, height - top)
        points = np.add(flow[top : top + count], grid[:count], out=buffer[:count])
        points[..., 1] += top
        if not np.isfinite(points.sum()):  # one fast pass in the common, finite case
            np.nan_to_num(points, copy=False, nan=-2.0, posinf=-2.0, neginf=-2.0)  # outside
        band = warped[top : top + count]
        cv2.remap(source, points, None, cv2.INTER_LINEAR, dst=band, borderValue=0)
    return warped


def warp_picture_exactly(source: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """:func:`warp_picture` by ``grid_sample``, for sources of any size.

    The result is made a chunk of rows at a time. When the chunk's samples read a few source
    rows (a smooth flow), those rows are converted to float and sampled by ``grid_sample`` at
    once; otherwise the samples are sorted by the band of source rows they read (bands overlap
    by one row) and each band is sampled in turn. Memory is the result plus a chunk and a band,
    whatever the flow."""
    height, width = flow.shape[:2]
    if min(source.shape[:2]) < 2:  # zero rows or columns past the edge change nothing
        padded = np.zeros((max(source.shape[0], 2), max(source.shape[1], 2), 3), np.uint8)
        padded[: source.shape[0], : source.shape[1]] = source
        source = padded
    source_h, source_w = source.shape[:2]
    pixels = torch.from_numpy(np.ascontiguousarray(source))
    step = max(1, band_rows(source_w) - 1)  # band b reads rows b * step .. b * step + step
    bands = -(-(source_h - 1) // step)
    warped = np.empty((height, width, 3), dtype=np.uint8)
    columns = torch.arange(width, dtype=torch.float32)
    chunk = band_rows(width)
    for top in range(0, height, chunk):
        offsets = torch.from_numpy(np.array(flow[top : top + chunk], np.float32))
        offsets[..., 0] += columns
        offsets[..., 1] += torch.arange(top, top + len(offsets), dtype=torch.float32)[:, None]
        points = offsets.view(-1, 2)  # (x, y) source positions of the chunk's pixels
        x, y = points[:, 0], points[:, 1]
        inside = (x > -1) & (x < source_w) & (y > -1) & (y < source_h)  # False for NaN
        rows = y.nan_to_num(0).floor().clamp(0, source_h - 2)  # the first row each one reads
        low = int(torch.where(inside, rows, source_h).min()) if inside.any() else source_h - 2
        high = int(torch.where(inside, rows, 0).max()) + 1
        samples = torch.zeros(len(points), 3)
        if high - low <= 4 * step:  # a few rows: all at once
            within = torch.where(inside[:, None], points, -2.0)  # -2: outside, black
            samples = _sample_rows(pixels, within, low, max(high, low + 1))
        else:
            band = torch.where(inside, rows // step, bands).to(torch.int16).numpy()
            order = torch.from_numpy(np.argsort(band, kind="stable"))  # a radix sort
            counts = np.bincount(band, minlength=bands + 1)[:bands]
            ends = np.cumsum(counts)
            ordered = points.index_select(0, order[: int(ends[-1])])
            found = torch.empty(len(ordered), 3)
            for index in np.flatnonzero(counts):
                begin, end, first = int(ends[index] - counts[index]), int(ends[index]), index * step
                last = min(int(first) + step, source_h - 1)
                found[begin:end] = _sample_rows(pixels, ordered[begin:end], int(first), last)
            samples.index_copy_(0, order[: len(ordered)], found)
        values = samples.round_().clamp_(0, 255).to(torch.uint8)
        warped[top : top + len(offsets)] = values.view(len(offsets), width, 3).numpy()
    return warped


def shrink_image(rgb: np.ndarray, longest: int) -> np.ndarray:
    """``rgb`` (``H x W x 3`` uint8) resized, keeping its aspect, so that its longest side is at
    most ``longest`` pixels (returned as it is when it already is). A big picture is first
    averaged over k x k blocks a band of rows at a time (keeping at least twice the final size),
    then resized bilinearly, so it is never copied whole. Returns ``h x w x 3`` uint8."""
    height, width = rgb.shape[:2]
    if max(height, width) <= longest:
        return rgb
    scale = longest / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    factor = max(1, int(1 / scale) // 2)
    if factor > 1:
        rows = max(1, band_rows(width) // factor) * factor
        reduced = Image.new("RGB", (-(-width // factor), -(-height // factor)))
        for top in range(0, height, rows):
            band = Image.fromarray(np.ascontiguousarray(rgb[top : top + rows]))
            reduced.paste(band.reduce(factor), (0, top // factor))
    else:
        reduced = Image.fromarray(rgb)
    return np.asarray(reduced.resize(size, Image.Resampling.BILINEAR), dtype=np.uint8).copy()
