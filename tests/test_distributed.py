"""Two processes (DDP on the CPU) give the numbers of one, each pair counted once."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from guided_flow.training.stages import MatchingStage
from tests.helpers import save_stage_checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "experiments" / "demo_stage2.yaml")


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "guided_flow.cli.main", *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _processes(count: int) -> list[str]:
    strategy = "ddp" if count > 1 else "auto"
    return [
        f"--trainer.devices={count}",
        f"--trainer.strategy={strategy}",
        "--trainer.accelerator=cpu",
    ]


@pytest.mark.slow
def test_test_metrics_of_two_processes_equal_one(tmp_path):
    stage = MatchingStage.from_options(input_size=160)
    save_stage_checkpoint(stage, tmp_path / "stage2.ckpt")
    results = {}
    for count in (1, 2):
        args = [
            "test",
            "--config",
            CONFIG,
            "--ckpt_path=stage2.ckpt",
            f"--results_dir=results{count}",
            "--data.cache_dir=cache",
            "--data.test_pairs=5",  # odd: the distributed sampler pads one pair
            "--data.batch_size=2",
            "--trainer.logger=false",
        ]
        _run(args + _processes(count), tmp_path)
        results[count] = json.loads((tmp_path / f"results{count}" / "metrics.json").read_text())
    one, two = results[1], results[2]
    assert one["pairs"] == two["pairs"] == 5
    for predictor in ("identity", "argmax", "guidance", "gsf"):
        for key, value in one[predictor].items():
            tolerance = 1e-4 if key == "epe_px" else 1e-6
            assert abs(value - two[predictor][key]) <= tolerance, (predictor, key)
    caches = list((tmp_path / "cache").iterdir())
    assert len(caches) == 1 and caches[0].suffix == ".h5", caches


@pytest.mark.slow
def test_fit_with_two_processes(tmp_path):
    args = [
        "fit",
        "--config",
        str(REPO / "experiments" / "demo.yaml"),
        "--trainer.fast_dev_run=true",
        "--model.model.input_size=160",
        "--data.batch_size=2",
        "--data.val_pairs=4",
        "--data.cache_dir=cache",
    ]
    _run(args + _processes(2), tmp_path)
