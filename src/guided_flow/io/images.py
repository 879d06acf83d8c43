"""Image files and ImageNet normalisation.

Arrays read from files are ``H x W x 3`` uint8 (RGB); network inputs are ``B x 3 x H x W`` float
tensors normalised with the ImageNet statistics below.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from guided_flow.errors import DataError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


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


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as RGB: ``H x W x 3`` uint8. Greyscale, palette and RGBA/LA images are
    converted (alpha is dropped). A missing, unreadable or truncated file raises
    :class:`~guided_flow.errors.DataError` naming the file."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()  # decode everything now, so a truncated file fails here
            rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: cannot read the image ({error})") from error
    return np.asarray(rgb, dtype=np.uint8).copy()


def resize_image(
    array: np.ndarray, size: tuple[int, int], interpolation: str = "bilinear"
) -> np.ndarray:
    """Resize an ``H x W x 3`` or ``H x W`` uint8 array to ``size = (H', W')`` pixels (anisotropic
    when the aspect ratios differ). ``interpolation``: ``bilinear`` (antialiased when shrinking,
    for images), ``bicubic`` or ``nearest`` (for masks and label maps). Returns uint8."""
    if interpolation not in _RESAMPLING:
        choices = sorted(_RESAMPLING)
        raise ValueError(f"interpolation must be one of {choices}, not {interpolation!r}")
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise ValueError(f"expected an H x W (x 3) uint8 array, got {array.dtype} {array.shape}")
    height, width = size
    if array.shape[:2] == (height, width):
        return array.copy()
    resized = Image.fromarray(array).resize((width, height), resample=_RESAMPLING[interpolation])
    return np.asarray(resized, dtype=np.uint8).copy()
