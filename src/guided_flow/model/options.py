"""The model's options and their checks: allowed values, and a ConfigError naming the first
option outside them."""

from __future__ import annotations

from guided_flow.errors import ConfigError
from guided_flow.model.feature_views import FEATURE_VIEWS
from guided_flow.model.voting import VOTING

GUIDANCE_MODELS = ("translation", "affine")
# What the matching residual is added to: tau = G' + M(C') (section 8) or the proposed
# tau = S + M(C'), S the soft-argmax of C under the Gaussian of C' (volumes.guided_soft_argmax).
FLOW_BASES = ("guidance", "soft_argmax")
# What the matching network reads: C' over absolute target cells (the paper's, section 8) or the
# proposed local cost volume around the flow base (guided_flow.model.local_cost).
MATCHING_INPUTS = ("global", "local")
PRUNING_MASKS = ("sigmoid", "relative")
MATCHING_HEADS = ("conv", "encoder_decoder")


def check_hyper_parameters(
    rho: float,
    c_p: float,
    c_m: float,
    window_n: int,
    guidance_model: str,
    flow_base: str = "guidance",
    soft_argmax_beta: float = 50.0,
) -> None:
    """Raise ConfigError naming the option and its allowed values."""
    if not 0.0 < rho < 1.0:
        raise ConfigError(f"rho={rho} is invalid: it must lie in the open interval (0, 1)")
    for name, value in (("c_p", c_p), ("c_m", c_m)):
        if not value > 0:
            raise ConfigError(f"{name}={value} is invalid: it must be a positive variance")
    if window_n < 1 or window_n % 2 == 0:
        raise ConfigError(f"window_n={window_n} is invalid: it must be a positive odd integer")
    if guidance_model not in GUIDANCE_MODELS:
        raise ConfigError(
            f"guidance_model={guidance_model!r} is invalid: choose one of {GUIDANCE_MODELS}"
        )
    if flow_base not in FLOW_BASES:
        raise ConfigError(f"flow_base={flow_base!r} is invalid: choose one of {FLOW_BASES}")
    if not soft_argmax_beta > 0:
        raise ConfigError(
            f"soft_argmax_beta={soft_argmax_beta} is invalid: it must be a positive sharpness"
        )


def check_network_options(
    matching_input: str,
    local_radius: int,
    pruning_mask: str,
    local_head: str = "conv",
    feature_views: str = "none",
    voting: str = "none",
) -> None:
    """Raise ConfigError naming the network option outside its allowed values."""
    for name, value, allowed in (
        ("feature_views", feature_views, FEATURE_VIEWS),
        ("voting", voting, VOTING),
        ("local_head", local_head, MATCHING_HEADS),
    ):
        if value not in allowed:
            raise ConfigError(f"{name}={value!r} is invalid: choose one of {allowed}")
    if matching_input not in MATCHING_INPUTS:
        raise ConfigError(
            f"matching_input={matching_input!r} is invalid: choose one of {MATCHING_INPUTS}"
        )
    if local_radius < 1:
        raise ConfigError(f"local_radius={local_radius} is invalid: it must be at least 1")
    if pruning_mask not in PRUNING_MASKS:
        raise ConfigError(
            f"pruning_mask={pruning_mask!r} is invalid: choose one of {PRUNING_MASKS}"
        )
