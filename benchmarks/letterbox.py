"""Matching at each picture's own aspect ratio (a proposed formulation, measured by
``paired.py --option aspect=letterbox``; not a test).

Every loader squeezes a picture into the square input. The letterbox puts it back to its own
aspect ratio inside the same square: the squeezed input is resampled so that the picture's long
side spans the square and its short side shrinks by the ratio of the sides, centred, with the
ImageNet mean (zero once normalised) around it. A cell whose centre lies outside the picture
gets a feature of its own kind, one unit vector for the source's padding and another for the
target's, both orthogonal to every feature of a picture: its correlation with any cell of the
other image is 0, so it matches nothing and nothing matches it, and a target position blended
with it loses its cosine (a zero feature would keep the direction of its neighbour, and the
sub-cell refinement would drift into the padding). The flow found
between the two letterboxes is carried back to the squeezed grids: each source cell's centre is
mapped into its letterbox, the flow is read there bilinearly, and the target position is mapped
back into the squeezed target. So the variant is scored by the same evaluator, on the same
keypoints, as the squeezed baseline.

Positions are in grid_sample's normalised coordinates (``align_corners=False``, -1 and 1 the
outer edges), where the letterbox of a squeezed input is a scaling about the centre by
``(a_x, a_y)``, the picture's share of the square along each side.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from guided_flow.model.feature_views import view_features
from guided_flow.model.flow_model import GuidedFlowModel
from guided_flow.model.geometry import cell_positions


def picture_share(sizes: torch.Tensor) -> torch.Tensor:
    """``B x 2`` original sizes as (H, W) -> ``B x 2`` (a_x, a_y): the share of the square's
    width and height that the letterboxed picture covers (1 along its long side)."""
    heights, widths = sizes.double().unbind(-1)
    longest = torch.maximum(heights, widths)
    return torch.stack((widths / longest, heights / longest), dim=-1).float()


def letterbox(images: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """``B x 3 x S x S`` squeezed, normalised inputs -> their letterboxes, same shape: the
    input scaled about the centre by ``share`` (``B x 2``, :func:`picture_share`), zero outside."""
    theta = torch.zeros(len(images), 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0], theta[:, 1, 1] = 1.0 / share[:, 0], 1.0 / share[:, 1]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def cell_centres(grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Normalised (x, y) centres of a ``grid = (h, w)`` of cells (``align_corners=False``):
    ``h x w x 2``."""
    h, w = grid
    positions = cell_positions(h, w, device=device)  # (h*w) x 2, raster order
    return ((2 * positions + 1) / positions.new_tensor([w, h]) - 1).view(h, w, 2)


def inside_picture(share: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``B x 1 x h x w`` bool: the letterbox cells whose centre lies inside the picture."""
    centres = cell_centres(grid, share.device)[None]  # 1 x h x w x 2
    return (centres.abs() < share[:, None, None, :]).all(dim=-1)[:, None]


def with_padding_kind(features: torch.Tensor, inside: torch.Tensor, kind: int) -> torch.Tensor:
    """``B x D x h x w`` unit features -> ``B x (D + 2) x h x w``: the picture's cells
    (``inside``, ``B x 1 x h x w``) keep their features, the others become unit vector
    ``D + kind`` (``kind`` 0 for the source, 1 for the target)."""
    padding = torch.zeros_like(features[:, :2])
    padding[:, kind] = 1.0
    return torch.where(
        inside, torch.cat((features, torch.zeros_like(padding)), dim=1),
        torch.cat((torch.zeros_like(features), padding), dim=1),
    )  # fmt: skip


def squeezed_flow_of_letterboxes(
    flow: torch.Tensor, source_share: torch.Tensor, target_share: torch.Tensor
) -> torch.Tensor:
    """A flow in cells between two letterboxes (``B x 2 x h x w``) -> the flow in cells between
    the squeezed inputs: source cell centre u -> u a_s in its letterbox -> + the flow read
    there -> divided by a_t in the squeezed target."""
    h, w = flow.shape[-2:]
    centres = cell_centres((h, w), flow.device)[None]  # 1 x h x w x 2
    in_letterbox = centres * source_share[:, None, None, :]
    read = F.grid_sample(flow, in_letterbox, mode="bilinear", padding_mode="border",
                         align_corners=False)  # fmt: skip
    cells_to_unit = flow.new_tensor([2.0 / w, 2.0 / h])[None, :, None, None]
    target = in_letterbox.permute(0, 3, 1, 2) + read * cells_to_unit
    squeezed = target / target_share[:, :, None, None]
    return (squeezed - centres.permute(0, 3, 1, 2)) / cells_to_unit


def letterboxed_flow(model: GuidedFlowModel, batch: Mapping) -> torch.Tensor:
    """``model``'s flow (``B x 2 x h x w`` cells of the squeezed grid) of a batch of squeezed
    pairs with their ``meta`` sizes, matched between the pictures' letterboxes."""
    assert model.backbone is not None
    meta = batch["meta"]
    source_share = picture_share(meta["source_size"])
    target_share = picture_share(meta["target_size"])
    images = torch.cat(
        (
            letterbox(batch["source_image"], source_share),
            letterbox(batch["target_image"], target_share),
        )
    )
    features = view_features(model.backbone, images, model.feature_views)
    source, target = (
        with_padding_kind(part, inside_picture(share, model.grid), kind)
        for kind, (part, share) in enumerate(
            zip(features.chunk(2, dim=0), (source_share, target_share), strict=True)
        )
    )
    flow = model.forward_features(source, target).flow
    return squeezed_flow_of_letterboxes(flow, source_share, target_share)
