"""Test-time ensembling of features over views of each picture (a proposed formulation).

A view is the picture mirrored left-right, resized by a scale, or both. The backbone reads each
view; its features are brought back to the picture's frame (mirrored back, resized to the
picture's grid by an antialiased bilinear filter, which keeps each cell centred), averaged with
those of the picture itself and L2-normalised again. The ensemble is weight-free: it changes what C
compares, not the networks.

``feature_views`` names the views: ``"none"`` (the picture alone), ``"flip"`` (and its mirror
image), ``"scale"`` (and the picture at :data:`VIEW_SCALE` times its size) or ``"flip_scale"``
(all four).

:func:`mirror_choice` is the other use of a mirror image (the flip-consistency choice of
training-free matching): match the source against the target and against its mirror image, and
keep whichever the features score higher, so that an object facing the other way is matched
part to part.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from guided_flow.model.backbone import FeatureExtractor
from guided_flow.model.volumes import correlation

FEATURE_VIEWS = ("none", "flip", "scale", "flip_scale")
# The second scale: finer than the picture's own, so the view adds detail the stride-16 grid
# misses (an upscaled picture puts 1.5 x 1.5 backbone cells on each cell of the grid).
VIEW_SCALE = 1.5


def view_features(backbone: FeatureExtractor, images: torch.Tensor, views: str) -> torch.Tensor:
    """Features of ``images`` (``B x 3 x H x W``, sides multiples of the stride s) averaged over
    ``views`` (:data:`FEATURE_VIEWS`): ``B x D x H/s x W/s``, unit L2 norm per cell."""
    features = backbone(images)
    if views == "none":
        return features
    grid = tuple(features.shape[-2:])
    total = features.clone()
    if views in ("flip", "flip_scale"):
        total += backbone(images.flip(-1)).flip(-1)
    if views in ("scale", "flip_scale"):
        stride = backbone.stride
        size = [round(side * VIEW_SCALE / stride) * stride for side in images.shape[-2:]]
        scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        total += _shrink(backbone(scaled), grid)
        if views == "flip_scale":
            total += _shrink(backbone(scaled.flip(-1)).flip(-1), grid)
    return F.normalize(total, p=2.0, dim=1, eps=1e-6)


def _shrink(features: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """Unit features of a finer grid brought to ``grid``, renormalised (a 1.5 x ratio: an
    adaptive average pool would shift cells by up to a sixth of a cell)."""
    resized = F.interpolate(features, size=grid, mode="bilinear", antialias=True)
    return F.normalize(resized, p=2.0, dim=1, eps=1e-6)


def mirror_choice(
    source_features: torch.Tensor, target_features: torch.Tensor, mirrored_features: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The flip-consistency choice (a proposed formulation): per pair, the target's features or
    those of its mirror image mirrored back (``mirrored_features``, so both lie on the target's
    own grid and every flow still points into the target), whichever gives the higher mean over
    source cells of the best correlation. All ``B x D x h x w``; returns the chosen features and
    ``B`` bools, True where the mirror image was chosen."""
    scores = [
        correlation(source_features, target).flatten(2).amax(dim=1).mean(dim=1)
        for target in (target_features, mirrored_features)
    ]
    mirrored = scores[1] > scores[0]
    return torch.where(mirrored[:, None, None, None], mirrored_features, target_features), mirrored
