"""Hyper-parameter grids: the local runner end to end, and the W&B sweep files."""

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from guided_flow.cli.main import main, run_lightning
from guided_flow.cli.sweep import load_sweep
from guided_flow.errors import ConfigError
from tests.helpers import wandb_records

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))
TINY_TRIAL = [
    "--model.model.input_size=160",
    "--data.batch_size=2",
    "--data.train_pairs_per_epoch=4",
    "--data.val_pairs=2",
    "--trainer.max_epochs=1",
    "--trainer.max_steps=-1",
    "--trainer.val_check_interval=null",
    "--trainer.check_val_every_n_epoch=1",
    "--trainer.limit_val_batches=1",
]
STAGE_TWO_SWEEPS = ("cp_cm", "lambda_m_sm", "windows")


@pytest.mark.slow
def test_two_by_two_grid_on_the_embedded_default_runs_and_resumes(tmp_path, monkeypatch):
    # started from a folder where the config and the cache are relative paths
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments").mkdir()
    shutil.copy(REPO / "experiments" / "demo.yaml", tmp_path / "experiments" / "demo.yaml")
    sweep_file = tmp_path / "grid.yaml"
    sweep_file.write_text(
        yaml.safe_dump(
            {
                "method": "grid",
                "metric": {"name": "val/pck", "goal": "maximize"},
                "parameters": {
                    "model.c_p": {"values": [2, 5]},
                    "model.rho": {"values": [0.8, 0.9]},
                },
                "command": ["guided-flow", "fit", "--config", "unused.yaml", "${args}"],
            }
        )
    )
    csv_logs = ["--trainer.logger=CSVLogger", "--trainer.logger.save_dir=logs"]
    extra = [*TINY_TRIAL, *csv_logs, "--data.cache_dir=cache"]
    args = ["sweep", "grid.yaml", "--base-config", "experiments/demo.yaml", "--out", "grid", "--"]
    assert main(args + extra) == 0
    out = tmp_path / "grid"
    trials = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert trials == [
        "000-c_p=2-rho=0.8",
        "001-c_p=2-rho=0.9",
        "002-c_p=5-rho=0.8",
        "003-c_p=5-rho=0.9",
    ]
    # one shared cache where the sweep started; each trial's outputs in its own folder
    assert [p.name for p in (tmp_path / "cache").iterdir()] != []
    assert not (tmp_path / "outputs").exists()
    checkpoints = [out / t / "outputs" / "demo" / "stage1.ckpt" for t in trials]
    assert all(path.is_file() for path in checkpoints)
    rows = list(csv.DictReader((out / "sweep_summary.csv").open()))
    assert len(rows) == 4 and list(rows[0]) == ["trial", "model.c_p", "model.rho", "val/pck"]
    for row in rows:
        # the summary is the best validation of the trial (before training and after)
        logged = [
            float(line["val/pck"])
            for line in csv.DictReader(next((out / row["trial"]).rglob("metrics.csv")).open())
            if line.get("val/pck")
        ]
        assert len(logged) == 2 and float(row["val/pck"]) == pytest.approx(max(logged))
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stamps = {t: os.path.getmtime(out / t / "summary.json") for t in trials}
    assert main(args + extra) == 0  # rerun: every trial is skipped
    assert stamps == {t: os.path.getmtime(out / t / "summary.json") for t in trials}


def agent_command(tmp_path, monkeypatch, command: list[str], values: dict, run_id: str):
    """The argv that wandb's own agent code builds for one trial of a sweep ``command`` with
    ``values``; the process itself is started only with a real AgentProcess."""
    from wandb import wandb_agent

    monkeypatch.setenv("WANDB_SWEEP_ID", "local")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    for name in ("WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"):  # the agent sets them: restored after
        monkeypatch.setenv(name, "unset")
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id="local")
    agent._sweep_command = command
    args = {name: {"value": value} for name, value in values.items()}
    agent._command_run({"run_id": run_id, "program": "guided-flow", "args": args})
    return agent._run_processes[run_id]


class RecordedProcess:
    """Stands in for wandb's AgentProcess: keeps the command instead of running it."""

    def __init__(self, command=None, env=None, **kwargs) -> None:
        self.command, self.env = command, env


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_wandb_agent_builds_trials_the_cli_accepts(path, tmp_path, monkeypatch, capsys):
    from wandb import wandb_agent

    monkeypatch.setattr(wandb_agent, "AgentProcess", RecordedProcess)
    sweep = load_sweep(path)
    first = {name: values[0] for name, values in sweep.parameters.items()}
    process = agent_command(tmp_path, monkeypatch, sweep.command, first, "run42")
    command = process.command
    assert command[0] == "guided-flow" and process.env["WANDB_RUN_ID"] == "run42"
    assert all(f"--{name}={value}" in command for name, value in first.items())
    # every trial has its own run folder (the CLI puts the run id in it)
    run_dirs = [token for token in command if token.startswith("--run_dir=")]
    assert len(run_dirs) == 1 and "{run_id}" in run_dirs[0]
    config = command[command.index("--config") + 1]
    # the parser accepts the trial's command line (a wrong option name exits with code 2)
    with pytest.raises(SystemExit) as accepted:
        run_lightning([*command[1:], "--print_config"])
    assert accepted.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    if path.stem in STAGE_TWO_SWEEPS:  # a stage-1 checkpoint named outside the run folder
        start = printed["model"]["init_args"]["init_checkpoint"]
        assert start == "outputs/checkpoints/stage1.ckpt"
    with pytest.raises(SystemExit) as refused:
        run_lightning(["fit", "--config", str(REPO / config), "--model.no_such_option=1"])
    assert refused.value.code != 0


