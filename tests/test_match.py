"""``guided-flow match``: the files it writes, through the real console script, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from guided_flow.cli import main as cli
from guided_flow.io.flow_files import read_flo
from guided_flow.training.stages import MatchingStage
from tests.helpers import save_stage_checkpoint
from tests.test_api import shifted_flow, textured_image, write_shifted_checkpoint

SCRIPT = Path(sys.executable).with_name("guided-flow")
FAST = ("--input-size", "160")  # the untrained method on a small input, to stay quick on a CPU


def run_script(*args: object) -> subprocess.CompletedProcess:
    """Run ``guided-flow match ARGS`` as a user would."""
    command = [str(SCRIPT), "match", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def save(tmp_path: Path, name: str, image: np.ndarray) -> Path:
    path = tmp_path / name
    Image.fromarray(image).save(path)
    return path


def check_outputs(
    out: Path, source: np.ndarray, target: np.ndarray, kps: list | None = None
) -> np.ndarray:
    """Check every file ``match`` writes for the pair; returns ``flow_s2t`` (``H_s x W_s x 2``)."""
    (hs, ws), (ht, wt) = source.shape[:2], target.shape[:2]
    expected = {"warped.png", "flow_s2t.npy", "flow_s2t.flo", "flow.png", "matches.png"}
    expected.add("index.html")
    if kps is not None:
        expected.add("keypoints.json")
    assert {path.name for path in out.iterdir()} == expected  # no temporary files left
    flow = np.load(out / "flow_s2t.npy")
    assert flow.shape == (hs, ws, 2) and flow.dtype == np.float32
    assert np.isfinite(flow).all()
    np.testing.assert_array_equal(read_flo(out / "flow_s2t.flo"), flow)
    sizes = {
        name: Image.open(out / name).size for name in ("warped.png", "flow.png", "matches.png")
    }
    assert sizes == {
        "warped.png": (wt, ht),
        "flow.png": (ws, hs),
        "matches.png": (ws + wt, max(hs, ht)),
    }
    if kps is not None:
        content = json.loads((out / "keypoints.json").read_text())
        assert set(content) == {"source_kps", "target_kps"}
        np.testing.assert_allclose(content["source_kps"], kps)
        target_kps = np.asarray(content["target_kps"])
        assert target_kps.shape == (len(kps), 2) and np.isfinite(target_kps).all()
    return flow


@pytest.mark.slow
def test_match_on_two_generated_images(tmp_path):
    source, target = textured_image(120, 200, seed=1), textured_image(150, 90, seed=2)
    kps = [[10.0, 20.0], [199.0, 119.0], [64.5, 80.25]]
    (tmp_path / "kps.json").write_text(json.dumps(kps))
    result = run_script(
        save(tmp_path, "source.png", source),
        save(tmp_path, "target.png", target),
        "--kps",
        tmp_path / "kps.json",
        "--out",
        tmp_path / "out",
        *FAST,
    )
    assert result.returncode == 0, result.stderr
    assert "untrained" in result.stdout
    check_outputs(tmp_path / "out", source, target, kps)


@pytest.mark.slow
def test_match_on_two_photographs(tmp_path):
    source, target = skdata.chelsea(), skdata.coffee()  # 300 x 451 and 400 x 600
    kps = [[150.0, 100.0], [300.0, 180.0]]
    (tmp_path / "kps.json").write_text(json.dumps({"keypoints": kps}))
    result = run_script(
        save(tmp_path, "cat.jpg", source),
        save(tmp_path, "coffee.png", target),
        "--kps",
        tmp_path / "kps.json",
        "--out",
        tmp_path / "out",
        *FAST,
    )
    assert result.returncode == 0, result.stderr
    check_outputs(tmp_path / "out", source, target, kps)


@pytest.mark.slow
def test_the_identity_pair_gives_no_flow(tmp_path):
    image = skdata.astronaut()[:, :400]
    path = save(tmp_path, "astronaut.png", image)
    kps = [[100.0, 200.0], [350.5, 20.0]]
    (tmp_path / "kps.json").write_text(json.dumps(kps))
    result = run_script(
        path, path, "--kps", tmp_path / "kps.json", "--out", tmp_path / "out", *FAST
    )
    assert result.returncode == 0, result.stderr
    flow = check_outputs(tmp_path / "out", image, image, kps)
    np.testing.assert_allclose(flow, 0.0, atol=0.05)  # the weight-free default, refined S
    content = json.loads((tmp_path / "out" / "keypoints.json").read_text())
    np.testing.assert_allclose(content["target_kps"], kps, atol=0.05)


@pytest.mark.slow
def test_a_checkpoint_runs_its_trained_networks(tmp_path):
    checkpoint = write_shifted_checkpoint(tmp_path / "shifted.ckpt")
    image = textured_image(100, 180)
    path = save(tmp_path, "image.png", image)
    result = run_script(path, path, "--ckpt", checkpoint, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "untrained" not in result.stdout and str(checkpoint) in result.stdout
    flow = check_outputs(tmp_path / "out", image, image)
    np.testing.assert_allclose(flow, np.broadcast_to(shifted_flow(100, 180), flow.shape), atol=1e-3)


@pytest.mark.slow
def test_the_console_script_reports_a_bad_input_on_one_line(tmp_path):
    image = save(tmp_path, "image.png", textured_image(40, 40))
    result = run_script(image, tmp_path / "missing.png", "--out", tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "missing.png" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def _bad_input(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """Arguments of a ``match`` call that must fail, and the file name its message must give."""
    image = str(save(tmp_path, "image.png", textured_image(40, 40)))
    out = ["--out", str(tmp_path / "out")]
    files = {
        "kps_not_json": "{[1, 2]",
        "kps_ragged": "[[1, 2], [3]]",
        "kps_no_key": '{"points": [[1, 2]]}',
        "kps_not_numbers": '[["a", "b"]]',
        "image_not_an_image": "plain text",
    }
    if case in files:
        path = tmp_path / f"{case}.json"
        path.write_text(files[case])
        if case == "image_not_an_image":
            return [image, str(path), *out], path.name
        return [image, image, "--kps", str(path), *out], path.name
    if case == "missing_kps":
        return [image, image, "--kps", str(tmp_path / "gone.json"), *out], "gone.json"
    if case == "missing_image":
        return [str(tmp_path / "gone.png"), image, *out], "gone.png"
    if case == "missing_ckpt":
        return [image, image, "--ckpt", str(tmp_path / "gone.ckpt"), *out], "gone.ckpt"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "kps_not_json",
        "kps_ragged",
        "kps_no_key",
        "kps_not_numbers",
        "image_not_an_image",
        "missing_kps",
        "missing_image",
        "missing_ckpt",
    ],
)
def test_bad_inputs_exit_2_with_one_line_naming_the_file(tmp_path, capsys, case):
    argv, name = _bad_input(tmp_path, case)
    assert cli.main(["match", *argv]) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and name in message, message
    assert not (tmp_path / "out").exists()


def test_input_size_is_refused_with_a_checkpoint(tmp_path, capsys):
    image = str(save(tmp_path, "image.png", textured_image(40, 40)))
    argv = ["match", image, image, "--ckpt", "any.ckpt", "--input-size", "160", "--out", "out"]
    assert cli.main(argv) == 2
    assert "--input-size" in capsys.readouterr().err


@pytest.mark.browser
def test_the_match_page_transfers_points_as_the_flow_file_says(tmp_path, driver):
    # a checkpoint's trained networks and two photographs, as after `make demo`
    checkpoint = save_stage_checkpoint(
        MatchingStage.from_options(input_size=160), tmp_path / "model.ckpt"
    )
    source, target = skdata.astronaut(), skdata.coffee()  # 512 x 512 and 400 x 600
    out = tmp_path / "out"
    args = ["match", save(tmp_path, "s.png", source), save(tmp_path, "t.png", target)]
    assert cli.main([*map(str, args), "--ckpt", str(checkpoint), "--out", str(out)]) == 0
    flow = np.load(out / "flow_s2t.npy")
    driver.get((out / "index.html").as_uri())
    rng = np.random.default_rng(0)
    points = np.stack((rng.integers(0, 512, 12), rng.integers(0, 512, 12)), axis=1)
    points = np.concatenate((points, [[0, 0], [511, 511], [511, 0]]))
    for x, y in points.tolist():
        page = driver.execute_script(
            "return window.guidedFlow.transfer(arguments[0], arguments[1])", x, y
        )
        np.testing.assert_allclose(page, np.array([x, y]) + flow[y, x], atol=0.01)
    resources = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert all(name.startswith(("data:", "file:")) for name in resources)
