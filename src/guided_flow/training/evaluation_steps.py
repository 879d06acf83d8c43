"""Validation, test and prediction of a training stage: one evaluation per data module.

The data module declares how its pairs are scored (its ``evaluation``): ``dense_flow`` (pairs
with a true flow: EPE and dense PCK of every predictor), ``keypoints`` (benchmark PCK; a test
also scores the predictors of :data:`PREDICTORS`) or ``mask_transfer`` (Caltech-101's LT-ACC,
IoU and LOC-ERR). :class:`EvaluationSteps` holds the Lightning hooks; the stage mixes it in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

from data_modules import EVALUATIONS
from guided_flow.errors import ConfigError
from guided_flow.evaluation.keypoints import HITS_ALPHA, KeypointEvaluator
from guided_flow.evaluation.masks import MaskTransferEvaluator
from guided_flow.evaluation.metrics import DEFAULT_ALPHAS, DenseFlowMetric, KeypointRecords
from guided_flow.io.atomic import write_json
from guided_flow.model.flow_model import FlowOutput, GuidedFlowModel, ModelConfig
from guided_flow.training.predictors import COMPARED, PREDICTORS, predictor_flows
from guided_flow.viz.drawing import save_png
from guided_flow.viz.panels import pair_panel
from guided_flow.viz.results_recorder import DENSE_ALPHA, ResultsPageRecorder, log_pairs_table

# How a data module's pairs can be scored (its declared `evaluation`; "none" cannot be).
SCORED_EVALUATIONS = tuple(kind for kind in EVALUATIONS if kind != "none")


@dataclass
class EvaluationOptions:
    """How benchmark keypoints are evaluated (see :mod:`guided_flow.evaluation.keypoints`);
    ``None`` lets the data module choose its benchmark's protocol."""

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


