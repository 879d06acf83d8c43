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

from guided_flow.errors import ConfigError, GuidedFlowError
from guided_flow.evaluation.keypoints import HITS_ALPHA, KeypointEvaluator
from guided_flow.evaluation.masks import MaskTransferEvaluator, is_mask_transfer_batch
from guided_flow.evaluation.metrics import DEFAULT_ALPHAS, DenseFlowMetric, KeypointRecords
from guided_flow.io.flow_files import atomic_open
from guided_flow.model import losses
from guided_flow.model.backbone import FeatureExtractor
from guided_flow.model.flow_model import FlowOutput, GuidedFlowModel, check_hyper_parameters
from guided_flow.model.geometry import flow_cells_to_pixels
from guided_flow.model.volumes import EPS, argmax_flow
from guided_flow.viz.drawing import save_png
from guided_flow.viz.panels import pair_panel
from guided_flow.viz.results_recorder import DENSE_ALPHA, ResultsPageRecorder, log_pairs_table

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("none", "cosine", "step")
NONFINITE_POLICIES = ("stop", "skip")
GEO_WEIGHTINGS = ("confidence", "uniform")
MATCH_FEATURES = ("finest", "all")
# The predictors reported at test time: the method's stages from nothing to tau, and tau of the
# untrained model (with ``compare_untrained``).
PREDICTORS = ("identity", "argmax", "guidance", "gsf")
UNTRAINED = "gsf_untrained"


class NonFiniteLossError(GuidedFlowError):
    """A loss term became NaN or infinite."""


@dataclass
class EvaluationOptions:
    """How benchmark keypoints are evaluated (see :mod:`guided_flow.evaluation.keypoints`);
    ``None`` lets
    the data module choose its benchmark's protocol."""

    pck_bound: str | None = None
    eval_resolution: str = "original"
    kps_sampling: str = "bilinear"
    results_dir: str | None = None
    pck_protocol: str | None = None
    # test-time options given over a checkpoint's values (cli.TEST_TIME_OPTIONS), for run.json
    test_time_overrides: dict | None = None


# The direction in which each validation metric improves, for the best-value summaries.
LOWER_IS_BETTER = ("epe", "loss")


