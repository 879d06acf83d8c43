"""Evaluation protocols: one evaluator per run, one PCK bound source, the --pck_protocol presets."""

import copy
import json

import pytest
import pytorch_lightning as pl
import torch

from data_modules.pf_pascal import PFPascalDataModule
from data_modules.pf_willow import PFWillowDataModule
from guided_flow.cli.main import main
from guided_flow.errors import ConfigError
from guided_flow.evaluation.keypoints import PCK_PROTOCOLS, resolve_protocol
from guided_flow.training.evaluation_steps import EvaluationOptions
from guided_flow.training.stages import MatchingStage
from tests.helpers import save_stage_checkpoint
from tests.test_pf_pascal import INPUT, REPO, training_layout
from tests.test_pf_willow import image, willow_row, write_willow

WILLOW_SRC = [(10, 20), (60, 80), (150, 140)]
WILLOW_TRG = [(20, 30), (70, 60), (120, 150)]  # box 20..120 x 30..150: bound 120


def _trainer() -> pl.Trainer:
    return pl.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        fast_dev_run=1,
    )


def _willow(root) -> PFWillowDataModule:
    write_willow(root, [willow_row(image("car(S)", 1), image("car(S)", 2), WILLOW_SRC, WILLOW_TRG)])
    return PFWillowDataModule(str(root), image_size=INPUT, batch_size=1)


def _test(stage, module, results) -> dict:
    stage.evaluation = EvaluationOptions(results_dir=str(results))
    _trainer().test(stage, datamodule=module)
    return {
        "metrics": json.loads((results / "metrics.json").read_text()),
        "run": json.loads((results / "run.json").read_text()),
        "line": json.loads((results / "predictions.jsonl").read_text()),
    }


@pytest.mark.slow
def test_fit_on_one_benchmark_then_test_on_another_uses_the_second_protocol(tmp_path):
    pascal = tmp_path / "pf-pascal"
    training_layout(pascal)
    torch.manual_seed(0)
    stage = MatchingStage.from_options(backbone="resnet18", weights="none", input_size=INPUT)
    fresh = copy.deepcopy(stage)
    fit_module = PFPascalDataModule(str(pascal), image_size=INPUT, batch_size=2)
    trainer = _trainer()
    trainer.fit(stage, datamodule=fit_module)  # one step and one PF-PASCAL validation batch
    assert stage.keypoint_evaluator is not None  # validation scored PF-PASCAL keypoints
    assert stage.keypoint_evaluator.pck_bound == "trg_img"
    fresh.load_state_dict(stage.state_dict())

    after_fit = _test(stage, _willow(tmp_path / "willow"), tmp_path / "after-fit")
    alone = _test(fresh, _willow(tmp_path / "willow"), tmp_path / "alone")
    # PF-WILLOW's protocol, not PF-PASCAL's: the valid keypoints' box (120), not max(H, W) (200)
    assert after_fit["run"]["pck_bound"] == "trg_kps" and after_fit["line"]["bound"] == 120
    assert after_fit["run"]["alphas"] == [0.05, 0.1, 0.15]
    assert list(after_fit["metrics"]["per_category"]) == ["car(S)"]
    assert after_fit["metrics"] == alone["metrics"] and after_fit["line"] == alone["line"]


def test_presets_set_bound_and_resolution_and_exclude_the_single_options():
    assert resolve_protocol(None, None, None) == (None, "original")
    assert resolve_protocol(None, "trg_bbox", "input") == ("trg_bbox", "input")
    assert resolve_protocol("hpf", None, None) == ("trg_img", "original")
    assert resolve_protocol("scnet", None, None) == ("trg_img", "input")
    assert resolve_protocol("valid_kps", None, None) == ("trg_kps", "original")
    assert resolve_protocol("padded_kps", None, None) == ("trg_kps_padded", "original")
    assert set(PCK_PROTOCOLS) == {"hpf", "scnet", "valid_kps", "padded_kps"}
    with pytest.raises(ConfigError, match="leave out --pck_bound"):
        resolve_protocol("hpf", "trg_bbox", None)
    with pytest.raises(ConfigError, match="pck_protocol"):
        resolve_protocol("cats", None, None)


@pytest.mark.slow
def test_test_command_names_the_preset_in_run_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _willow(tmp_path / "willow")
    stage = MatchingStage.from_options(backbone="resnet18", weights="none", input_size=INPUT)
    checkpoint = save_stage_checkpoint(stage, tmp_path / "model.ckpt")
    bounds = {}
    for protocol in ("valid_kps", "padded_kps"):
        results = tmp_path / protocol
        args = [
            "test",
            "--config",
            str(REPO / "experiments" / "test_pfwillow.yaml"),
            f"--ckpt_path={checkpoint}",
            f"--data.root={tmp_path / 'willow'}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            "--data.num_workers=0",
            f"--results_dir={results}",
            f"--pck_protocol={protocol}",
        ]
        assert main(args) == 0
        run = json.loads((results / "run.json").read_text())
        assert run["pck_protocol"] == protocol
        bounds[protocol] = json.loads((results / "predictions.jsonl").read_text())["bound"]
    # the padded box stretches to (-1, -1): x -1..120, y -1..150
    assert bounds == {"valid_kps": 120, "padded_kps": 151}
