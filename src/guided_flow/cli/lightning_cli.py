"""The Lightning subcommands of ``guided-flow``: ``fit``, ``validate``, ``test``, ``predict``.

Configuration errors end the command with a one-line message naming the option, before any
data or model work, and no traceback. Three behaviours guard against a number other than the one
asked for:

- ``validate``, ``test`` and ``predict`` need a trained model: ``--ckpt_path`` or
  ``--model.init_checkpoint``, or the explicit ``--allow_untrained true``;
- with ``--ckpt_path``, the checkpoint's hyper-parameters rebuild the model, except the test-time
  options of :data:`TEST_TIME_OPTIONS` given on the command line, which no weight depends on;
  ``run.json`` lists them under ``test_time_overrides``;
- ``--run_dir DIR`` puts every output of the run (the trainer's root folder, checkpoint folders,
  the logger's folder, the results) under ``DIR``, so that sweep trials never share a file.
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from jsonargparse import Namespace
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI

from guided_flow.cli.command_table import LIGHTNING_COMMANDS
from guided_flow.cli.legacy import upgrade_arguments
from guided_flow.errors import ConfigError
from guided_flow.evaluation.keypoints import (
    EVAL_RESOLUTIONS,
    KPS_SAMPLINGS,
    PCK_BOUNDS,
    PCK_PROTOCOLS,
    format_table,
    resolve_protocol,
)
from guided_flow.io.atomic import write_json
from guided_flow.training.callbacks import FlowWriter
from guided_flow.training.evaluation_steps import EvaluationOptions, scalar_test_metrics
from guided_flow.training.stages import GuidedFlowStage

# Model options (``--model.model.*``) that change only G', C', the flow base and which networks
# are used (no weight depends on them): given on the command line, they override a checkpoint's
# values.
TEST_TIME_OPTIONS = (
    "rho", "c_p", "c_m", "window_n", "guidance_model", "flow_base", "soft_argmax_beta",
    "soft_argmax_refine", "feature_views", "cycle_consistency", "voting", "mirror_choice",
    "adaptive_window", "use_pruning_net", "use_matching_net",
)  # fmt: skip
# Output options that ``--run_dir`` rebases (dotted paths in a subcommand's config), besides the
# loggers' ``save_dir`` and the callbacks' ``dirpath``.
RUN_DIR_KEYS = ("trainer.default_root_dir", "results_dir", "predictions_dir", "summary_file")


@dataclass(frozen=True)
class ProjectOption:
    """A top-level option the project adds to the Lightning subcommands."""

    name: str
    help: str
    default: str | None = None
    choices: tuple[str, ...] = ()
    flag: bool = False  # a true/false option, default false


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
        "compare keypoints in original (default) or network-input pixels",
        None,
        EVAL_RESOLUTIONS,
    ),
    ProjectOption(
        "pck_protocol",
        "a preset of bound and resolution named after the tables that use it (docs/evaluation.md)",
        None,
        tuple(PCK_PROTOCOLS),
    ),
    ProjectOption("kps_sampling", "how the flow is read at a keypoint", "bilinear", KPS_SAMPLINGS),
    ProjectOption(
        "predictions_dir",
        "where `predict` writes flow_s2t_<index>.npy (default: <log dir>/predictions)",
    ),
    ProjectOption(
        "summary_file",
        "after `fit`, write the best value of each validation metric here as JSON; after "
        "`test`, the test metrics (sweeps read it)",
    ),
    ProjectOption(
        "run_dir",
        "put every output of the run under this folder (relative output paths of the config "
        "are rebased into it); `{run_id}` becomes the W&B run id of a sweep trial or a fresh id",
    ),
    ProjectOption(
        "allow_untrained",
        "let validate/test/predict run a model that no checkpoint trained (`true`); without "
        "it they need --ckpt_path or --model.init_checkpoint",
        flag=True,
    ),
)


def _model_input_size(model: GuidedFlowStage) -> int:
    return model.model_config.input_size


class GuidedFlowCLI(LightningCLI):
    """LightningCLI in omegaconf mode; the data's image size follows the model (and so the
    checkpoint given by ``--ckpt_path``), evaluation options are top-level flags."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for option in PROJECT_OPTIONS:
            if option.flag:
                parser.add_argument(f"--{option.name}", type=bool, default=False, help=option.help)
                continue
            choices: dict[str, Any] = {"choices": [None, *option.choices]} if option.choices else {}
            parser.add_argument(
                f"--{option.name}",
                type=str | None,
                default=option.default,
                help=option.help,
                **choices,
            )
        # A test config may leave the model out: --ckpt_path then supplies the stage and its
        # hyper-parameters.
        parser.set_defaults({"model": {"class_path": "guided_flow.training.MatchingStage"}})
        parser.link_arguments(
            "model",
            "data.init_args.image_size",
            compute_fn=_model_input_size,
            apply_on="instantiate",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        self.command_line = list(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """The checkpoint's hyper-parameters (0.1's upgraded to option groups) rebuild the
        model; the test-time options given on the command line then override them."""
        self.test_time_overrides = {}
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if subcommand not in LIGHTNING_COMMANDS or not path or not os.path.isfile(path):
            return
        given = command_line_model_options(self.command_line)
        options = (self.config[subcommand]["model"].get("init_args") or {}).get("model") or {}
        overrides = {name: options.get(name) for name in TEST_TIME_OPTIONS if name in given}
        # mmap: only the hyper-parameters are read, not the weights
        checkpoint = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        hparams = GuidedFlowStage.upgrade_checkpoint(checkpoint).get("hyper_parameters") or {}
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        model = {"class_path": hparams.pop("_class_path"), "init_args": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)
        for name, value in overrides.items():
            self.config[subcommand]["model"]["init_args"]["model"][name] = value
        self.test_time_overrides = overrides

    def before_instantiate_classes(self) -> None:
        subcommand = self.subcommand
        assert subcommand is not None, "this CLI always runs a subcommand (run=True)"
        config = self.config[subcommand]
        if subcommand != "fit":
            require_trained_model(subcommand, config)
        run_dir = config.get("run_dir")
        if run_dir:
            config["run_dir"] = run_dir.replace("{run_id}", run_identifier())
            move_outputs_into(config, config["run_dir"])

    def _configure_evaluation(self) -> None:
        config = self.config[self.subcommand]
        bound, resolution = resolve_protocol(
            config.get("pck_protocol"), config.get("pck_bound"), config.get("eval_resolution")
        )
        self.model.evaluation = EvaluationOptions(
            pck_bound=bound,
            eval_resolution=resolution,
            kps_sampling=config.get("kps_sampling", "bilinear"),
            results_dir=config.get("results_dir"),
            pck_protocol=config.get("pck_protocol"),
            test_time_overrides=self.test_time_overrides,
        )

    def _initialise_without_checkpoint(self) -> None:
        if not self.config[self.subcommand].get("ckpt_path"):
            self.model.initialise_from_checkpoint()

    def before_fit(self) -> None:
        self._configure_evaluation()
        self.model.initialise_from_checkpoint()

    def after_fit(self) -> None:
        path = self.config["fit"].get("summary_file")
        if path and self.trainer.is_global_zero:
            metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()}
            metrics.update(self.model.best_validation)  # the best value of each val/ metric
            metrics.update(epoch=self.trainer.current_epoch - 1, step=self.trainer.global_step)
            write_json(path, metrics)

    def before_validate(self) -> None:
        self._configure_evaluation()
        self._initialise_without_checkpoint()

    def before_test(self) -> None:
        self._configure_evaluation()
        self._initialise_without_checkpoint()

    def before_predict(self) -> None:
        self._initialise_without_checkpoint()
        directory = self.config["predict"].get("predictions_dir") or os.path.join(
            self.trainer.log_dir or ".", "predictions"
        )
        # Lightning sets Trainer.callbacks at run time: the Trainer type does not declare it
        self.trainer.callbacks.append(FlowWriter(directory))  # type: ignore[attr-defined]

    def after_test(self) -> None:
        results = self.model.test_results
        if not results or not self.trainer.is_global_zero:
            return
        if "per_category" in results:
            print(format_table(results))
        path = self.config["test"].get("summary_file")
        if path:
            write_json(path, scalar_test_metrics(results))


def command_line_model_options(argv: list[str]) -> set[str]:
    """Names of the model group's options given on a command line (``--model.model.c_m 2``,
    ``--model.init_args.model.c_m=2``)."""
    names = set()
    for token in argv:
        if token.startswith("--model."):
            key = token[len("--model.") :].split("=", 1)[0].removeprefix("init_args.")
            if key.startswith("model."):
                names.add(key.removeprefix("model."))
    return names


def require_trained_model(subcommand: str, config: Namespace) -> None:
    """Refuse to score or run a model that no checkpoint trained, unless asked explicitly."""
    if config.get("ckpt_path") or config.get("allow_untrained"):
        return
    init_args = (config.get("model") or {}).get("init_args") or {}
    if init_args.get("init_checkpoint"):
        return
    raise ConfigError(
        f"`{subcommand}` needs a trained model: give --ckpt_path CKPT (or "
        "--model.init_checkpoint CKPT), or --allow_untrained true to run the untrained one"
    )


def run_identifier() -> str:
    """The W&B run id of a sweep trial (``WANDB_RUN_ID``, set by ``wandb agent``), else a
    fresh one."""
    return os.environ.get("WANDB_RUN_ID") or uuid.uuid4().hex[:8]


def move_outputs_into(config: Namespace, run_dir: str) -> None:
    """Rebase the run's relative output paths into ``run_dir``: the trainer's root folder, each
    callback's ``dirpath``, the logger's ``save_dir``, the results, predictions and summary
    files. Absolute paths are kept; unset folders go to ``run_dir`` itself."""

    def rebased(path: str | None) -> str:
        if not path:
            return run_dir
        return path if os.path.isabs(path) else os.path.join(run_dir, path)

    for key in RUN_DIR_KEYS:
        group, _, name = key.rpartition(".")
        holder = config[group] if group else config
        if name == "summary_file" and not holder.get(name):
            continue
        holder[name] = rebased(holder.get(name))
    trainer = config["trainer"]
    loggers = trainer.get("logger")
    for entry in loggers if isinstance(loggers, list) else [loggers]:
        if entry and not isinstance(entry, bool) and entry.get("init_args") is not None:
            entry["init_args"]["save_dir"] = rebased(entry["init_args"].get("save_dir"))
    for callback in trainer.get("callbacks") or []:
        init_args = callback.get("init_args")
        if init_args is not None and "dirpath" in init_args:
            init_args["dirpath"] = rebased(init_args.get("dirpath"))


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


def run_lightning_command(argv: list[str], given: bool) -> None:
    """Run ``argv`` (a Lightning subcommand and its options, 0.1's names upgraded); ``given``:
    the arguments came from a caller, not from ``sys.argv``."""
    upgraded = upgrade_arguments(argv)
    run_lightning(upgraded if given or upgraded != argv else None)
