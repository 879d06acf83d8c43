"""The two training stages as LightningModules around one GuidedFlowModel model.

Stage 1 (:class:`PruningStage`): L_P = L_sil + lambda L_geo over W_P, W_F frozen.
Stage 2 (:class:`MatchingStage`): L_P + lambda_M L_M + lambda_sm L_sm over W_P, W_M and the
``trainable_blocks`` of W_F, initialised from a stage-1 checkpoint.

Batches follow the project's one schema (DESIGN.md): synthetic batches carry a dense
``flow_s2t``; benchmark batches carry keypoints and a ``meta`` dict.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

from guided_flow import losses
from guided_flow.backbone import FeatureExtractor
from guided_flow.errors import ConfigError, GuidedFlowError
from guided_flow.evaluation import KeypointEvaluator
from guided_flow.flow_io import atomic_open
from guided_flow.geometry import flow_cells_to_pixels
from guided_flow.mask_metrics import MaskTransferEvaluator, is_mask_transfer_batch
from guided_flow.matching import argmax_flow
from guided_flow.metrics import DEFAULT_ALPHAS, DenseFlowMetric
from guided_flow.model import FlowOutput, GuidedFlowModel, check_hyper_parameters
from guided_flow.visual import pair_panel
from guided_flow.viz import save_png

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "cosine", "step")
NONFINITE_POLICIES = ("stop", "skip")
GEO_WEIGHTINGS = ("confidence", "uniform")
# The dense predictors reported on synthetic pairs: the method's stages from nothing to tau.
DENSE_PREDICTORS = ("identity", "argmax", "guidance", "gsf")


class NonFiniteLossError(GuidedFlowError):
    """A loss term became NaN or infinite."""


@dataclass
class EvaluationOptions:
    """How benchmark keypoints are evaluated (see :mod:`guided_flow.evaluation`); ``None`` lets
    the data module choose its benchmark's protocol."""

    pck_bound: str | None = None
    eval_resolution: str = "original"
    kps_sampling: str = "bilinear"
    results_dir: str | None = None


