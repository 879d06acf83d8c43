"""Many pairs: one ``guided-flow match`` per pair against one ``guided-flow match --pairs`` run
(a benchmark, not a test).

``python benchmarks/batch_match.py [--pairs 8] [--threads 2] [--batch-size 8] [--input-size 320]
[--out JSON]`` (default ``benchmarks/results/batch_match.json``)

It writes ``--pairs`` pairs of scikit-image photographs (JPEG, quality 90, 300 x 451 to
427 x 640) and a pairs CSV to a temporary folder, then times, through the console script as a
user runs it, wall clock end to end:

- ``single``: ``guided-flow match SOURCE TARGET --out DIR/<i>`` once per pair, one after the
  other (each pays the start-up and the model loading);
- ``batch``: ``guided-flow match --pairs pairs.csv --out DIR`` once (the same files per pair,
  plus thumbnails, ``pair.json`` and the overview page).

It stores seconds per pair each way and their ratio (``batch / single``), with the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

from guided_flow.io.atomic import write_json

RESULTS = Path(__file__).resolve().parent / "results" / "batch_match.json"
SCRIPT = Path(sys.executable).with_name("guided-flow")
PHOTOGRAPHS = ("chelsea", "coffee", "astronaut", "rocket", "immunohistochemistry", "camera")


def write_pairs(folder: Path, count: int) -> Path:
    """``count`` pairs of photographs as JPEG files under ``folder`` and their ``pairs.csv``:
    pair i matches photograph i to photograph i + 1 (cyclically)."""
    names = []
    for name in PHOTOGRAPHS:
        picture = np.asarray(getattr(data, name)())
        if picture.ndim == 2:
            picture = np.repeat(picture[..., None], 3, axis=2)
        Image.fromarray(picture[..., :3]).save(folder / f"{name}.jpg", quality=90)
        names.append(f"{name}.jpg")
    rows = [f"{names[i % len(names)]},{names[(i + 1) % len(names)]}" for i in range(count)]
    path = folder / "pairs.csv"
    path.write_text("source,target\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return path


def timed(command: list[str], env: dict[str, str]) -> float:
    """Run ``command``; its wall-clock seconds (raises when it fails)."""
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="number of pairs (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="--batch-size of the run")
    parser.add_argument("--input-size", type=int, default=320, help="network input side")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    args = parser.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    common = ["--input-size", str(args.input_size), "--device", "cpu"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        csv_path = write_pairs(folder, args.pairs)
        rows = [line.split(",") for line in csv_path.read_text().splitlines()[1:]]
        single = 0.0
        for i, (source, target) in enumerate(rows):
            command = [str(SCRIPT), "match", str(folder / source), str(folder / target)]
            single += timed([*command, "--out", str(folder / "single" / str(i)), *common], env)
            print(f"single {i + 1}/{len(rows)}: {single:.1f} s so far", flush=True)
        batch_command = [str(SCRIPT), "match", "--pairs", str(csv_path), "--out"]
        batch_command += [str(folder / "batch"), "--batch-size", str(args.batch_size), *common]
        batch = timed(batch_command, env)
    result = {
        "command": "python benchmarks/batch_match.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU ({args.threads} "
        "threads)",
        "pairs": args.pairs,
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "single_seconds_per_pair": round(single / args.pairs, 3),
        "batch_seconds_per_pair": round(batch / args.pairs, 3),
        "batch_pairs_per_second": round(args.pairs / batch, 3),
        "single_total_seconds": round(single, 2),
        "batch_total_seconds": round(batch, 2),
        "ratio_batch_to_single": round(batch / single, 3),
    }
    write_json(args.out, result)
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
