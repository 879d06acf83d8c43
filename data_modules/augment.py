"""CPU-side augmentation of training pairs with albumentations.

Each image of a pair is a :class:`View`: the image (``H x W x 3`` uint8), an optional mask
(``H x W`` uint8) and optional keypoints (``K x 2`` float, (x, y) pixels, pixel centres at
integers). :class:`PairAugmenter` applies, in this order:

1. a horizontal flip of BOTH views (image, mask and keypoints together): the pair's own ``flip``
   flag (PF-PASCAL's ``flip`` column) exclusive-or a random flip drawn with ``hflip_p``; a point
   x becomes ``W - 1 - x`` (:func:`hflip_points`);
2. a source/target swap with probability ``swap_p``;
3. per view, independently: colour jitter (``jitter_p``; brightness, contrast and saturation
   factors in ``[1 - m, 1 + m]``, hue shift in ``[-hue, hue]`` of a full turn) then a Gaussian
   blur (``blur_p``; sigma in ``[0.1, blur_sigma]`` pixels). Masks and keypoints are unchanged by
   these.

Every random choice comes from the ``numpy.random.Generator`` given to the call (albumentations is
seeded from it), so an augmentation is a pure function of that generator's state. Requires
albumentations >= 2.0 (``Compose(seed=...)``, ``set_random_seed``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace

import numpy as np

from guided_flow.errors import ConfigError

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402  (the variable above must be set before the import)


@dataclass(frozen=True)
class AugmentConfig:
    """Options of :class:`PairAugmenter` (module docstring); all zero probabilities = no change.

    ``hflip_p``, ``swap_p``, ``jitter_p``, ``blur_p``: probabilities in [0, 1]; ``brightness``,
    ``contrast``, ``saturation``: maximum relative change in [0, 1]; ``hue``: maximum shift in
    [0, 0.5] turns; ``blur_sigma``: largest blur sigma in input pixels (>= 0.1)."""

    hflip_p: float = 0.5
    swap_p: float = 0.5
    jitter_p: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.05
    blur_p: float = 0.1
    blur_sigma: float = 1.0

    def __post_init__(self) -> None:
        limits = {"hue": 0.5, "blur_sigma": float("inf")}
        for field in fields(self):
            value = getattr(self, field.name)
            high = limits.get(field.name, 1.0)
            if not 0.0 <= value <= high:
                raise ConfigError(
                    f"--data.{field.name}={value} is invalid: it must lie in [0, {high}]"
                )
        if self.blur_p > 0 and self.blur_sigma < 0.1:
            raise ConfigError(f"--data.blur_sigma={self.blur_sigma} is invalid: it must be >= 0.1")


@dataclass(frozen=True)
class View:
    """One image of a pair: ``image`` ``H x W x 3`` uint8, ``mask`` ``H x W`` uint8 or None,
    ``keypoints`` ``K x 2`` float (x, y) pixels or None."""

    image: np.ndarray
    mask: np.ndarray | None = None
    keypoints: np.ndarray | None = None


@dataclass(frozen=True)
class Applied:
    """What :class:`PairAugmenter` did to a pair: ``flipped`` (both views mirrored), ``swapped``
    (source and target exchanged)."""

    flipped: bool
    swapped: bool


def hflip_points(points: np.ndarray, width: int | np.ndarray) -> np.ndarray:
    """Mirror (x, y) pixel positions (``... x 2``) in an image ``width`` pixels wide, pixel centres
    at integers: x -> ``width - 1 - x``. Returns a new float array."""
    flipped = np.array(points, dtype=np.float64, copy=True)
    flipped[..., 0] = np.asarray(width, dtype=np.float64) - 1.0 - flipped[..., 0]
    return flipped


_FLIP = A.Compose(
    [A.HorizontalFlip(p=1.0)],
    keypoint_params=A.KeypointParams(format="xy", remove_invisible=False),
)


def flip_view(view: View) -> View:
    """``view`` mirrored left-right: image, mask and keypoints together (albumentations)."""
    inputs: dict[str, np.ndarray] = {"image": view.image}
    if view.mask is not None:
        inputs["mask"] = view.mask
    if view.keypoints is not None:
        inputs["keypoints"] = np.asarray(view.keypoints, dtype=np.float64).reshape(-1, 2)
    out = _FLIP(**inputs)
    keypoints = None
    if view.keypoints is not None:
        keypoints = np.asarray(out["keypoints"], dtype=np.float64).reshape(-1, 2)
    return View(np.ascontiguousarray(out["image"]), out.get("mask"), keypoints)


class PairAugmenter:
    """Flip, swap and photometric changes of a training pair (module docstring)."""

    def __init__(self, config: AugmentConfig) -> None:
        self.config = config
        c = config
        self.photometric = A.Compose(
            [
                A.ColorJitter(
                    brightness=(max(0.0, 1.0 - c.brightness), 1.0 + c.brightness),
                    contrast=(max(0.0, 1.0 - c.contrast), 1.0 + c.contrast),
                    saturation=(max(0.0, 1.0 - c.saturation), 1.0 + c.saturation),
                    hue=(-c.hue, c.hue),
                    p=c.jitter_p,
                ),
                A.GaussianBlur(blur_limit=0, sigma_limit=(0.1, max(c.blur_sigma, 0.1)), p=c.blur_p),
            ],
            seed=0,
        )

    def _photometric(self, view: View, rng: np.random.Generator) -> View:
        if self.config.jitter_p == 0 and self.config.blur_p == 0:
            return view
        self.photometric.set_random_seed(int(rng.integers(2**31)))
        return replace(view, image=self.photometric(image=view.image)["image"])

    def __call__(
        self, source: View, target: View, flip: bool, rng: np.random.Generator
    ) -> tuple[View, View, Applied]:
        """Augment a pair; ``flip`` is the pair's own flip flag. Returns the new source and
        target views and what was applied."""
        flipped = bool(flip) ^ bool(rng.random() < self.config.hflip_p)
        if flipped:
            source, target = flip_view(source), flip_view(target)
        swapped = bool(rng.random() < self.config.swap_p)
        if swapped:
            source, target = target, source
        return (
            self._photometric(source, rng),
            self._photometric(target, rng),
            Applied(flipped, swapped),
        )