def grid_mask(mask: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor | None:
    """An image mask ``B x 1 x H x W`` -> a foreground mask on the feature grid
    ``B x 1 x h x w`` bool (cells at least half covered)."""
    if mask is None:
        return None
    return F.adaptive_avg_pool2d(mask.float(), grid) >= 0.5


class GuidedFlowStage(pl.LightningModule):
    """Shared by both stages: the model, the losses, validation/test metrics, optimisers.

    Every argument is a plain value so that it reads from the command line
    (``--model.rho 0.9``) and is saved in every checkpoint. ``trainable_blocks=None`` takes the
    stage's default (stage 1: 0, W_F frozen; stage 2: 1).
    """

    stage: int
    default_trainable_blocks: int
    panels_per_validation = 4

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        weights: str = "imagenet",
        trainable_blocks: int | None = None,
        input_size: int = 320,
        rho: float = 0.9,
        c_p: float = 5.0,
        c_m: float = 5.0,
        window_n: int = 5,
        window_m: int = 5,
        guidance_model: str = "translation",
        lambda_geo: float = 3.0,
        geo_weighting: str = "confidence",
        lambda_m: float = 5.0,
        lambda_sm: float = 0.1,
        temperature: float = 1.0,
        optimizer: str = "sgd",
        lr: float = 1e-5,
        backbone_lr_mult: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        scheduler: str = "none",
        init_checkpoint: str | None = None,
        on_nonfinite: str = "stop",
    ) -> None:
        super().__init__()
        check_stage_options(**locals())
        if trainable_blocks is None:
            trainable_blocks = self.default_trainable_blocks
        self.save_hyperparameters()
        self.hparams.trainable_blocks = trainable_blocks
        extractor = FeatureExtractor(backbone, weights, trainable_blocks)
        if input_size % extractor.stride:
            raise ConfigError(
                f"input_size={input_size} is invalid: it must be a multiple of the backbone "
                f"stride {extractor.stride}"
            )
        grid = (input_size // extractor.stride,) * 2
        self.model = GuidedFlowModel(extractor, grid, rho, c_p, c_m, window_n, guidance_model)
        self.evaluation = EvaluationOptions()
        self.dense_metrics = torch.nn.ModuleDict(
            {name: DenseFlowMetric() for name in DENSE_PREDICTORS}
        )
        self.keypoint_evaluator: KeypointEvaluator | None = None
        self.mask_evaluator: MaskTransferEvaluator | None = None
        self.test_results: dict | None = None
        self.skipped_steps = 0  # training steps skipped for a non-finite loss
        self._freeze_untrained()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Name the stage class in the saved hyper-parameters (as the CLI does), so that
        ``guided-flow test --ckpt_path`` and ``load_from_checkpoint`` rebuild the right stage
        whoever wrote the checkpoint. A model with non-finite weights is never saved."""
        bad = [name for name, p in self.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteLossError(
                f"refusing to write a checkpoint at global step {self.global_step}: "
                f"non-finite weights in {bad[0]}" + (f" and {len(bad) - 1} more" if bad[1:] else "")
            )
        hparams = checkpoint.setdefault("hyper_parameters", {})
        hparams.setdefault("_class_path", f"{type(self).__module__}.{type(self).__qualname__}")
        hparams.setdefault("_instantiator", "pytorch_lightning.cli.instantiate_module")

    # --- what each stage trains ---------------------------------------------------------------
    def trained_modules(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    def _freeze_untrained(self) -> None:
        trained = {id(p) for m in self.trained_modules() for p in m.parameters()}
        trained |= {id(p) for p in self.model.backbone.trainable_parameters()}
        for parameter in self.parameters():
            parameter.requires_grad_(id(parameter) in trained)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.model.input_size

    # --- forward and losses -------------------------------------------------------------------
    def forward(self, source_image: torch.Tensor, target_image: torch.Tensor) -> FlowOutput:
        return self.model(source_image, target_image)

    def loss_terms(self, out: FlowOutput, batch: Mapping) -> dict[str, torch.Tensor]:
        """Every loss term of METHOD.md section 10 for one batch (unweighted)."""
        hp = self.hparams
        source_mask = grid_mask(batch.get("source_mask"), self.model.grid)
        target_mask = grid_mask(batch.get("target_mask"), self.model.grid)
        selected = losses.initial_confident_set(out.confidence, hp.rho, source_mask, target_mask)
        terms = {
            "sil": losses.silhouette_loss(out.confidence, out.refined_confidence, selected),
            "geo": losses.geometric_loss(
                out.source_features,
                out.target_features,
                out.guidance,
                selected,
                out.refined_confidence if hp.geo_weighting == "confidence" else None,
            ),
        }
        if self.stage == 2:
            terms["match"] = losses.matching_loss(
                out.source_features,
                out.target_features,
                out.flow,
                hp.window_m,
                hp.temperature,
                source_mask,
            )
            terms["smooth"] = losses.smoothness_loss(out.flow, source_mask)
        return terms

    def total_loss(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        hp = self.hparams
        total = terms["sil"] + hp.lambda_geo * terms["geo"]
        if self.stage == 2:
            total = total + hp.lambda_m * terms["match"] + hp.lambda_sm * terms["smooth"]
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
            if self.hparams.on_nonfinite == "skip":
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

    # --- validation and test ------------------------------------------------------------------
    def dense_flows(self, out: FlowOutput, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """``B x 2 x H x W`` pixel flows of each predictor in :data:`DENSE_PREDICTORS`."""
        return {
            "identity": torch.zeros_like(out.flow_pixels(size)),
            "argmax": flow_cells_to_pixels(argmax_flow(out.correlation), size),
            "guidance": out.guidance_pixels(size),
            "gsf": out.flow_pixels(size),
        }

    def _evaluate(self, batch: Mapping) -> FlowOutput:
        out = self(batch["source_image"], batch["target_image"])
        size = tuple(batch["source_image"].shape[-2:])
        if "flow_s2t" in batch:
            for name, flow in self.dense_flows(out, size).items():
                self.dense_metrics[name].update(
                    batch["index"], flow, batch["flow_s2t"], batch["flow_valid"]
                )
        elif is_mask_transfer_batch(batch):
            # the source mask is warped onto the target grid: that needs the flow target -> source
            flow_t2s = self(batch["target_image"], batch["source_image"]).flow_pixels(size)
            self._mask_evaluator().update(batch, flow_t2s)
        else:
            self._keypoint_evaluator().update(batch, out.flow_pixels(size))
        return out

    def _keypoint_evaluator(self) -> KeypointEvaluator:
        if self.keypoint_evaluator is None:
            datamodule = self.trainer.datamodule
            bound = self.evaluation.pck_bound or getattr(datamodule, "pck_bound", "trg_bbox")
            self.keypoint_evaluator = KeypointEvaluator(
                pck_bound=bound,
                eval_resolution=self.evaluation.eval_resolution,
                kps_sampling=self.evaluation.kps_sampling,
                alphas=getattr(datamodule, "alphas", DEFAULT_ALPHAS),
                categories=getattr(datamodule, "categories", None),
                difficulty_names=getattr(datamodule, "difficulty_names", ()),
            ).to(self.device)
        return self.keypoint_evaluator

    def _mask_evaluator(self) -> MaskTransferEvaluator:
        if self.mask_evaluator is None:
            self.mask_evaluator = MaskTransferEvaluator(
                eval_resolution=self.evaluation.eval_resolution,
                categories=getattr(self.trainer.datamodule, "categories", None),
            ).to(self.device)
        return self.mask_evaluator

    def _benchmark_evaluator(self) -> KeypointEvaluator | MaskTransferEvaluator | None:
        """The keypoint or mask-transfer evaluator that saw this epoch's pairs, if any."""
        if self.keypoint_evaluator is not None and self.keypoint_evaluator.pck.update_count:
            return self.keypoint_evaluator
        if self.mask_evaluator is not None and self.mask_evaluator.metric.update_count:
            return self.mask_evaluator
        return None

    def _results(self) -> dict:
        """Computed (process-synchronised) results of the epoch."""
        evaluator = self._benchmark_evaluator()
        if evaluator is not None:
            results = evaluator.compute()
        else:
            dense = {name: metric.compute() for name, metric in self.dense_metrics.items()}
            pairs = dense["gsf"].pop("pairs")
            results = {"pairs": pairs}
            for name, values in dense.items():
                values.pop("pairs", None)
                results[name] = values
        return results

    def _reset_metrics(self) -> None:
        for metric in self.dense_metrics.values():
            metric.reset()
        for evaluator in (self.keypoint_evaluator, self.mask_evaluator):
            if evaluator is not None:
                evaluator.reset()

    def validation_step(self, batch: Mapping, batch_idx: int) -> None:
        out = self._evaluate(batch)
        if batch_idx == 0 and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._log_panels(batch, out)

    def _log_panels(self, batch: Mapping, out: FlowOutput) -> None:
        """Send the first pairs' panels to loggers that take images (W&B, TensorBoard)."""
        count = min(self.panels_per_validation, batch["source_image"].shape[0])
        panels = [pair_panel(self.model, batch, out, item) for item in range(count)]
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("val/pairs", panels, step=self.global_step)
            elif isinstance(logger, TensorBoardLogger):
                for item, image in enumerate(panels):
                    logger.experiment.add_image(
                        f"val/pair_{item}", image, self.global_step, dataformats="HWC"
                    )

    def on_validation_epoch_end(self) -> None:
        results = self._results()
        scores = results.get("gsf", results)
        logged = {
            f"val/{key}": float(value)
            for key, value in scores.items()
            if key != "pairs" and isinstance(value, int | float)
        }
        logged["val/pck"] = float(scores["pck@0.1"])
        self.log_dict(logged, prog_bar=False, sync_dist=False)
        self.log("val_pck", logged["val/pck"], prog_bar=True, logger=False)
        self._reset_metrics()

    def test_step(self, batch: Mapping, batch_idx: int) -> None:
        out = self._evaluate(batch)
        if batch_idx == 0 and self.trainer.is_global_zero:
            self._save_panels(batch, out)

    def _save_panels(self, batch: Mapping, out: FlowOutput) -> None:
        """Write ``warp.png`` (the first pair) and ``panels/pair_<index>.png`` (the first
        pairs of the first batch) into the results directory."""
        results_dir = self._results_dir()
        count = min(self.panels_per_validation, batch["source_image"].shape[0])
        for item in range(count):
            image = pair_panel(self.model, batch, out, item)
            index = int(batch["index"][item])
            save_png(os.path.join(results_dir, "panels", f"pair_{index:05d}.png"), image)
            if item == 0:
                save_png(os.path.join(results_dir, "warp.png"), image)

    def _results_dir(self) -> str:
        return self.evaluation.results_dir or self.trainer.log_dir or "."

    def on_test_epoch_end(self) -> None:
        results_dir = self._results_dir()
        evaluator = self._benchmark_evaluator()
        if evaluator is not None:
            self.test_results = evaluator.write(
                results_dir,
                self.trainer.datamodule.pair_names("test"),
                {
                    "checkpoint_hparams": dict(self.hparams),
                    "skipped_pairs": getattr(self.trainer.datamodule, "skipped_pairs", 0),
                },
            )
        else:
            self.test_results = self._results()
            if self.trainer.is_global_zero:
                write_json(os.path.join(results_dir, "metrics.json"), self.test_results)
        self._reset_metrics()

    def predict_step(self, batch: Mapping, batch_idx: int) -> dict[str, torch.Tensor]:
        """``{"index": B, "flow_s2t": B x 2 x H x W}`` input pixels (see callbacks.FlowWriter)."""
        out = self(batch["source_image"], batch["target_image"])
        return {"index": batch["index"], "flow_s2t": out.flow_pixels(self.input_size)}

    # --- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        backbone = [p for p in self.model.backbone.parameters() if p.requires_grad]
        heads = [
            p
            for n, p in self.model.named_parameters()
            if p.requires_grad and not n.startswith("backbone.")
        ]
        groups = [{"params": heads, "lr": hp.lr}]
        if backbone:
            groups.append({"params": backbone, "lr": hp.lr * hp.backbone_lr_mult})
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, momentum=hp.momentum, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adam":
            optimizer = torch.optim.Adam(groups, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.AdamW(groups, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return optimizer
        if hp.scheduler == "cosine":
            steps = max(int(self.trainer.estimated_stepping_batches), 1)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        else:
            steps = max(int(self.trainer.estimated_stepping_batches) // 3, 1)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, steps, gamma=0.1)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def check_stage_options(**options) -> None:
    """Refuse option values outside their ranges, naming the option (ConfigError)."""
    check_hyper_parameters(
        options["rho"],
        options["c_p"],
        options["c_m"],
        options["window_n"],
        options["guidance_model"],
    )
    window_m = options["window_m"]
    if window_m < 1 or window_m % 2 == 0:
        raise ConfigError(f"window_m={window_m} is invalid: it must be a positive odd integer")
    if not options["temperature"] > 0:
        raise ConfigError(f"temperature={options['temperature']} is invalid: it must be positive")
    if options["input_size"] <= 0:
        raise ConfigError(f"input_size={options['input_size']} is invalid: it must be positive")
    for name, allowed in (
        ("optimizer", OPTIMIZERS),
        ("scheduler", SCHEDULERS),
        ("on_nonfinite", NONFINITE_POLICIES),
        ("geo_weighting", GEO_WEIGHTINGS),
    ):
        if options[name] not in allowed:
            raise ConfigError(f"{name}={options[name]!r} is invalid: choose one of {allowed}")
    for name in ("lambda_geo", "lambda_m", "lambda_sm", "lr", "weight_decay", "backbone_lr_mult"):
        if options[name] < 0:
            raise ConfigError(f"{name}={options[name]} is invalid: it must be non-negative")


def write_json(path: str, content: Mapping) -> None:
    """Write ``content`` as JSON atomically."""
    with atomic_open(path) as handle:
        handle.write((json.dumps(content, indent=2) + "\n").encode())


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
        if stage == "fit":
            self.initialise_from_checkpoint()

    def initialise_from_checkpoint(self) -> None:
        """Load ``init_checkpoint`` once (the CLI calls this before any data work, so that a
        missing file or a grid mismatch stops the run at once)."""
        path = self.hparams.init_checkpoint
        if path and getattr(self, "_initialised_from", None) != path:
            load_stage_weights(self, path)
            self._initialised_from = path


def load_stage_weights(module: GuidedFlowStage, path: str) -> None:
    """Initialise ``module``'s model from a guided-flow checkpoint (stage 1 or 2), checking that
    its grid matches."""
    if not os.path.isfile(path):
        raise ConfigError(f"init_checkpoint={path!r}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint["state_dict"]
    except Exception as error:
        raise ConfigError(
            f"init_checkpoint={path!r} is not a readable Lightning checkpoint: {error}"
        ) from error
    saved_size = checkpoint.get("hyper_parameters", {}).get("input_size")
    if saved_size is not None and saved_size != module.hparams.input_size:
        raise ConfigError(
            f"init_checkpoint={path!r} was trained at input_size={saved_size} but this run uses "
            f"input_size={module.hparams.input_size}: the grid must match"
        )
    module.load_state_dict(state, strict=True)