def item_key(item) -> str:
    """A W&B record item's key: ``key``, or ``nested_key`` joined for names with a slash."""
    return item.key or "/".join(item.nested_key)


@pytest.mark.slow
def test_wandb_agent_runs_a_tiny_trial_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    sweep = load_sweep(REPO / "experiments" / "sweeps" / "lambda.yaml")
    command = list(sweep.command)
    command[command.index("--config") + 1] = str(REPO / "experiments" / "demo.yaml")
    run_dir = next(token for token in command if token.startswith("--run_dir="))
    command[command.index(run_dir)] = f"--run_dir={tmp_path}/runs/{{run_id}}"
    command[-1:-1] = [*TINY_TRIAL, f"--data.cache_dir={tmp_path / 'cache'}"]
    process = agent_command(tmp_path, monkeypatch, command, {"model.loss.lambda_geo": 2}, "trial7")
    assert process.wait() == 0
    run = tmp_path / "runs" / "trial7"
    assert (run / "outputs" / "demo" / "stage1.ckpt").is_file()
    log = next(run.rglob("run-trial7.wandb"))
    records = list(wandb_records(log))
    history = [
        float(item.value_json)
        for record in records
        if record.WhichOneof("record_type") == "history"
        for item in record.history.item
        if item_key(item) == "val/pck"
    ]
    # the summary W&B computes ({"max": ...}, from define_metric) and the one written at the
    # end of the fit: both the best value
    summaries = [
        json.loads(item.value_json)
        for record in records
        if record.WhichOneof("record_type") == "summary"
        for item in record.summary.update
        if item_key(item) == "val/pck"
    ]
    metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
    config = {
        item_key(item): item.value_json
        for record in records
        if record.WhichOneof("record_type") == "config"
        for item in record.config.update
    }
    values = [value["max"] if isinstance(value, dict) else value for value in summaries]
    assert len(history) == 2 and values == pytest.approx([max(history)] * len(values))
    assert isinstance(summaries[-1], float)  # the explicit best value is the final summary
    assert any(m.name == "val/pck" and m.summary.max for m in metrics)
    assert float(json.loads(config["loss"])["lambda_geo"]) == 2.0


def test_the_paper_grids_have_the_paper_values():
    grids = {p.stem: load_sweep(p).parameters for p in SWEEPS}
    values = [0.1, 2, 5, 7]
    assert grids["cp_cm"] == {"model.model.c_p": values, "model.model.c_m": values}
    windows = [3, 5, 7, 11]
    assert grids["windows"] == {"model.model.window_n": windows, "model.loss.window_m": windows}
    assert list(grids["lambda"]) == ["model.loss.lambda_geo"]
    assert list(grids["lambda_m_sm"]) == ["model.loss.lambda_m", "model.loss.lambda_sm"]


def test_non_grid_sweeps_are_refused_with_the_file_named(tmp_path):
    path = tmp_path / "bayes.yaml"
    path.write_text("method: bayes\nparameters: {model.c_p: {values: [1]}}\ncommand: [${args}]\n")
    with pytest.raises(ConfigError, match="bayes.yaml"):
        load_sweep(path)


@pytest.mark.slow
def test_test_time_grid_scores_one_checkpoint_per_trial(tmp_path, monkeypatch):
    from guided_flow.training.stages import MatchingStage
    from tests.helpers import save_stage_checkpoint
    from tests.test_pf_pascal import INPUT, TEST_HEADER, keypoint_row, write_layout

    monkeypatch.chdir(tmp_path)
    points = [[20, 30], [250, 150], [120, 99]]
    write_layout(
        tmp_path / "pf",
        val=[keypoint_row("2009_000001", "2009_000002", "cat", points, points)],
        val_header=TEST_HEADER,
    )
    save_stage_checkpoint(
        MatchingStage.from_options(backbone="resnet18", weights="none", input_size=INPUT),
        tmp_path / "s2.ckpt",
    )
    spec = yaml.safe_load((REPO / "experiments" / "sweeps" / "cp_cm_test_time.yaml").read_text())
    spec["parameters"] = {"model.c_p": {"values": [2]}, "model.c_m": {"values": [0.1, 5]}}
    spec["command"] = [
        token.replace("experiments/", f"{REPO}/experiments/") for token in spec["command"]
    ]
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(spec))
    extra = ["--ckpt_path=s2.ckpt", "--data.root=pf", "--data.cache_dir=cache"]
    assert main(["sweep", "grid.yaml", "--out", "grid", "--", *extra, "--data.num_workers=0"]) == 0
    rows = list(csv.DictReader((tmp_path / "grid" / "sweep_summary.csv").open()))
    assert [row["model.c_m"] for row in rows] == ["0.1", "5"]
    for row in rows:
        assert 0.0 <= float(row["test/pck"]) <= 1.0
        run = json.loads(next((tmp_path / "grid" / row["trial"]).rglob("run.json")).read_text())
        assert run["test_time_overrides"] == {"c_p": 2, "c_m": float(row["model.c_m"])}
