"""The two training stages as LightningModules around one GuidedFlowModel.

Stage 1 (:class:`PruningStage`): L_P = L_sil + lambda L_geo over W_P, W_F frozen.
Stage 2 (:class:`MatchingStage`): L_P + lambda_M L_M + lambda_sm L_sm over W_P, W_M and the
``trainable_blocks`` of W_F, initialised from a stage-1 checkpoint.

Batches follow the project's one schema (DESIGN.md): synthetic batches carry a dense
``flow_s2t``; benchmark batches carry keypoints and a ``meta`` dict.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import asdict, replace
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities.types import OptimizerLRScheduler
from typing_extensions import Self

from guided_flow.errors import ConfigError, GuidedFlowError
from guided_flow.model import losses
from guided_flow.model.backbone import FeatureExtractor
from guided_flow.model.flow_model import PREDATED_OPTIONS, FlowOutput, GuidedFlowModel, ModelConfig
from guided_flow.model.volumes import EPS
from guided_flow.training.callbacks import validate_before_training
from guided_flow.training.evaluation_steps import EvaluationSteps
from guided_flow.training.initial_weights import load_stage_weights
from guided_flow.training.negative_pairs import negative_pair_term
from guided_flow.training.optim import build_optimizer
from guided_flow.training.options import (
    LossConfig,
    OptimConfig,
    check_nonfinite_policy,
    upgrade_class_path,
    upgrade_stage_options,
)
from guided_flow.training.warp_consistency import warp_consistency_terms

Group = TypeVar("Group", ModelConfig, LossConfig, OptimConfig)


class NonFiniteLossError(GuidedFlowError):
    """A loss term became NaN or infinite."""


def grid_mask(mask: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor | None:
    """An image mask ``B x 1 x H x W`` -> a foreground mask on the feature grid
    ``B x 1 x h x w`` bool (cells at least half covered)."""
    if mask is None:
        return None
    return F.adaptive_avg_pool2d(mask.float(), grid) >= 0.5


def as_group(kind: type[Group], options: object) -> Group:
    """An option group given as itself or as the dict a checkpoint saved."""
    if isinstance(options, kind):
        return options
    if isinstance(options, Mapping):
        return kind(**options)
    raise ConfigError(
        f"{kind.__name__} options must be a {kind.__name__} or a mapping of its fields, "
        f"not {type(options).__name__}"
    )


class GuidedFlowStage(EvaluationSteps):
    """Shared by both stages: the model, the losses, validation/test metrics, optimisers.

    Options come in three groups, read from the command line as ``--model.model.rho 0.9``,
    ``--model.loss.lambda_m 5`` and ``--model.optim.lr 1e-3`` and saved in every checkpoint as
    plain dicts: ``model`` (:class:`~guided_flow.model.flow_model.ModelConfig`; its
    ``trainable_blocks=None`` takes the stage's default, stage 1: 0, W_F frozen; stage 2: 1),
    ``loss`` (:class:`~guided_flow.training.options.LossConfig`) and ``optim``
    (:class:`~guided_flow.training.options.OptimConfig`: one parameter group per trained part;
    weight decay, decoupled in AdamW, reaches conv and linear weights only).

    ``init_checkpoint``: the checkpoint whose weights a fit starts from. ``on_nonfinite``:
    ``"stop"`` or ``"skip"`` a step whose loss is not finite. ``compare_untrained``: at test time
    also score tau of the untrained model (fresh networks and backbone: tau = G' of
    Q' = sigmoid(10) Q, or S with ``flow_base="soft_argmax"``) as ``gsf_untrained``, and tau
    with each network switched off as ``gsf_no_matching`` (tau = the flow base) and
    ``gsf_no_pruning`` (Q' = Q).
    Checkpoints of guided-flow 0.1 (flat options) load (:meth:`upgrade_checkpoint`).
    """

    stage: int
    default_trainable_blocks: int

    def __init__(
        self,
        model: ModelConfig = ModelConfig(),
        loss: LossConfig = LossConfig(),
        optim: OptimConfig = OptimConfig(),
        init_checkpoint: str | None = None,
        on_nonfinite: str = "stop",
        compare_untrained: bool = False,
    ) -> None:
        super().__init__()
        # load_from_checkpoint passes the groups as the dicts the checkpoint saved
        model, loss = as_group(ModelConfig, model), as_group(LossConfig, loss)
        optim = as_group(OptimConfig, optim)
        loss.check()
        optim.check()
        check_nonfinite_policy(on_nonfinite)
        if model.trainable_blocks is None:
            model = replace(model, trainable_blocks=self.default_trainable_blocks)
        self.model = GuidedFlowModel.from_config(model)
        # checkpoints record the layers used, not "the default", which may change
        model = replace(model, feature_layers=list(self.backbone.feature_layers))
        self.model_config, self.loss_config, self.optim_config = model, loss, optim
        self.save_hyperparameters(
            {
                "model": asdict(model),
                "loss": asdict(loss),
                "optim": asdict(optim),
                "init_checkpoint": init_checkpoint,
                "on_nonfinite": on_nonfinite,
                "compare_untrained": compare_untrained,
            }
        )
        self.skipped_steps = 0  # training steps skipped for a non-finite loss
        self._freeze_untrained()

    @classmethod
    def from_options(cls, **options: Any) -> Self:
        """The stage of options given by their own names (``rho=0.8``, ``lr=1e-3``), each put
        into its group, e.g. ``MatchingStage.from_options(input_size=160, lambda_m=2)``."""
        return cls(**upgrade_stage_options(options))

    @classmethod
    def upgrade_checkpoint(cls, checkpoint: dict) -> dict:
        """A checkpoint's hyper-parameters in this release's layout (in place; returns it):
        0.1's flat options move into their groups, its class paths are renamed, and model
        options it predates take the values that keep its flow (``PREDATED_OPTIONS``)."""
        hparams = checkpoint.get("hyper_parameters")
        if isinstance(hparams, dict):
            upgraded = upgrade_stage_options(hparams)
            if isinstance(upgraded.get("model"), Mapping):
                upgraded["model"] = {**PREDATED_OPTIONS, **upgraded["model"]}
            if "_class_path" in upgraded:
                upgraded["_class_path"] = upgrade_class_path(upgraded["_class_path"])
            checkpoint["hyper_parameters"] = upgraded
        return checkpoint

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | os.PathLike,
        map_location: str | torch.device | None = None,
        **kwargs: Any,
    ) -> Self:
        """Lightning's loader, for checkpoints of this release and of 0.1 alike (a 0.1
        checkpoint is upgraded in memory; a current one is read from its file as it is)."""
        # mmap: only the hyper-parameters are read here, not the weights
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True, mmap=True)
        saved = checkpoint.get("hyper_parameters")
        if cls.upgrade_checkpoint(checkpoint).get("hyper_parameters") == saved:
            return super().load_from_checkpoint(os.fspath(checkpoint_path), map_location, **kwargs)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        buffer.seek(0)
        return super().load_from_checkpoint(buffer, map_location, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Name the stage class in the saved hyper-parameters (as the CLI does), so that
        ``guided-flow test --ckpt_path`` and ``load_from_checkpoint`` rebuild the right stage
        whoever wrote the checkpoint, and keep the best validation values so far, so that a
        resumed fit reports the best of the whole run. A model with non-finite weights is never
        saved."""
        bad = [name for name, p in self.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteLossError(
                f"refusing to write a checkpoint at global step {self.global_step}: "
                f"non-finite weights in {bad[0]}" + (f" and {len(bad) - 1} more" if bad[1:] else "")
            )
        hparams = checkpoint.setdefault("hyper_parameters", {})
        hparams.setdefault("_class_path", f"{type(self).__module__}.{type(self).__qualname__}")
        hparams.setdefault("_instantiator", "pytorch_lightning.cli.instantiate_module")
        checkpoint["best_validation"] = dict(self.best_validation)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.best_validation = dict(checkpoint.get("best_validation", {}))

    def setup(self, stage: str) -> None:
        """Each fit, validate or test builds its evaluators afresh from the data module it
        attaches (protocol, alphas and categories are the benchmark's)."""
        self.keypoint_evaluator = None
        self.mask_evaluator = None
        self.predictor_evaluators = torch.nn.ModuleDict()
        if stage == "fit":
            self.best_validation = {}

    def initialise_from_checkpoint(self) -> None:
        """Load ``init_checkpoint`` once (the CLI calls this before any data work, so that a
        missing file or a grid mismatch stops the run at once)."""
        path = self.hparams["init_checkpoint"]
        if path and getattr(self, "_initialised_from", None) != path:
            load_stage_weights(self, path)
            self._initialised_from = path

    # --- what each stage trains ---------------------------------------------------------------
    def trained_modules(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    def _freeze_untrained(self) -> None:
        trained = {id(p) for m in self.trained_modules() for p in m.parameters()}
        trained |= {id(p) for p in self.backbone.trainable_parameters()}
        for parameter in self.parameters():
            parameter.requires_grad_(id(parameter) in trained)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.model.input_size

    @property
    def backbone(self) -> FeatureExtractor:
        """The model's backbone (W_F): a stage's model always has one."""
        backbone = self.model.backbone
        assert backbone is not None, "a stage's model is built with a backbone"
        return backbone

    # --- forward and losses -------------------------------------------------------------------
    def forward(self, source_image: torch.Tensor, target_image: torch.Tensor) -> FlowOutput:
        return self.model(source_image, target_image)

    def loss_terms(self, out: FlowOutput, batch: Mapping) -> dict[str, torch.Tensor]:
        """Every loss term of METHOD.md section 10 for one batch (unweighted)."""
        loss = self.loss_config
        grid_h, grid_w = self.model.grid
        source_mask = grid_mask(batch.get("source_mask"), (grid_h, grid_w))
        target_mask = grid_mask(batch.get("target_mask"), (grid_h, grid_w))
        selected = losses.initial_confident_set(
            out.confidence, self.model.rho, source_mask, target_mask
        )
        terms = {
            "sil": losses.silhouette_loss(out.confidence, out.refined_confidence, selected),
            "geo": losses.geometric_loss(
                out.source_features,
                out.target_features,
                out.guidance,
                selected,
                out.refined_confidence if loss.geo_weighting == "confidence" else None,
            ),
        }
        if loss.lambda_neg > 0:
            terms["neg"] = self.negative_pair_term(out, batch)
        if self.stage == 2:
            source_features, target_features = self.match_features(out)
            terms["match"] = losses.matching_loss(
                source_features,
                target_features,
                out.flow,
                loss.window_m,
                loss.temperature,
                source_mask,
            )
            stride = self.input_size[1] / self.model.grid[1]
            terms["smooth"] = losses.smoothness_loss(out.flow, source_mask, stride)
            if loss.warp_consistency:
                terms.update(
                    warp_consistency_terms(
                        self.model, batch["source_image"], out, self.global_step, loss.wc_visibility
                    )
                )
        return terms

    def negative_pair_term(self, out: FlowOutput, batch: Mapping) -> torch.Tensor:
        """L_neg over the batch's negative pairs, told apart by the data module's
        ``negative_labels`` (:func:`~guided_flow.training.negative_pairs.negative_pair_term`)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        labelling = getattr(datamodule, "negative_labels", None)
        if labelling is None:
            raise ConfigError(
                f"lambda_neg={self.loss_config.lambda_neg} needs negative pairs, but the data "
                f"module {type(datamodule).__name__} does not say which pictures differ "
                "(no negative_labels)"
            )
        return negative_pair_term(self.model, out, labelling(batch), self.loss_config.neg_margin)

    def match_features(self, out: FlowOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """The source and target features L_M compares (``B x D' x h x w``, unit vectors)."""
        if self.loss_config.match_features == "all":
            return out.source_features, out.target_features
        channels = self.backbone.layer_channels[0]
        source, target = (
            F.normalize(features[:, :channels], dim=1, eps=EPS)
            for features in (out.source_features, out.target_features)
        )
        return source, target

    def total_loss(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        loss = self.loss_config
        total = terms["sil"] + loss.lambda_geo * terms["geo"]
        if self.stage == 2:
            total = total + loss.lambda_m * terms["match"] + loss.lambda_sm * terms["smooth"]
        if "neg" in terms:
            total = total + loss.lambda_neg * terms["neg"]
        if "wc_self" in terms:
            total = total + loss.lambda_wc_self * terms["wc_self"]
            total = total + loss.lambda_wc_cross * terms["wc_cross"]
        return total

    def training_step(self, batch: Mapping, batch_idx: int) -> torch.Tensor | None:
        out = self.model(batch["source_image"], batch["target_image"], refine=self.stage == 2)
        terms = self.loss_terms(out, batch)
        total = self.total_loss(terms)
        if not torch.isfinite(total):
            bad = [name for name, value in terms.items() if not torch.isfinite(value)] or ["total"]
            message = (
                f"non-finite loss at global step {self.global_step} (batch {batch_idx}): "
                f"term(s) {', '.join(bad)}"
            )
            if self.hparams["on_nonfinite"] == "skip":
                self.skipped_steps += 1
                self.print(f"warning: {message}; step skipped")
                return None
            raise NonFiniteLossError(message)
        batch_size = batch["source_image"].shape[0]
        logged = {f"train/loss_{name}": value.detach() for name, value in terms.items()}
        logged["train/loss"] = total.detach()
        logged["train/density"] = out.confident_density.mean()
        logged["train/density_initial"] = out.initial_density.mean()
        self.log_dict(logged, prog_bar=False, batch_size=batch_size)
        self.log("loss", total.detach(), prog_bar=True, logger=False, batch_size=batch_size)
        return total

    def configure_optimizers(self) -> OptimizerLRScheduler:
        scheduled = self.optim_config.scheduler != "none"
        steps = int(self.trainer.estimated_stepping_batches) if scheduled else 0
        return build_optimizer(self.model, self.optim_config, steps)

    def on_train_start(self) -> None:
        """Validate before the first step, so that the untrained model is a checkpoint
        candidate (a fresh run only: a resumed run has validated before)."""
        if self.trainer.global_step == 0:
            validate_before_training(self.trainer)


class PruningStage(GuidedFlowStage):
    """Stage 1: L_P = L_sil + lambda_geo L_geo, training W_P only (W_F frozen)."""

    stage = 1
    default_trainable_blocks = 0

    def trained_modules(self) -> list[torch.nn.Module]:
        return [self.model.pruning_net]


class MatchingStage(GuidedFlowStage):
    """Stage 2: L_P + lambda_M L_M + lambda_sm L_sm, training W_P, W_M and the last
    ``trainable_blocks`` of W_F, starting from the stage-1 checkpoint ``init_checkpoint``."""

    stage = 2
    default_trainable_blocks = 1

    def trained_modules(self) -> list[torch.nn.Module]:
        return [self.model.pruning_net, self.model.matching_net]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            self.initialise_from_checkpoint()
