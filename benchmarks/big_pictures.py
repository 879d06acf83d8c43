"""Memory and time of matching big pictures on the CPU (a benchmark, not a test).

``python benchmarks/big_pictures.py [--sizes 6000x4000 300x200] [--threads 2] [--out JSON]
[--label NAME] [--code DIR]`` (runs are stored by label in ``--out``, default
``benchmarks/results/big_pictures.json``; ``--code`` measures the package of another checkout,
e.g. the last release unpacked by ``git archive``, for a before / after comparison)

For each size (width x height) it writes a pair of JPEG photographs-like pictures (smooth colour
fields with fine texture, quality 90) and measures, each in a fresh child process so that its peak
resident memory (``ru_maxrss``) is its own:

- ``cli``: ``guided-flow match SOURCE TARGET --out DIR`` (the untrained method, 320 px input)
  through the console entry point, end to end: wall time and peak RSS (torch and OpenCV get
  ``--threads`` threads);
- ``api``: ``GuidedSemanticFlow().match(source_path, target_path)``, the Python API on the files;
- ``stages``: the steps of the command one after the other, each timed: ``setup`` (building the
  model), ``decode`` (reading both files in full), ``network`` (``match`` on the two pictures
  already resized to the input: the 320 px network alone), ``match`` (``match`` on the full
  pictures: the network, the resizing to its input and the flows and confidence at full
  resolution), ``warp`` (the source warped onto the target), ``draw`` (flow colours and the
  matches picture) and ``files`` (the PNGs, ``.npy``, ``.flo`` and the page). ``beyond`` is the
  work past decoding and the network: ``match - network + warp + draw``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from guided_flow.io.atomic import write_json

RESULTS = Path(__file__).resolve().parent / "results" / "big_pictures.json"
MODES = ("stages", "api", "cli")


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A ``height x width`` RGB picture: a smooth random colour field (bicubic from 12 x 8) with
    fine noise, so that the JPEG costs what a photograph costs to decode."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8))
    field = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC))
    noise = rng.integers(-12, 13, (height, width, 1), dtype=np.int16)
    return Image.fromarray(np.clip(field + noise, 0, 255).astype(np.uint8))


def write_pair(folder: Path, width: int, height: int) -> tuple[Path, Path]:
    """The pair's two JPEG files under ``folder`` (written once)."""
    paths = folder / f"source_{width}x{height}.jpg", folder / f"target_{width}x{height}.jpg"
    for seed, path in enumerate(paths):
        if not path.exists():
            picture(width, height, seed).save(path, quality=90)
    return paths


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(mode: str, source: str, target: str, out: str) -> dict[str, float]:
    """Run one mode (module docstring) in this process; returns its timings in seconds and its
    peak RSS in MB."""
    if mode == "cli":
        start = time.perf_counter()
        from guided_flow.cli.commands import main as console  # the console script

        console(["match", source, target, "--out", out, "--device", "cpu"])
        return {"total": time.perf_counter() - start, "peak_rss_mib": peak_rss_mib()}
    from guided_flow.api import GuidedSemanticFlow, as_rgb, warp_source
    from guided_flow.cli import match as match_command
    from guided_flow.io.images import resize_image
    from guided_flow.viz.drawing import draw_matches, flow_picture

    times: dict[str, float] = {}
    start = time.perf_counter()
    matcher = GuidedSemanticFlow.untrained()
    times["setup"] = time.perf_counter() - start
    if mode == "api":
        start = time.perf_counter()
        result = matcher.match(source, target)
        times["match"] = time.perf_counter() - start
        times["flow_shape"] = list(result.flow_s2t.shape)  # type: ignore[assignment]
        return {**times, "peak_rss_mib": peak_rss_mib()}

    def timed(name: str, function, *args):  # noqa: ANN001, ANN202 - a timing helper
        begin = time.perf_counter()
        value = function(*args)
        times[name] = time.perf_counter() - begin
        return value

    source_rgb, target_rgb = timed("decode", lambda: (as_rgb(source), as_rgb(target)))
    small = [resize_image(rgb, matcher.input_size) for rgb in (source_rgb, target_rgb)]
    timed("network", matcher.match, *small)
    result = timed("match", matcher.match, source_rgb, target_rgb)
    warped = timed("warp", warp_source, source_rgb, result.flow_t2s)
    colours, _ = timed(
        "draw",
        lambda: (
            flow_picture(result.flow_s2t),
            draw_matches(source_rgb, target_rgb, *result.confident_matches),
        ),
    )
    del warped, colours
    timed("files", match_command.write_results, Path(out), source_rgb, target_rgb, result, None)
    # write_results warps and draws again: the files alone are what it adds to warp and draw.
    times["files"] -= times["warp"] + times["draw"]
    times["beyond"] = times["match"] - times["network"] + times["warp"] + times["draw"]
    return {**times, "peak_rss_mib": peak_rss_mib()}


def measure(
    mode: str, source: Path, target: Path, out: Path, threads: int, code: Path | None
) -> dict:
    """Run :func:`child` in a fresh process (on the package under ``code`` when given) and return
    what it reports."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if code is not None:
        environment["PYTHONPATH"] = os.pathsep.join((str(code / "src"), str(code)))
    command = [sys.executable, __file__, "--child", mode, str(source), str(target), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["6000x4000", "300x200"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--label", default="after", help="the run's name in --out")
    parser.add_argument("--code", type=Path, help="a checkout whose package to measure")
    parser.add_argument("--child", nargs=4, metavar=("MODE", "SOURCE", "TARGET", "OUT"))
    args = parser.parse_args()
    if args.child:
        import cv2
        import torch

        threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
        print(json.dumps(child(*args.child)))
        return
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            width, height = (int(side) for side in size.split("x"))
            source, target = write_pair(Path(folder), width, height)
            runs[size] = {}
            for mode in args.modes:
                out = Path(folder) / f"out_{size}_{mode}"
                runs[size][mode] = measure(mode, source, target, out, args.threads, args.code)
                rounded = {
                    k: round(v, 2) if isinstance(v, float) else v
                    for k, v in runs[size][mode].items()
                }
                runs[size][mode] = rounded
                print(size, mode, rounded, flush=True)
    stored = json.loads(args.out.read_text()) if args.out.exists() else {}
    stored[args.label] = {
        "command": " ".join(["python benchmarks/big_pictures.py", *sys.argv[1:]]),
        "machine": f"{os.cpu_count()} CPU cores, {args.threads} torch threads, no GPU",
        "loadavg": [round(v, 2) for v in os.getloadavg()],
        "sizes": runs,
    }
    write_json(args.out, stored)


if __name__ == "__main__":
    main()
