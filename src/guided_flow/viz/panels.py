"""Panels that show what the model does on one pair of a batch: source, target, the source warped
onto the target, the flow colours, the confident matches and, when the batch has keypoints, the
transferred keypoints. Used for logger images at validation and PNG files at test time."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from guided_flow.io.images import denormalise
from guided_flow.model.flow_model import FlowOutput, GuidedFlowModel
from guided_flow.model.geometry import transfer_keypoints
from guided_flow.viz import drawing


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """A normalised ``3 x H x W`` image -> ``H x W x 3`` uint8."""
    pixels = denormalise(image.detach().float()).clamp(0, 1).mul(255).round()
    return pixels.to(torch.uint8).permute(1, 2, 0).cpu().numpy()


@torch.no_grad()
def pair_panel(
    model: GuidedFlowModel, batch: Mapping, out: FlowOutput, item: int = 0
) -> np.ndarray:
    """One titled strip for pair ``item`` of ``batch``, whose forward pass is ``out``.

    The warped source needs the flow on the target grid, so the model is run once more on
    (target, source) for this pair.
    """
    source_image = batch["source_image"][item : item + 1]
    target_image = batch["target_image"][item : item + 1]
    size = tuple(source_image.shape[-2:])
    flow_t2s = model(target_image, source_image).flow_pixels(size)[0]
    source, target = to_uint8(source_image[0]), to_uint8(target_image[0])
    images = [source, target, drawing.warp_image(source, flow_t2s)]
    titles = ["source", "target", "source warped to target"]
    images.append(drawing.flow_to_color(out.flow_pixels(size)[item]))
    titles.append("flow (source grid)")
    images.append(drawing.draw_matches(source, target, *out.confident_matches(item, size)))
    titles.append("confident matches (Q' > rho)")
    if "source_kps" in batch:
        valid = batch["kps_valid"][item]
        kps = batch["source_kps"][item : item + 1]
        moved = transfer_keypoints(out.flow_pixels(size)[item : item + 1], kps)[0][valid]
        images.append(drawing.draw_keypoints(target, moved))
        titles.append("keypoints transferred")
    return drawing.panel(images, titles)