class EvaluationSteps(pl.LightningModule):
    """The validation, test and predict hooks of a stage, and the metrics they fill
    (:class:`~guided_flow.training.stages.GuidedFlowStage` adds the model and training)."""

    model: GuidedFlowModel
    model_config: ModelConfig
    panels_per_validation = 4

    def __init__(self) -> None:
        super().__init__()
        self.evaluation = EvaluationOptions()
        self.dense_metrics = torch.nn.ModuleDict(
            {name: DenseFlowMetric() for name in (*PREDICTORS, *COMPARED)}
        )
        self.keypoint_evaluator: KeypointEvaluator | None = None
        # the other predictors' keypoint scores; gsf's are keypoint_evaluator's
        self.predictor_evaluators = torch.nn.ModuleDict()
        self._untrained: list[GuidedFlowModel] = []  # a list keeps it out of the state dict
        self.mask_evaluator: MaskTransferEvaluator | None = None
        self.test_results: dict[str, Any] | None = None
        self.page: ResultsPageRecorder | None = None  # the interactive page of a test run
        self.best_validation: dict[str, float] = {}  # best value of each val/ metric of a fit

    @property
    def datamodule(self) -> Any:
        """The trainer's data module (``Trainer.datamodule``, set at run time: not in its type)."""
        return self.trainer.datamodule  # type: ignore[attr-defined]

    # the ModuleDicts' items, as what they hold (a ModuleDict's items are typed Module)
    def dense_metric(self, name: str) -> DenseFlowMetric:
        return cast(DenseFlowMetric, self.dense_metrics[name])

    def predictor_evaluator(self, name: str) -> KeypointEvaluator:
        return cast(KeypointEvaluator, self.predictor_evaluators[name])

    def evaluation_kind(self) -> str:
        """How the attached data module's pairs are scored: the ``evaluation`` it declares."""
        datamodule = self.datamodule
        kind = getattr(datamodule, "evaluation", None)
        if not self.trainer.testing:
            kind = getattr(datamodule, "val_evaluation", kind)
        if kind not in SCORED_EVALUATIONS:
            raise ConfigError(
                f"cannot score the pairs of {type(datamodule).__name__}: a data module must "
                f"declare its `evaluation`, one of {SCORED_EVALUATIONS} (got {kind!r})"
            )
        return kind

    def predictor_flows(self, batch: Mapping, out: FlowOutput) -> dict[str, torch.Tensor]:
        """``B x 2 x H x W`` input-pixel flows of each predictor of :data:`PREDICTORS`, and of
        :data:`COMPARED` when ``compare_untrained`` is on (:func:`predictor_flows`)."""
        untrained = self._untrained[0] if self._untrained else None
        return predictor_flows(self.model, batch, out, untrained, compare=untrained is not None)

    def _evaluate(self, batch: Mapping) -> FlowOutput:
        out = self(batch["source_image"], batch["target_image"])
        size = tuple(batch["source_image"].shape[-2:])
        kind = self.evaluation_kind()
        if kind == "dense_flow":
            for name, flow in self.predictor_flows(batch, out).items():
                self.dense_metric(name).update(
                    batch["index"], flow, batch["flow_s2t"], batch["flow_valid"]
                )
        elif kind == "mask_transfer":
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
        return self.predictor_evaluator(predictor)

    def _new_keypoint_evaluator(self) -> KeypointEvaluator:
        """An empty keypoint evaluator with the attached data module's protocol."""
        datamodule = self.datamodule
        bound = self.evaluation.pck_bound or getattr(datamodule, "pck_bound", "trg_bbox")
        return KeypointEvaluator(
            pck_bound=cast(str, bound),
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
                categories=getattr(self.datamodule, "categories", None),
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
                name: self.dense_metric(name).compute()
                for name in self.dense_metrics
                if self.dense_metric(name).update_count
            }
            pairs = dense["gsf"].pop("pairs")
            results = {"pairs": pairs}
            for name, values in dense.items():
                values.pop("pairs", None)
                results[name] = values
        return results

    def _reset_metrics(self) -> None:
        for name in self.dense_metrics:
            self.dense_metric(name).reset()
        for evaluator in (self.keypoint_evaluator, self.mask_evaluator):
            if evaluator is not None:
                evaluator.reset()
        for name in self.predictor_evaluators:
            self.predictor_evaluator(name).reset()

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
        kind = self.evaluation_kind()
        if self.page is not None and kind != "mask_transfer":
            self.page.add_batch(batch)
            if kind == "dense_flow":
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
        records: KeypointRecords | None = None
        if evaluator is not None:
            extra: dict[str, Any] = {}
            if isinstance(evaluator, KeypointEvaluator):  # self.keypoint_evaluator
                records = evaluator.pck.records()  # gathered once for the files and the page
                extra = {
                    "extra_metrics": {"predictors": self._predictor_summaries(evaluator)},
                    "records": records,
                }
            self.test_results = evaluator.write(
                results_dir,
                self.datamodule.pair_names("test"),
                {
                    "checkpoint_hparams": dict(self.hparams),
                    "test_time_overrides": self.evaluation.test_time_overrides or {},
                    "skipped_pairs": getattr(self.datamodule, "skipped_pairs", 0),
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
        if isinstance(evaluator, MaskTransferEvaluator):  # self.mask_evaluator
            return
        assert self.test_results is not None, "on_test_epoch_end computes the results first"
        rows: list[dict] | None = None
        flags: Sequence[str] = ()
        if evaluator is None:  # dense pairs: tau's scores, the rows the recorder sampled
            alpha = DENSE_ALPHA
            metrics = {"pairs": self.test_results["pairs"], **self.test_results["gsf"]}
        else:
            assert records is not None, "a keypoint test gathers its records first"
            rows = evaluator.pair_rows(records, self.datamodule.pair_names("test"))
            flags, alpha, metrics = evaluator.pck.difficulty_names, HITS_ALPHA, self.test_results
        pairs = self.page.write(metrics, rows, flags, alpha)
        log_pairs_table(self.loggers, self.page.results_dir, pairs)

    def _predictor_summaries(self, gsf: KeypointEvaluator) -> dict[str, dict]:
        """``{predictor: {"pairs": N, "pck@a": ...}}`` over the test split, gsf included."""
        summaries = {"gsf": gsf.compute()}
        summaries.update(
            {name: self.predictor_evaluator(name).compute() for name in self.predictor_evaluators}
        )
        ordered = [name for name in (*PREDICTORS, *COMPARED) if name in summaries]
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
        if self.hparams["compare_untrained"] and not self._untrained:
            config = replace(self.model_config, trainable_blocks=0)
            untrained = GuidedFlowModel.from_config(config)
            self._untrained.append(untrained.to(self.device).eval())

    def predict_step(self, batch: Mapping, batch_idx: int) -> dict[str, torch.Tensor]:
        """``{"index": B, "flow_s2t": B x 2 x H x W}`` input pixels (see callbacks.FlowWriter)."""
        out = self(batch["source_image"], batch["target_image"])
        return {"index": batch["index"], "flow_s2t": out.flow_pixels(self.input_size)}