def validation_goal(name: str) -> str:
    """``"min"`` for errors and losses, ``"max"`` for the rest (PCK)."""
    return "min" if any(word in name for word in LOWER_IS_BETTER) else "max"


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
    stage's default (stage 1: 0, W_F frozen; stage 2: 1); ``feature_layers=None`` the backbone's
    default layers (:class:`~guided_flow.model.backbone.FeatureExtractor`).

    Optimisation (:meth:`configure_optimizers`): one parameter group per trained part, W_P, W_M
    and W_F, at ``lr`` times ``pruning_lr_mult``, ``matching_lr_mult`` and ``backbone_lr_mult``;
    weight decay (decoupled in AdamW) reaches conv and linear weights only, never BatchNorm
    parameters or biases (conv8_p's bias of 10 included).

    ``match_features``: the features L_M compares, ``"all"`` of them or the ``"finest"`` layer of
    a hypercolumn (proposed formulation: coarse layers resized to the grid vary too smoothly to
    rank sub-cell flows; README, decisions). ``compare_untrained``: at test time also score tau of
    the untrained model (fresh networks and backbone: tau = G' of Q' = sigmoid(10) Q, or S
    with ``flow_base="soft_argmax"``) as ``gsf_untrained``.

    ``flow_base``: ``"guidance"`` (section 8, tau = G' + M(C')) or ``"soft_argmax"`` (proposed
    formulation: tau = S + M(C'), S the weight-free soft-argmax of ``soft_argmax_beta`` C under
    the Gaussian of C', :func:`guided_flow.model.volumes.guided_soft_argmax`; README, decisions).
    Checkpoints written before these options existed load with the default, ``"guidance"``.
    """

    stage: int
    default_trainable_blocks: int
    panels_per_validation = 4

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        weights: str = "imagenet",
        feature_layers: list[int] | None = None,
        trainable_blocks: int | None = None,
        input_size: int = 320,
        rho: float = 0.9,
        c_p: float = 5.0,
        c_m: float = 5.0,
        window_n: int = 5,
        window_m: int = 5,
        guidance_model: str = "translation",
        flow_base: str = "guidance",
        soft_argmax_beta: float = 50.0,
        lambda_geo: float = 3.0,
        geo_weighting: str = "uniform",
        lambda_m: float = 5.0,
        lambda_sm: float = 0.1,
        temperature: float = 1.0,
        match_features: str = "finest",
        optimizer: str = "sgd",
        lr: float = 1e-5,
        pruning_lr_mult: float = 1.0,
        matching_lr_mult: float = 1.0,
        backbone_lr_mult: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        scheduler: str = "none",
        init_checkpoint: str | None = None,
        on_nonfinite: str = "stop",
        compare_untrained: bool = False,
    ) -> None:
        super().__init__()
        check_stage_options(**locals())
        if trainable_blocks is None:
            trainable_blocks = self.default_trainable_blocks
        self.save_hyperparameters()
        self.hparams.trainable_blocks = trainable_blocks
        extractor = FeatureExtractor(backbone, weights, trainable_blocks, feature_layers)
        # checkpoints record the layers used, not "the default", which may change
        self.hparams.feature_layers = list(extractor.feature_layers)
        if input_size % extractor.stride:
            raise ConfigError(
                f"input_size={input_size} is invalid: it must be a multiple of the backbone "
                f"stride {extractor.stride}"
            )
        grid = (input_size // extractor.stride,) * 2
        self.model = GuidedFlowModel(
            extractor,
            grid,
            rho,
            c_p,
            c_m,
            window_n,
            guidance_model,
            flow_base,
            soft_argmax_beta,
        )
        self.evaluation = EvaluationOptions()
        self.dense_metrics = torch.nn.ModuleDict(
            {name: DenseFlowMetric() for name in (*PREDICTORS, UNTRAINED)}
        )
        self.keypoint_evaluator: KeypointEvaluator | None = None
        # the other predictors' keypoint scores; gsf's are keypoint_evaluator's
        self.predictor_evaluators = torch.nn.ModuleDict()
        self._untrained: list[GuidedFlowModel] = []  # a list keeps it out of the state dict
        self.mask_evaluator: MaskTransferEvaluator | None = None
        self.test_results: dict | None = None
        self.page: ResultsPageRecorder | None = None  # the interactive page of a test run
        self.best_validation: dict[str, float] = {}  # best value of each val/ metric of a fit
        self.skipped_steps = 0  # training steps skipped for a non-finite loss
        self._freeze_untrained()

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
        path = self.hparams.init_checkpoint
        if path and getattr(self, "_initialised_from", None) != path:
            load_stage_weights(self, path)
            self._initialised_from = path

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
            source_features, target_features = self.match_features(out)
            terms["match"] = losses.matching_loss(
                source_features,
                target_features,
                out.flow,
                hp.window_m,
                hp.temperature,
                source_mask,
            )
            stride = self.input_size[1] / self.model.grid[1]
            terms["smooth"] = losses.smoothness_loss(out.flow, source_mask, stride)
        return terms

    def match_features(self, out: FlowOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """The source and target features L_M compares (``B x D' x h x w``, unit vectors)."""
        if self.hparams.match_features == "all":
            return out.source_features, out.target_features
        channels = self.model.backbone.layer_channels[0]
        return tuple(
            F.normalize(features[:, :channels], dim=1, eps=EPS)
            for features in (out.source_features, out.target_features)
        )

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
    def predictor_flows(self, batch: Mapping, out: FlowOutput) -> dict[str, torch.Tensor]:
        """``B x 2 x H x W`` input-pixel flows of each predictor of :data:`PREDICTORS`, and of
        :data:`UNTRAINED` when ``compare_untrained`` is on."""
        size = tuple(batch["source_image"].shape[-2:])
        flow = out.flow_pixels(size)
        flows = {
            "identity": torch.zeros_like(flow),
            "argmax": flow_cells_to_pixels(argmax_flow(out.correlation), size),
            "guidance": out.guidance_pixels(size),
            "gsf": flow,
        }
        if self._untrained:
            untrained = self._untrained[0](batch["source_image"], batch["target_image"])
            flows[UNTRAINED] = untrained.flow_pixels(size)
        return flows

    def _evaluate(self, batch: Mapping) -> FlowOutput:
        out = self(batch["source_image"], batch["target_image"])
        size = tuple(batch["source_image"].shape[-2:])
        if "flow_s2t" in batch:
            for name, flow in self.predictor_flows(batch, out).items():
                self.dense_metrics[name].update(
                    batch["index"], flow, batch["flow_s2t"], batch["flow_valid"]
                )
        elif is_mask_transfer_batch(batch):
            # the source mask is warped onto the target grid: that needs the flow target -> source
            flow_t2s = self(batch["target_image"], batch["source_image"]).flow_pixels(size)
            self._mask_evaluator().update(batch, flow_t2s)
        else:
            # validation scores tau alone; a test also scores the other predictors
            testing = self.trainer.testing
            flows = self.predictor_flows(batch, out) if testing else {"gsf": out.flow_pixels(size)}
            for name, flow in flows.items():
                self._keypoint_evaluator(name).update(batch, flow)
        return out

    def _keypoint_evaluator(self, predictor: str = "gsf") -> KeypointEvaluator:
        """The keypoint evaluator of ``predictor`` (built on first use, from the data module)."""
        if predictor == "gsf":
            if self.keypoint_evaluator is None:
                self.keypoint_evaluator = self._new_keypoint_evaluator()
            return self.keypoint_evaluator
        if predictor not in self.predictor_evaluators:
            self.predictor_evaluators[predictor] = self._new_keypoint_evaluator()
        return self.predictor_evaluators[predictor]

    def _new_keypoint_evaluator(self) -> KeypointEvaluator:
        """An empty keypoint evaluator with the attached data module's protocol."""
        datamodule = self.trainer.datamodule
        bound = self.evaluation.pck_bound or getattr(datamodule, "pck_bound", "trg_bbox")
        return KeypointEvaluator(
            pck_bound=bound,
            eval_resolution=self.evaluation.eval_resolution,
            kps_sampling=self.evaluation.kps_sampling,
            alphas=getattr(datamodule, "alphas", DEFAULT_ALPHAS),
            categories=getattr(datamodule, "categories", None),
            difficulty_names=getattr(datamodule, "difficulty_names", ()),
            protocol=self.evaluation.pck_protocol,
        ).to(self.device)

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
            dense = {
                name: metric.compute()
                for name, metric in self.dense_metrics.items()
                if metric.update_count
            }
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
        for evaluator in self.predictor_evaluators.values():
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
        if not self.trainer.sanity_checking:
            self._record_best(logged)
        self._reset_metrics()

    def _record_best(self, logged: Mapping[str, float]) -> None:
        """Keep the best value of each validation metric (see :func:`validation_goal`)."""
        for name, value in logged.items():
            best = self.best_validation.get(name)
            better = min if validation_goal(name) == "min" else max
            self.best_validation[name] = value if best is None else better(best, value)

    def on_fit_start(self) -> None:
        """W&B summaries hold each validation metric's best value, not its last."""
        for logger in self._wandb_loggers():
            for name in ("val/pck", "val/pck@0.05", "val/epe_px"):
                logger.experiment.define_metric(
                    name, summary=validation_goal(name), step_metric="trainer/global_step"
                )

    def on_fit_end(self) -> None:
        """Write the best validation values into the W&B run's summary, so that the run (and
        an offline run's log) carries them whatever the server computes."""
        for logger in self._wandb_loggers():
            logger.experiment.summary.update(self.best_validation)

    def _wandb_loggers(self) -> list[WandbLogger]:
        return [logger for logger in self.loggers if isinstance(logger, WandbLogger)]

    def test_step(self, batch: Mapping, batch_idx: int) -> None:
        out = self._evaluate(batch)
        if batch_idx == 0 and self.trainer.is_global_zero:
            self._save_panels(batch, out)
        if self.page is not None and not is_mask_transfer_batch(batch):
            self.page.add_batch(batch)
            if "flow_s2t" in batch:
                size = tuple(batch["flow_s2t"].shape[-2:])
                self.page.add_dense_rows(batch, out.flow_pixels(size))

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
        records = None
        if evaluator is not None:
            extra = {}
            if evaluator is self.keypoint_evaluator:
                records = evaluator.pck.records()  # gathered once for the files and the page
                extra = {
                    "extra_metrics": {"predictors": self._predictor_summaries()},
                    "records": records,
                }
            self.test_results = evaluator.write(
                results_dir,
                self.trainer.datamodule.pair_names("test"),
                {
                    "checkpoint_hparams": dict(self.hparams),
                    "test_time_overrides": self.evaluation.test_time_overrides or {},
                    "skipped_pairs": getattr(self.trainer.datamodule, "skipped_pairs", 0),
                },
                **extra,
            )
        else:
            self.test_results = self._results()
            if self.trainer.is_global_zero:
                write_json(os.path.join(results_dir, "metrics.json"), self.test_results)
                run = {
                    "checkpoint_hparams": dict(self.hparams),
                    "test_time_overrides": self.evaluation.test_time_overrides or {},
                }
                write_json(os.path.join(results_dir, "run.json"), run)
        self._write_page(evaluator, records)
        self.log_dict(scalar_test_metrics(self.test_results), sync_dist=False)
        self._reset_metrics()

    def _write_page(
        self,
        evaluator: KeypointEvaluator | MaskTransferEvaluator | None,
        records: KeypointRecords | None,
    ) -> None:
        """Write the test's ``index.html`` (keypoint benchmarks, from their gathered
        ``records``, and dense pairs; not mask transfer), and log its rows to W&B as a table."""
        if not self.trainer.is_global_zero or self.page is None:
            return
        if evaluator is not None and evaluator is self.mask_evaluator:
            return
        if evaluator is None:  # dense pairs: tau's scores, the rows the recorder sampled
            rows, flags, alpha = None, (), DENSE_ALPHA
            metrics = {"pairs": self.test_results["pairs"], **self.test_results["gsf"]}
        else:
            rows = evaluator.pair_rows(records, self.trainer.datamodule.pair_names("test"))
            flags, alpha, metrics = evaluator.pck.difficulty_names, HITS_ALPHA, self.test_results
        pairs = self.page.write(metrics, rows, flags, alpha)
        log_pairs_table(self.loggers, self.page.results_dir, pairs)

    def _predictor_summaries(self) -> dict[str, dict]:
        """``{predictor: {"pairs": N, "pck@a": ...}}`` over the test split, gsf included."""
        summaries = {"gsf": self.keypoint_evaluator.compute()}
        summaries.update(
            {name: evaluator.compute() for name, evaluator in self.predictor_evaluators.items()}
        )
        ordered = [name for name in (*PREDICTORS, UNTRAINED) if name in summaries]
        return {
            name: {
                key: value
                for key, value in summaries[name].items()
                if key == "pairs" or key.startswith("pck@")
            }
            for name in ordered
        }

    def on_test_start(self) -> None:
        """Start the test's page, and build the untrained model that ``compare_untrained``
        scores beside tau."""
        self.page = ResultsPageRecorder(self._results_dir())
        if self.hparams.compare_untrained and not self._untrained:
            hp = self.hparams
            extractor = FeatureExtractor(hp.backbone, hp.weights, 0, hp.feature_layers)
            model = GuidedFlowModel(
                extractor,
                self.model.grid,
                hp.rho,
                hp.c_p,
                hp.c_m,
                hp.window_n,
                hp.guidance_model,
                hp.flow_base,
                hp.soft_argmax_beta,
            )
            self._untrained.append(model.to(self.device).eval())

    def on_train_start(self) -> None:
        """Validate before the first step, so that the untrained model is a checkpoint
        candidate (a fresh run only: a resumed run has validated before)."""
        if self.trainer.global_step == 0:
            validate_before_training(self.trainer)

    def predict_step(self, batch: Mapping, batch_idx: int) -> dict[str, torch.Tensor]:
        """``{"index": B, "flow_s2t": B x 2 x H x W}`` input pixels (see callbacks.FlowWriter)."""
        out = self(batch["source_image"], batch["target_image"])
        return {"index": batch["index"], "flow_s2t": out.flow_pixels(self.input_size)}

    # --- optimisation -------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict]:
        """Optimiser groups: W_P, W_M and W_F, each split into decayed weights and undecayed
        BatchNorm parameters and biases (1-D tensors); empty groups are left out."""
        hp = self.hparams
        parts = (
            ("pruning", self.model.pruning_net, hp.pruning_lr_mult),
            ("matching", self.model.matching_net, hp.matching_lr_mult),
            ("backbone", self.model.backbone, hp.backbone_lr_mult),
        )
        groups = []
        for name, module, mult in parts:
            trained = [p for p in module.parameters() if p.requires_grad]
            for decayed, decay in ((True, hp.weight_decay), (False, 0.0)):
                params = [p for p in trained if (p.ndim > 1) == decayed]
                if params:
                    groups.append(
                        {
                            "name": f"{name}{'' if decayed else '_no_decay'}",
                            "params": params,
                            "lr": hp.lr * mult,
                            "weight_decay": decay,
                        }
                    )
        return groups

    def configure_optimizers(self):
        hp = self.hparams
        groups = self.parameter_groups()
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, momentum=hp.momentum)
        else:
            optimizer = torch.optim.AdamW(groups)
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
        options["flow_base"],
        options["soft_argmax_beta"],
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
        ("match_features", MATCH_FEATURES),
    ):
        if options[name] not in allowed:
            raise ConfigError(f"{name}={options[name]!r} is invalid: choose one of {allowed}")
    for name in (
        "lambda_geo", "lambda_m", "lambda_sm", "lr", "weight_decay",
        "pruning_lr_mult", "matching_lr_mult", "backbone_lr_mult",
    ):  # fmt: skip
        if options[name] < 0:
            raise ConfigError(f"{name}={options[name]} is invalid: it must be non-negative")


def validate_before_training(trainer: pl.Trainer) -> None:
    """Run the fit's validation loop once before the first training step and offer its result
    to every monitoring ModelCheckpoint (Lightning skips step 0 on its own), so that training
    keeps the untrained weights unless it beats them. Nothing happens without validation
    batches or under ``fast_dev_run``."""
    if trainer.fast_dev_run or not trainer.enable_validation:
        return
    loop = trainer.fit_loop.epoch_loop.val_loop
    loop.setup_data()
    if loop.skip:
        return
    checkpoints = [cb for cb in trainer.checkpoint_callbacks if cb.monitor is not None]
    for callback in checkpoints:
        # Lightning's guard against saving twice at one step also blocks the first save at 0
        callback._last_global_step_saved = -1
    first_loop_iter = trainer._logger_connector._first_loop_iter
    trainer.validating = True
    loop.run()
    trainer.training = True
    trainer._logger_connector._first_loop_iter = first_loop_iter
    for callback in checkpoints:
        if callback._last_global_step_saved != trainer.global_step:  # it saves per epoch
            callback._save_topk_checkpoint(trainer, callback._monitor_candidates(trainer))
        callback._last_global_step_saved = trainer.global_step


def scalar_test_metrics(results: Mapping) -> dict[str, float]:
    """``test/<metric>`` for each scalar of a test's results (tau's, for dense results), and
    ``test/pck`` = PCK@0.1 where there is one: what loggers and sweep summaries receive."""
    scores = results.get("gsf", results)
    metrics = {
        f"test/{key}": float(value)
        for key, value in scores.items()
        if key != "pairs" and isinstance(value, int | float) and not isinstance(value, bool)
    }
    if "test/pck@0.1" in metrics:
        metrics["test/pck"] = metrics["test/pck@0.1"]
    return metrics


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
        super().setup(stage)
        if stage == "fit":
            self.initialise_from_checkpoint()


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
