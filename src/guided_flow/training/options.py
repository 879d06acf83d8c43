"""The option groups of a training stage, and the upgrade of 0.1's flat options.

A stage takes three groups, each a dataclass that the command line reads as nested options:
``--model.model.*`` (:class:`~guided_flow.model.flow_model.ModelConfig`), ``--model.loss.*``
(:class:`LossConfig`) and ``--model.optim.*`` (:class:`OptimConfig`). guided-flow 0.1 took every
option flat (``--model.rho``, ``init_args: {rho: ...}``) and named its stages
``guided_flow.stages.*``: :func:`upgrade_stage_options` turns such options, from a checkpoint or a
config file, into the groups (:mod:`guided_flow.cli.legacy` rewrites command lines and config
files with it, for one release).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from guided_flow.errors import ConfigError
from guided_flow.model.flow_model import ModelConfig

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("none", "cosine", "step")
NONFINITE_POLICIES = ("stop", "skip")
GEO_WEIGHTINGS = ("confidence", "uniform")
MATCH_FEATURES = ("finest", "all")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is invalid: choose one of {allowed}")


def _check_non_negative(options: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(options, name)
        if value < 0:
            raise ConfigError(f"{name}={value} is invalid: it must be non-negative")


@dataclass(frozen=True)
class LossConfig:
    """The losses of METHOD.md section 10 (``--model.loss.*``).

    ``lambda_geo`` weighs L_geo in L_P; ``lambda_m``, ``lambda_sm`` weigh L_M and L_sm in stage 2;
    L_M's softmax runs over a ``window_m`` x ``window_m`` window at ``temperature``.
    ``geo_weighting``: ``"uniform"`` (METHOD.md's plain mean) or ``"confidence"`` (proposed:
    cells weighted by Q'). ``match_features``: the features L_M compares, ``"all"`` of them or
    the ``"finest"`` layer of a hypercolumn (proposed; docs/decisions.md). ``lambda_wc_self`` and
    ``lambda_wc_cross`` weigh stage 2's warp-consistency terms (proposed, beyond the paper; 0: the
    paper's losses alone), whose composed term ignores cells whose error exceeds
    ``wc_visibility`` cells (:mod:`~guided_flow.training.warp_consistency`). ``lambda_neg``
    weighs the negative-pair loss of both stages (proposed, beyond the paper; 0: off), which
    pushes Q' of pairs of different categories (or, on synthetic batches, of different
    photographs) below ``rho - neg_margin`` (:func:`~guided_flow.model.losses.negative_pair_loss`).
    """

    window_m: int = 5
    lambda_geo: float = 3.0
    geo_weighting: str = "uniform"
    lambda_m: float = 5.0
    lambda_sm: float = 0.1
    temperature: float = 1.0
    match_features: str = "finest"
    lambda_wc_self: float = 0.0
    lambda_wc_cross: float = 0.0
    wc_visibility: float = 2.0
    lambda_neg: float = 0.0
    neg_margin: float = 0.1

    def check(self) -> None:
        """Raise ConfigError naming the first option outside its range."""
        if self.window_m < 1 or self.window_m % 2 == 0:
            raise ConfigError(
                f"window_m={self.window_m} is invalid: it must be a positive odd integer"
            )
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature} is invalid: it must be positive")
        _check_choice("geo_weighting", self.geo_weighting, GEO_WEIGHTINGS)
        _check_choice("match_features", self.match_features, MATCH_FEATURES)
        _check_non_negative(self, ("lambda_geo", "lambda_m", "lambda_sm"))
        _check_non_negative(self, ("lambda_wc_self", "lambda_wc_cross", "lambda_neg"))
        if not 0.0 <= self.neg_margin < 1.0:
            raise ConfigError(f"neg_margin={self.neg_margin} is invalid: it must lie in [0, 1)")
        if not self.wc_visibility > 0:
            raise ConfigError(f"wc_visibility={self.wc_visibility} is invalid: it must be positive")

    @property
    def warp_consistency(self) -> bool:
        """Whether stage 2 computes the warp-consistency terms."""
        return self.lambda_wc_self > 0 or self.lambda_wc_cross > 0


@dataclass(frozen=True)
class OptimConfig:
    """The optimiser (``--model.optim.*``): SGD with ``momentum`` or AdamW, at ``lr`` times a
    multiplier per trained part (W_P, W_M, W_F); decoupled ``weight_decay`` on conv and linear
    weights only; ``scheduler`` over the run's steps: constant, cosine, or x0.1 every third."""

    optimizer: str = "sgd"
    lr: float = 1e-5
    pruning_lr_mult: float = 1.0
    matching_lr_mult: float = 1.0
    backbone_lr_mult: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: str = "none"

    def check(self) -> None:
        """Raise ConfigError naming the first option outside its range."""
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("scheduler", self.scheduler, SCHEDULERS)
        _check_non_negative(
            self, ("lr", "weight_decay", "pruning_lr_mult", "matching_lr_mult", "backbone_lr_mult")
        )


def check_nonfinite_policy(on_nonfinite: str) -> None:
    _check_choice("on_nonfinite", on_nonfinite, NONFINITE_POLICIES)


# Each option group, by its name in the stage's signature.
OPTION_GROUPS: dict[str, type] = {"model": ModelConfig, "loss": LossConfig, "optim": OptimConfig}
# 0.1's flat option names -> their group.
FLAT_OPTIONS = {f.name: group for group, kind in OPTION_GROUPS.items() for f in fields(kind)}
# 0.1's stage class paths -> 0.2's.
RENAMED_CLASS_PATHS = {
    "guided_flow.stages.PruningStage": "guided_flow.training.PruningStage",
    "guided_flow.stages.MatchingStage": "guided_flow.training.MatchingStage",
}


def upgrade_stage_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """A stage's options (init args or checkpoint hyper-parameters) with every flat 0.1 option
    moved into its group; options already grouped are kept, and win."""
    upgraded: dict[str, Any] = {}
    for name, value in options.items():
        if name in FLAT_OPTIONS:
            upgraded.setdefault(FLAT_OPTIONS[name], {}).setdefault(name, value)
        elif name in OPTION_GROUPS and isinstance(value, Mapping):
            upgraded.setdefault(name, {}).update(value)
        else:
            upgraded[name] = value
    return upgraded


def upgrade_class_path(class_path: str) -> str:
    """The 0.2 class path of a stage named by 0.1."""
    return RENAMED_CLASS_PATHS.get(class_path, class_path)


def upgrade_model_config(model: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """A config's ``model:`` section (``class_path`` and ``init_args``) in 0.2's names, and
    whether anything changed."""
    upgraded = dict(model)
    if "class_path" in upgraded:
        upgraded["class_path"] = upgrade_class_path(upgraded["class_path"])
    if isinstance(upgraded.get("init_args"), Mapping):
        upgraded["init_args"] = upgrade_stage_options(upgraded["init_args"])
    return upgraded, upgraded != dict(model)
