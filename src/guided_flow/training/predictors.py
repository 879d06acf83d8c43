"""The predictors a test scores side by side: the method's stages from nothing to tau, and the
comparisons that show what learning adds (the untrained model, each network switched off)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from guided_flow.model.flow_model import FlowOutput, GuidedFlowModel
from guided_flow.model.geometry import flow_cells_to_pixels
from guided_flow.model.volumes import argmax_flow

# The predictors reported at test time: the method's stages from nothing to tau, and (with
# ``compare_untrained``) tau of the untrained model and of the model with one network switched
# off (ModelConfig.use_matching_net / use_pruning_net).
PREDICTORS = ("identity", "argmax", "guidance", "gsf")
UNTRAINED = "gsf_untrained"
ABLATIONS = {
    "gsf_no_matching": {"use_matching_net": False},
    "gsf_no_pruning": {"use_pruning_net": False},
}
COMPARED = (UNTRAINED, *ABLATIONS)


def predictor_flows(
    model: GuidedFlowModel,
    batch: Mapping,
    out: FlowOutput,
    untrained: GuidedFlowModel | None = None,
    compare: bool = False,
) -> dict[str, torch.Tensor]:
    """``B x 2 x H x W`` input-pixel flows of each predictor of :data:`PREDICTORS` for ``out``,
    ``model``'s pass over ``batch``; with ``compare`` also the :data:`ABLATIONS` (computed from
    ``out``'s features, no second backbone pass) and, given ``untrained``, :data:`UNTRAINED`."""
    size = tuple(batch["source_image"].shape[-2:])
    flow = out.flow_pixels(size)
    flows = {
        "identity": torch.zeros_like(flow),
        "argmax": flow_cells_to_pixels(argmax_flow(out.correlation), size),
        "guidance": out.guidance_pixels(size),
        "gsf": flow,
    }
    if untrained is not None:
        flows[UNTRAINED] = untrained(batch["source_image"], batch["target_image"]).flow_pixels(size)
    if compare:
        for name, switches in ABLATIONS.items():
            ablated = model.forward_features(out.source_features, out.target_features, **switches)
            flows[name] = ablated.flow_pixels(size)
    return flows
