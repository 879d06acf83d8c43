"""guided-flow 0.1's checkpoints, command lines and config files keep working in 0.2.

``fixtures/stage2_v0.1.0.ckpt.gz`` was written by 0.1.0 itself, with flat options and the class
path ``guided_flow.stages.MatchingStage`` (``fixtures/write_stage2_v0_1_0.py`` records how)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from guided_flow.api import GuidedSemanticFlow
from guided_flow.cli.legacy import upgrade_arguments, upgrade_config_file
from guided_flow.cli.main import main
from guided_flow.model.flow_model import ModelConfig
from guided_flow.training import MatchingStage
from guided_flow.training.options import upgrade_stage_options

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def legacy_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("legacy") / "stage2_v0.1.0.ckpt"
    with gzip.open(FIXTURES / "stage2_v0.1.0.ckpt.gz", "rb") as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return path


@pytest.fixture(scope="module")
def expected() -> dict:
    return torch.load(FIXTURES / "stage2_v0.1.0_expected.pt", weights_only=True)


def test_the_fixture_is_a_flat_0_1_checkpoint(legacy_checkpoint):
    hparams = torch.load(legacy_checkpoint, weights_only=True)["hyper_parameters"]
    assert hparams["_class_path"] == "guided_flow.stages.MatchingStage"
    assert hparams["rho"] == 0.8 and "model" not in hparams


def test_a_0_1_checkpoint_loads_with_its_options_and_gives_its_flow(legacy_checkpoint, expected):
    stage = MatchingStage.load_from_checkpoint(legacy_checkpoint, map_location="cpu").eval()
    config = stage.model_config
    assert (config.rho, config.c_m, config.flow_base, config.soft_argmax_beta) == (
        0.8,
        3.0,
        "soft_argmax",
        40.0,
    )
    assert (stage.loss_config.lambda_m, stage.optim_config.lr) == (2.0, 2e-4)
    assert stage.optim_config.matching_lr_mult == 0.5
    source = expected["source"]
    with torch.no_grad():
        out = stage(source, source.flip(-1))
    torch.testing.assert_close(out.flow, expected["flow"])
    torch.testing.assert_close(out.guidance, expected["guidance"])


def test_the_api_loads_a_0_1_checkpoint(legacy_checkpoint, expected):
    matcher = GuidedSemanticFlow.from_checkpoint(legacy_checkpoint)
    assert matcher.model.rho == 0.8 and matcher.model.flow_base == "soft_argmax"
    source = expected["source"]
    with torch.no_grad():
        out = matcher.model(source, source.flip(-1))
    torch.testing.assert_close(out.flow, expected["flow"])


@pytest.mark.slow
def test_cli_test_runs_a_0_1_checkpoint(legacy_checkpoint, tmp_path):
    """`guided-flow test --ckpt_path OLD.ckpt` rebuilds the stage from 0.1's flat options."""
    results = tmp_path / "results"
    args = [
        "test",
        "--config",
        str(Path(__file__).parents[1] / "experiments" / "demo_stage2.yaml"),
        "--ckpt_path",
        str(legacy_checkpoint),
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.test_pairs=2",
        "--data.batch_size=2",
        "--trainer.logger=false",
        f"--results_dir={results}",
        "--model.model.c_m=2.5",
    ]
    assert main(args) == 0
    run = yaml.safe_load((results / "run.json").read_text())
    assert run["checkpoint_hparams"]["model"]["rho"] == 0.8  # the checkpoint's
    assert run["checkpoint_hparams"]["model"]["c_m"] == 2.5  # the command line's
    assert run["test_time_overrides"] == {"c_m": 2.5}


def test_flat_options_move_into_their_groups():
    upgraded = upgrade_stage_options(
        {"rho": 0.8, "lr": 1e-3, "lambda_m": 2.0, "init_checkpoint": "a"}
    )
    assert upgraded == {
        "model": {"rho": 0.8},
        "optim": {"lr": 1e-3},
        "loss": {"lambda_m": 2.0},
        "init_checkpoint": "a",
    }
    # grouped options win over flat duplicates
    mixed = upgrade_stage_options({"rho": 0.8, "model": {"rho": 0.7}})
    assert mixed == {"model": {"rho": 0.7}}
    assert ModelConfig.from_hparams({"rho": 0.8}).rho == 0.8


def test_flat_flags_are_rewritten_with_a_warning():
    with pytest.warns(FutureWarning, match="--model.model.rho"):
        upgraded = upgrade_arguments(["fit", "--model.rho", "0.8", "--model.init_args.lr=0.1"])
    assert upgraded == ["fit", "--model.model.rho", "0.8", "--model.optim.lr=0.1"]
    assert upgrade_arguments(["fit", "--model.init_checkpoint=x"]) == [
        "fit",
        "--model.init_checkpoint=x",
    ]


def test_a_0_1_config_file_is_read_through_a_converted_copy(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text(
        "model:\n  class_path: guided_flow.stages.PruningStage\n"
        "  init_args:\n    rho: 0.8\n    lr: 0.001\n    init_checkpoint: null\n"
    )
    with pytest.warns(FutureWarning):
        copy = upgrade_config_file(str(old))
    converted = yaml.safe_load(Path(copy).read_text())
    assert converted["model"] == {
        "class_path": "guided_flow.training.PruningStage",
        "init_args": {"model": {"rho": 0.8}, "optim": {"lr": 0.001}, "init_checkpoint": None},
    }
    current = tmp_path / "new.yaml"
    current.write_text(yaml.safe_dump(converted))
    assert upgrade_config_file(str(current)) == str(current)


def test_cli_parses_a_0_1_config_and_flags(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text(
        "model:\n  class_path: guided_flow.stages.PruningStage\n"
        "  init_args:\n    input_size: 160\n    rho: 0.8\n"
    )
    with pytest.warns(FutureWarning), pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(old), "--model.c_m=2.5", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)["model"]
    assert printed["class_path"] == "guided_flow.training.PruningStage"
    assert printed["init_args"]["model"]["rho"] == 0.8
    assert printed["init_args"]["model"]["c_m"] == 2.5
