"""Hyper-parameter grids: the local runner end to end, and the W&B sweep files."""

import csv
import os
from pathlib import Path

import pytest
import yaml

from guided_flow.cli import main, run_lightning
from guided_flow.errors import ConfigError
from guided_flow.sweep import load_sweep

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))
TINY_TRIAL = [
    "--model.input_size=160",
    "--data.batch_size=2",
    "--data.train_pairs_per_epoch=4",
    "--data.val_pairs=2",
    "--trainer.max_epochs=1",
    "--trainer.max_steps=-1",
    "--trainer.val_check_interval=null",
    "--trainer.check_val_every_n_epoch=1",
    "--trainer.limit_val_batches=1",
    "--trainer.logger=CSVLogger",
    "--trainer.logger.save_dir=logs",
]


@pytest.mark.slow
def test_two_by_two_grid_on_the_embedded_default_runs_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
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
    out = tmp_path / "grid"
    base = str(REPO / "experiments" / "demo.yaml")
    cache = f"--data.cache_dir={tmp_path / 'cache'}"
    args = ["sweep", str(sweep_file), "--base-config", base, "--out", str(out), "--"]
    assert main(args + TINY_TRIAL + [cache]) == 0
    trials = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert trials == [
        "000-c_p=2-rho=0.8",
        "001-c_p=2-rho=0.9",
        "002-c_p=5-rho=0.8",
        "003-c_p=5-rho=0.9",
    ]
    rows = list(csv.DictReader((out / "sweep_summary.csv").open()))
    assert len(rows) == 4 and list(rows[0]) == ["trial", "model.c_p", "model.rho", "val/pck"]
    assert all(0.0 <= float(row["val/pck"]) <= 1.0 for row in rows)
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stamps = {t: os.path.getmtime(out / t / "summary.json") for t in trials}
    assert main(args + TINY_TRIAL + [cache]) == 0  # rerun: every trial is skipped
    assert stamps == {t: os.path.getmtime(out / t / "summary.json") for t in trials}


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_wandb_sweep_files_name_options_the_cli_accepts(path):
    sweep = load_sweep(path)
    spec = yaml.safe_load(path.read_text())
    assert spec["method"] == "grid" and "${args}" in spec["command"]
    config = spec["command"][spec["command"].index("--config") + 1]
    first = {name: values[0] for name, values in sweep.parameters.items()}
    args = [f"--{name}={value}" for name, value in first.items()]
    # the parser itself must accept each swept option (a wrong name exits with code 2)
    with pytest.raises(SystemExit) as accepted:
        run_lightning(["fit", "--config", str(REPO / config), *args, "--print_config"])
    assert accepted.value.code == 0
    with pytest.raises(SystemExit) as refused:
        run_lightning(["fit", "--config", str(REPO / config), "--model.no_such_option=1"])
    assert refused.value.code != 0


def test_the_paper_grids_have_the_paper_values():
    grids = {p.stem: load_sweep(p).parameters for p in SWEEPS}
    assert grids["cp_cm"] == {"model.c_p": [0.1, 2, 5, 7], "model.c_m": [0.1, 2, 5, 7]}
    assert grids["windows"] == {"model.window_n": [3, 5, 7, 11], "model.window_m": [3, 5, 7, 11]}
    assert list(grids["lambda"]) == ["model.lambda_geo"]
    assert list(grids["lambda_m_sm"]) == ["model.lambda_m", "model.lambda_sm"]


def test_non_grid_sweeps_are_refused_with_the_file_named(tmp_path):
    path = tmp_path / "bayes.yaml"
    path.write_text("method: bayes\nparameters: {model.c_p: {values: [1]}}\ncommand: [${args}]\n")
    with pytest.raises(ConfigError, match="bayes.yaml"):
        load_sweep(path)
