"""A fit's starting weights: a guided-flow checkpoint (stage 1 or 2) loaded into a stage."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, Protocol

import torch
from pytorch_lightning.utilities import rank_zero_warn

from guided_flow.errors import ConfigError
from guided_flow.model.flow_model import ModelConfig
from guided_flow.training.options import upgrade_stage_options

# A network whose parametrisation differs between a checkpoint and the run starts afresh.
NETWORK_OPTIONS = {
    "matching_net": (
        "matching_input",
        "local_radius",
        "local_base_flow",
        "local_source_features",
        "local_head",
    ),
    "pruning_net": ("pruning_mask", "pruning_init_logit"),
}


class StageWeights(Protocol):
    """What loading a checkpoint needs of a stage (a
    :class:`~guided_flow.training.stages.GuidedFlowStage`): its model options and its weights."""

    model_config: ModelConfig

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Any: ...


def load_stage_weights(module: StageWeights, path: str) -> None:
    """Initialise ``module``'s model from a guided-flow checkpoint (stage 1 or 2), checking that
    its grid matches. A network whose options (:data:`NETWORK_OPTIONS`) differ from the
    checkpoint's, e.g. a local matching input from a checkpoint of the paper's global one, keeps
    its fresh initialisation (with a warning); every other weight is loaded."""
    if not os.path.isfile(path):
        raise ConfigError(f"init_checkpoint={path!r}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint["state_dict"]
    except Exception as error:
        raise ConfigError(
            f"init_checkpoint={path!r} is not a readable Lightning checkpoint: {error}"
        ) from error
    saved = upgrade_stage_options(checkpoint.get("hyper_parameters", {})).get("model", {})
    size = module.model_config.input_size
    if saved.get("input_size", size) != size:
        raise ConfigError(
            f"init_checkpoint={path!r} was trained at input_size={saved['input_size']} but this "
            f"run uses input_size={size}: the grid must match"
        )
    defaults = asdict(ModelConfig())
    fresh = [
        name
        for name, options in NETWORK_OPTIONS.items()
        if any(saved.get(o, defaults[o]) != getattr(module.model_config, o) for o in options)
    ]
    if fresh:
        rank_zero_warn(
            f"init_checkpoint={path!r}: {' and '.join(fresh)} built with other options; "
            "starting from their initialisation"
        )
        prefixes = tuple(f"model.{name}." for name in fresh)
        state = {key: value for key, value in state.items() if not key.startswith(prefixes)}
        state.update({k: v for k, v in module.state_dict().items() if k.startswith(prefixes)})
    module.load_state_dict(state, strict=True)
