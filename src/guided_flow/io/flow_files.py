"""Flow files: Middlebury ``.flo`` and ``.npy``, written atomically.

Flows in files are ``H x W x 2`` float32 in pixels (channel 0 = dx, channel 1 = dy); the direction
is the caller's to name (``flow_s2t`` or ``flow_t2s``, see :mod:`guided_flow.model.geometry`).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import torch

from guided_flow.errors import DataError
from guided_flow.io.atomic import atomic_open

FLO_MAGIC = 202021.25
"""First four bytes of a ``.flo`` file as a little-endian float32 (the ASCII text ``PIEH``)."""

UNKNOWN_FLOW = 1e9
"""The ``.flo`` convention: a component whose magnitude exceeds this marks an unknown flow."""

_FLO_HEADER = struct.Struct("<fii")  # magic, width, height


def flow_to_numpy(flow: np.ndarray | torch.Tensor) -> np.ndarray:
    """Bring a flow into the file layout: a tensor ``2 x H x W`` or an array ``H x W x 2`` becomes
    a float32 ``H x W x 2`` array (units unchanged)."""
    if isinstance(flow, torch.Tensor):
        if flow.ndim != 3 or flow.shape[0] != 2:
            raise ValueError(f"a flow tensor must be 2 x H x W, got {tuple(flow.shape)}")
        return flow.detach().to("cpu", torch.float32).permute(1, 2, 0).numpy()
    array = np.asarray(flow, dtype=np.float32)
    if array.ndim != 3 or array.shape[2] != 2:
        raise ValueError(f"a flow array must be H x W x 2, got {array.shape}")
    return array


def write_flo(path: str | os.PathLike, flow: np.ndarray | torch.Tensor) -> None:
    """Write a flow (``H x W x 2`` array or ``2 x H x W`` tensor, pixels) as a Middlebury ``.flo``
    file: float32 magic 202021.25, int32 width, int32 height, then the row-major float32 (dx, dy)
    pairs, all little-endian. The write is atomic."""
    array = flow_to_numpy(flow)
    h, w = array.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"cannot write an empty {h} x {w} flow to {path}")
    with atomic_open(path) as handle:
        handle.write(_FLO_HEADER.pack(FLO_MAGIC, w, h))
        handle.write(np.ascontiguousarray(array, dtype="<f4").data)  # no copy of a big flow


def read_flo(path: str | os.PathLike) -> np.ndarray:
    """Read a Middlebury ``.flo`` file into a float32 ``H x W x 2`` array (pixels). A missing,
    unreadable, foreign or truncated file raises :class:`~guided_flow.errors.DataError` naming
    ``path``."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read the .flo file ({err})") from err
    if len(data) < _FLO_HEADER.size:
        raise DataError(
            f"{path}: truncated .flo file ({len(data)} bytes, the header alone needs "
            f"{_FLO_HEADER.size})"
        )
    magic, w, h = _FLO_HEADER.unpack_from(data)
    if magic != FLO_MAGIC:
        raise DataError(f"{path}: not a .flo file (magic {magic!r}, expected {FLO_MAGIC})")
    if w <= 0 or h <= 0:
        raise DataError(f"{path}: invalid .flo size {w} x {h} (width x height)")
    expected = _FLO_HEADER.size + 8 * w * h
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "oversized"
        raise DataError(
            f"{path}: {kind} .flo file ({len(data)} bytes, expected {expected} for a "
            f"{w} x {h} flow)"
        )
    return (
        np.frombuffer(data, dtype="<f4", offset=_FLO_HEADER.size)
        .reshape(h, w, 2)
        .astype(np.float32)
    )


def write_flow_npy(path: str | os.PathLike, flow: np.ndarray | torch.Tensor) -> None:
    """Save a flow (``H x W x 2`` array or ``2 x H x W`` tensor, pixels) as a float32
    ``H x W x 2`` ``.npy`` file, atomically (``path`` is used as given, no suffix added)."""
    array = flow_to_numpy(flow)
    with atomic_open(path) as handle:
        np.save(handle, array, allow_pickle=False)
