"""`guided-flow` end to end on the embedded default, through the real entry point."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from guided_flow.cli.main import COMMANDS, LIGHTNING_COMMANDS, TOOL_COMMANDS, main
from guided_flow.training.stages import PruningStage
from tests.helpers import save_stage_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "--model.model.input_size=160",
    "--data.batch_size=2",
    "--data.val_pairs=2",
    "--data.test_pairs=2",
]


def _config(name: str) -> str:
    return os.path.join(REPO, "experiments", name)


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.slow
def test_fit_both_stages_with_fast_dev_run(workdir):
    cache = f"--data.cache_dir={workdir / 'cache'}"
    args = ["fit", "--config", _config("demo.yaml"), "--trainer.fast_dev_run=true", cache]
    assert main(args + SMALL) == 0
    # fast_dev_run writes no checkpoint: make the stage-1 checkpoint stage 2 starts from
    stage1 = PruningStage.from_options(input_size=160)
    checkpoint = save_stage_checkpoint(stage1, workdir / "stage1.ckpt")
    args = ["fit", "--config", _config("demo_stage2.yaml"), "--trainer.fast_dev_run=true", cache]
    assert main(args + SMALL + [f"--model.init_checkpoint={checkpoint}"]) == 0


@pytest.mark.slow
def test_test_command_takes_the_model_from_the_checkpoint(workdir):
    stage = PruningStage.from_options(input_size=160, rho=0.8, c_p=2.0)
    checkpoint = save_stage_checkpoint(stage, workdir / "any.ckpt")
    results = workdir / "results"
    args = [
        "test",
        "--config",
        _config("demo_stage2.yaml"),  # a stage-2 config at 320 px: the checkpoint wins
        f"--ckpt_path={checkpoint}",
        f"--results_dir={results}",
        f"--data.cache_dir={workdir / 'cache'}",
        "--data.test_pairs=2",
        "--data.batch_size=2",
        "--trainer.logger=false",
    ]
    assert main(args) == 0
    metrics = json.loads((results / "metrics.json").read_text())
    assert set(metrics) == {"pairs", "identity", "argmax", "guidance", "gsf"}
    assert metrics["pairs"] == 2
    for scores in list(metrics.values())[1:]:
        assert set(scores) == {"pck@0.01", "pck@0.05", "pck@0.1", "epe_px"}
        assert 0.0 <= scores["pck@0.1"] <= 1.0
    # a guided flow is better than no flow at all on warped pairs
    assert metrics["guidance"]["epe_px"] < metrics["identity"]["epe_px"]
    assert (results / "warp.png").stat().st_size > 0
    run = json.loads((results / "run.json").read_text())
    # the config's rho 0.9 does not override the checkpoint's 0.8
    assert run["test_time_overrides"] == {} and run["checkpoint_hparams"]["model"]["rho"] == 0.8
    # test-time options given on the command line override the checkpoint's values
    assert main(args + ["--model.model.c_m", "2", "--model.init_args.model.rho=0.95"]) == 0
    run = json.loads((results / "run.json").read_text())
    assert run["test_time_overrides"] == {"c_m": 2.0, "rho": 0.95}
    hparams = run["checkpoint_hparams"]["model"]
    assert (hparams["c_m"], hparams["rho"], hparams["c_p"]) == (2.0, 0.95, 2.0)


def test_help_lists_every_command_with_a_description(capsys):
    assert set(COMMANDS) == set(LIGHTNING_COMMANDS) | set(TOOL_COMMANDS)
    assert main(["--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in COMMANDS:
        described = [line for line in lines if line.split()[:1] == [name]]
        assert len(described) == 1 and len(described[0].split()) > 3


@pytest.mark.parametrize("command", ["test", "validate", "predict"])
def test_running_an_untrained_model_needs_an_explicit_opt_in(workdir, capsys, command):
    args = [
        command,
        "--config",
        _config("demo_stage2.yaml"),
        "--model.init_checkpoint=null",
        f"--data.cache_dir={workdir / 'cache'}",
        "--trainer.logger=false",
    ]
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--allow_untrained true" in error[0] and command in error[0]
    assert not (workdir / "cache").exists()
    if command == "test":
        opt_in = ["--allow_untrained=true", f"--results_dir={workdir / 'r'}", *SMALL]
        assert main(args + opt_in + ["--data.test_pairs=2"]) == 0
        assert (workdir / "r" / "metrics.json").is_file()


@pytest.mark.parametrize(
    "option, value",
    [
        ("rho", "1.5"),
        ("c_p", "0"),
        ("c_m", "-2"),
        ("temperature", "0"),
        ("window_n", "4"),
        ("window_m", "0"),
        ("input_size", "100"),
    ],
)
def test_bad_option_is_a_one_line_error_before_any_work(workdir, option, value):
    command = [
        sys.executable,
        "-m",
        "guided_flow.cli.main",
        "fit",
        "--config",
        _config("demo.yaml"),
        f"--model.{option}={value}",
        f"--data.cache_dir={workdir / 'cache'}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert lines and option in lines[-1]
    assert not (workdir / "cache").exists(), "no data work may start before the check"


@pytest.mark.parametrize(
    "subcommand, names",
    [
        ("fit", ["demo.yaml"]),
        ("fit", ["demo_stage2.yaml"]),
        ("fit", ["stage1.yaml"]),
        ("fit", ["stage2.yaml"]),
        ("fit", ["stage2.yaml", "stage2_t0.1_photometric.yaml"]),
        ("fit", ["finetune_folders.yaml"]),
        ("test", ["test_spair.yaml"]),
        ("test", ["test_pfpascal.yaml"]),
        ("test", ["test_pfwillow.yaml"]),
        ("test", ["test_caltech.yaml"]),
    ],
)
def test_every_config_parses_and_names_existing_options(subcommand, names):
    from guided_flow.cli.main import run_lightning

    configs = [arg for name in names for arg in ("--config", _config(name))]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no config still uses 0.1's names
        with pytest.raises(SystemExit) as exit_info:
            run_lightning([subcommand, *configs, "--print_config"])
    assert exit_info.value.code == 0


def test_cli_saves_primitive_hyper_parameters(workdir):
    stage = PruningStage.from_options(input_size=160, c_m=2.0)
    assert stage.hparams.model["c_m"] == 2.0
    primitive = (int, float, str, bool, type(None))

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(isinstance(x, int) for x in value)
        return isinstance(value, primitive)

    assert set(stage.hparams) >= {"model", "loss", "optim"}
    assert all(plain(v) for v in stage.hparams.values()), stage.hparams
    assert torch.is_tensor(stage.model.pruning_net.body.conv8.bias)


def test_stage_two_with_a_mismatched_init_checkpoint_stops_before_data_work(workdir):
    stage = PruningStage.from_options(input_size=160)
    checkpoint = save_stage_checkpoint(stage, workdir / "stage1_160.ckpt")
    cache = workdir / "cache"
    args = ["fit", "--config", _config("demo_stage2.yaml"), f"--data.cache_dir={cache}"]
    assert main(args + [f"--model.init_checkpoint={checkpoint}"]) == 2
    assert main(args + [f"--model.init_checkpoint={workdir / 'missing.ckpt'}"]) == 2
    assert not cache.exists()


@pytest.mark.slow
def test_predict_writes_one_flow_file_per_pair(workdir):
    stage = PruningStage.from_options(input_size=160)
    checkpoint = save_stage_checkpoint(stage, workdir / "model.ckpt")
    out = workdir / "flows"
    args = [
        "predict",
        "--config",
        _config("demo.yaml"),
        f"--ckpt_path={checkpoint}",
        f"--predictions_dir={out}",
        f"--data.cache_dir={workdir / 'cache'}",
        "--data.test_pairs=3",
        "--data.batch_size=2",
        "--trainer.logger=false",
    ]
    assert main(args) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["flow_s2t_000000.npy", "flow_s2t_000001.npy", "flow_s2t_000002.npy"]
    import numpy as np

    flow = np.load(out / files[0])
    assert flow.shape == (160, 160, 2) and flow.dtype == np.float32 and np.isfinite(flow).all()


def test_stage_two_config_switches_to_synthetic_pairs(capsys):
    from guided_flow.cli.main import run_lightning

    args = [
        "fit",
        "--config",
        _config("stage2.yaml"),
        "--data=data_modules.synthetic.SyntheticPairsDataModule",
    ]
    with pytest.raises(SystemExit) as exit_info:
        run_lightning([*args, "--data.root=/data/pf-pascal", "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: data_modules.synthetic.SyntheticPairsDataModule" in printed
    assert "root: /data/pf-pascal" in printed and "voc_root" not in printed
