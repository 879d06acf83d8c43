"""``guided-flow``: the Lightning CLI (fit, validate, test, predict) plus the project's own tools.

Configuration errors end the command with a one-line message naming the option, before any
data or model work, and no traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass

from pytorch_lightning.cli import LightningCLI

from guided_flow.callbacks import FlowWriter
from guided_flow.errors import GuidedFlowError
from guided_flow.evaluation import EVAL_RESOLUTIONS, KPS_SAMPLINGS, PCK_BOUNDS, format_table
from guided_flow.stages import EvaluationOptions, GuidedFlowStage, write_json

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# The project's own commands: name -> module whose ``main(argv) -> int`` runs it.
TOOL_COMMANDS = {
    "download": "guided_flow.download",
    "match": "guided_flow.match",
    "sweep": "guided_flow.sweep",
    "export": "guided_flow.export",
}


@dataclass(frozen=True)
class ProjectOption:
    """A top-level option the project adds to the Lightning subcommands."""

    name: str
    help: str
    default: str | None = None
    choices: tuple[str, ...] = ()


PROJECT_OPTIONS = (
    ProjectOption(
        "results_dir",
        "where `test` writes metrics.json, predictions.jsonl, run.json and panels (default: the "
        "run's log directory)",
    ),
    ProjectOption(
        "pck_bound", "PCK bound L (default: the benchmark's own protocol)", None, PCK_BOUNDS
    ),
    ProjectOption(
        "eval_resolution",
        "compare keypoints in original or network-input pixels",
        "original",
        EVAL_RESOLUTIONS,
    ),
    ProjectOption("kps_sampling", "how the flow is read at a keypoint", "bilinear", KPS_SAMPLINGS),
    ProjectOption(
        "predictions_dir",
        "where `predict` writes flow_s2t_<index>.npy (default: <log dir>/predictions)",
    ),
    ProjectOption(
        "summary_file", "after `fit`, write the final logged metrics here as JSON (sweeps use it)"
    ),
)


def _model_input_size(model: GuidedFlowStage) -> int:
    return model.hparams.input_size


class GuidedFlowCLI(LightningCLI):
    """LightningCLI in omegaconf mode; the data's image size follows the model (and so the
    checkpoint given by ``--ckpt_path``), evaluation options are top-level flags."""

    def add_arguments_to_parser(self, parser) -> None:
        for option in PROJECT_OPTIONS:
            choices = {"choices": [None, *option.choices]} if option.choices else {}
            parser.add_argument(
                f"--{option.name}",
                type=str | None,
                default=option.default,
                help=option.help,
                **choices,
            )
        # A test config may leave the model out: --ckpt_path then supplies the stage and its
        # hyper-parameters.
        parser.set_defaults({"model": {"class_path": "guided_flow.stages.MatchingStage"}})
        parser.link_arguments(
            "model",
            "data.init_args.image_size",
            compute_fn=_model_input_size,
            apply_on="instantiate",
        )

    def _configure_evaluation(self) -> None:
        config = self.config[self.subcommand]
        self.model.evaluation = EvaluationOptions(
            pck_bound=config.get("pck_bound"),
            eval_resolution=config.get("eval_resolution", "original"),
            kps_sampling=config.get("kps_sampling", "bilinear"),
            results_dir=config.get("results_dir"),
        )

    def before_fit(self) -> None:
        initialise = getattr(self.model, "initialise_from_checkpoint", None)
        if initialise is not None:
            initialise()

    def after_fit(self) -> None:
        path = self.config["fit"].get("summary_file")
        if path and self.trainer.is_global_zero:
            metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()}
            metrics.update(epoch=self.trainer.current_epoch - 1, step=self.trainer.global_step)
            write_json(path, metrics)

    def before_validate(self) -> None:
        self._configure_evaluation()

    def before_test(self) -> None:
        self._configure_evaluation()

    def before_predict(self) -> None:
        directory = self.config["predict"].get("predictions_dir") or os.path.join(
            self.trainer.log_dir or ".", "predictions"
        )
        self.trainer.callbacks.append(FlowWriter(directory))

    def after_test(self) -> None:
        results = self.model.test_results
        if results and self.trainer.is_global_zero and "per_category" in results:
            print(format_table(results))


def run_lightning(args: list[str] | None = None) -> GuidedFlowCLI:
    """Run a Lightning subcommand (``fit``, ``validate``, ``test``, ``predict``)."""
    return GuidedFlowCLI(
        GuidedFlowStage,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(argv: list[str] | None = None) -> int:
    """Console entry point."""
    given = argv is not None
    argv = list(argv if given else sys.argv[1:])
    try:
        if argv and argv[0] in TOOL_COMMANDS:
            return importlib.import_module(TOOL_COMMANDS[argv[0]]).main(argv[1:])
        run_lightning(argv if given else None)
    except Exception as error:
        # Class instantiation inside the CLI wraps our errors: find ours in the chain.
        own = _own_error(error)
        if own is None:
            raise
        print(f"guided-flow: error: {own}", file=sys.stderr)
        return 2
    return 0


def _own_error(error: BaseException | None) -> GuidedFlowError | None:
    """The project's error that caused ``error`` (itself, or its cause or context), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, GuidedFlowError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
