"""Interrupted runs: a fit killed with SIGKILL and restarted with `--ckpt_path last` completes
with the metrics of an uninterrupted run; two seeded deterministic runs agree exactly."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, last_every: dict) -> Path:
    """demo.yaml made tiny: 160 px, 2 steps per epoch, 2 epochs, validation every epoch, and a
    `last.ckpt` written as ``last_every`` says (it does not change the training itself)."""
    config = yaml.safe_load((REPO / "experiments" / "demo.yaml").read_text())
    config["data"]["init_args"].update(
        batch_size=2, train_pairs_per_epoch=4, val_pairs=2, cache_dir=str(tmp_path / "cache")
    )
    config["model"]["init_args"]["input_size"] = 160
    config["trainer"].update(
        max_steps=-1,
        max_epochs=2,
        val_check_interval=None,
        check_val_every_n_epoch=1,
        logger=False,
        deterministic=True,
        enable_progress_bar=False,
    )
    config["trainer"]["callbacks"] = [
        {
            "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
            "init_args": {"save_last": "link", "save_top_k": 1, **last_every},
        }
    ]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(config: Path, cwd: Path, name: str, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "guided_flow.cli.main", "fit", "--config", str(config)]
    command += [f"--trainer.default_root_dir={cwd / name}", f"--summary_file={cwd / name}.json"]
    log = open(cwd / f"{name}.log", "w")
    return subprocess.Popen([*command, *extra], cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


def _finish(process: subprocess.Popen, cwd: Path, name: str) -> dict:
    assert process.wait(timeout=600) == 0, (cwd / f"{name}.log").read_text()[-3000:]
    return json.loads((cwd / f"{name}.json").read_text())


def _last_checkpoint(root: Path) -> Path | None:
    found = list(root.glob("**/last.ckpt"))
    return found[0] if found else None


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The final metrics of an uninterrupted seeded run."""
    tmp_path = tmp_path_factory.mktemp("reference")
    config = _config(tmp_path, {"every_n_epochs": 1})
    return _finish(_fit(config, tmp_path, "reference"), tmp_path, "reference")


@pytest.mark.slow
@pytest.mark.parametrize(
    "last_every, tolerance",
    [({"every_n_epochs": 1}, 0.0), ({"every_n_train_steps": 1}, 0.01)],
    ids=["killed-between-epochs", "killed-mid-epoch"],
)
def test_sigkill_then_resume_from_last(tmp_path, reference, last_every, tolerance):
    config = _config(tmp_path, last_every)
    interrupted = _fit(config, tmp_path, "interrupted")
    deadline = time.monotonic() + 300
    while _last_checkpoint(tmp_path / "interrupted") is None:
        assert interrupted.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os.kill(interrupted.pid, signal.SIGKILL)
    interrupted.wait()
    assert not (tmp_path / "interrupted.json").exists()
    assert not list((tmp_path / "interrupted").glob("**/*.tmp*")), "no half-written checkpoint"
    resumed = _finish(
        _fit(config, tmp_path, "interrupted", "--ckpt_path=last"), tmp_path, "interrupted"
    )
    assert resumed["epoch"] == reference["epoch"] == 1 and resumed["step"] == reference["step"]
    assert abs(resumed["val/pck"] - reference["val/pck"]) <= tolerance
    if tolerance == 0.0:
        assert resumed == reference


@pytest.mark.slow
def test_two_seeded_deterministic_runs_give_identical_metrics(tmp_path, reference):
    config = _config(tmp_path, {"every_n_epochs": 1})
    assert _finish(_fit(config, tmp_path, "again"), tmp_path, "again") == reference
