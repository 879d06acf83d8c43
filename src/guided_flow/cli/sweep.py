"""``guided-flow sweep FILE [--base-config CFG] [--out DIR] [-- EXTRA_ARGS...]``: run a W&B grid
sweep definition locally, without a server.

Each trial is a fresh ``guided-flow`` process started in the directory the sweep was started
from, so every relative input (the config, ``--model.init_checkpoint``, ``--data.root``, the
HDF5 ``cache_dir`` that all trials share, extra arguments) means what it means there. Its outputs
go under its own run folder ``DIR/<trial name>/`` (``--run_dir``: checkpoints, logs, W&B files),
so no two trials share a file. A trial whose ``summary.json`` exists is finished and skipped, so
an interrupted sweep resumes where it stopped. At the end ``DIR/sweep_summary.csv`` holds one row
per trial (the swept values and the best value of the sweep's metric) and ``DIR/heatmap.png``
the metric over the first two swept parameters, rows by the first, columns by the second, as in
the paper's tables.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from guided_flow.errors import ConfigError
from guided_flow.io.atomic import atomic_open

DEFAULT_METRIC = "val/pck"


@dataclass(frozen=True)
class SweepDefinition:
    """A grid sweep: ``parameters`` maps an option (``model.c_p``) to its values, ``command`` is
    the W&B command template (with ``${args}``), ``metric`` the reported validation metric."""

    path: Path
    parameters: dict[str, list]
    command: list[str]
    metric: str

    def trials(self) -> list[dict[str, object]]:
        """Every combination of the values, the first parameter varying slowest."""
        names = list(self.parameters)
        return [
            dict(zip(names, values, strict=True))
            for values in itertools.product(*self.parameters.values())
        ]


def load_sweep(path: str | os.PathLike) -> SweepDefinition:
    """Read and check a W&B sweep file; ConfigError names the file and the problem."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read the sweep definition ({error})") from error
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a sweep definition is a mapping")
    if spec.get("method") != "grid":
        raise ConfigError(
            f"{path}: method={spec.get('method')!r}; the local runner runs grids only"
        )
    parameters = {}
    for name, entry in (spec.get("parameters") or {}).items():
        if isinstance(entry, dict) and isinstance(entry.get("values"), list) and entry["values"]:
            parameters[name] = entry["values"]
        elif isinstance(entry, dict) and "value" in entry:
            parameters[name] = [entry["value"]]
        else:
            raise ConfigError(f"{path}: parameter {name!r} needs a non-empty 'values' list")
    if not parameters:
        raise ConfigError(f"{path}: no parameters to sweep")
    command = spec.get("command")
    if not isinstance(command, list) or "${args}" not in command:
        raise ConfigError(f"{path}: 'command' must be a list that contains ${{args}}")
    metric = (spec.get("metric") or {}).get("name", DEFAULT_METRIC)
    return SweepDefinition(path, parameters, [str(token) for token in command], metric)


def trial_name(number: int, values: dict[str, object]) -> str:
    """Folder name of a trial: its number and its values, e.g. ``003-c_p=5-c_m=2``."""
    parts = [f"{name.rsplit('.', 1)[-1]}={value}" for name, value in values.items()]
    return "-".join([f"{number:03d}", *parts])


def trial_command(
    sweep: SweepDefinition,
    values: dict[str, object],
    base_config: str | None,
    extra_args: list[str],
    summary_file: Path,
) -> list[str]:
    """The trial's argv: the sweep's command with ``${args}`` expanded the way W&B expands it
    (``--name=value``), ``--config`` replaced by ``base_config``, ``--run_dir`` set to the
    summary file's folder, then ``extra_args`` and the summary file."""
    command: list[str] = []
    tokens = iter(sweep.command)
    for token in tokens:
        if token in ("${env}", "${interpreter}"):
            continue
        if token in ("${program}", "guided-flow"):
            command += [sys.executable, "-m", "guided_flow.cli.main"]
        elif token == "${args}":
            command += [f"--{name}={value}" for name, value in values.items()]
        elif token == "--config":
            config = next(tokens, None)
            if config is None:
                raise ConfigError(f"{sweep.path}: '--config' without a file in 'command'")
            command += ["--config", base_config or config]
        elif token.startswith("--run_dir"):
            if token == "--run_dir":
                next(tokens, None)
        else:
            command.append(token)
    run_dir = os.path.abspath(summary_file.parent)
    return command + extra_args + [f"--run_dir={run_dir}", f"--summary_file={summary_file}"]


def run_sweep(
    sweep: SweepDefinition, out: Path, base_config: str | None, extra_args: list[str]
) -> list[dict[str, object]]:
    """Run every unfinished trial, then write the summary CSV and the heat map. Returns the
    rows of the summary."""
    rows = []
    for number, values in enumerate(sweep.trials()):
        folder = out.resolve() / trial_name(number, values)
        summary_file = folder / "summary.json"
        if not summary_file.exists():
            folder.mkdir(parents=True, exist_ok=True)
            command = trial_command(sweep, values, base_config, extra_args, summary_file)
            print(f"[sweep] trial {number}: {' '.join(command[3:])}", flush=True)
            with open(folder / "trial.log", "w") as log:
                code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
            if code.returncode != 0 or not summary_file.exists():
                print(f"[sweep] trial {number} failed: see {folder / 'trial.log'}", flush=True)
        else:
            print(f"[sweep] trial {number}: finished before, skipped", flush=True)
        metric = None
        if summary_file.exists():
            metric = json.loads(summary_file.read_text()).get(sweep.metric)
        rows.append({"trial": folder.name, **values, sweep.metric: metric})
    write_summary(out / "sweep_summary.csv", rows)
    write_heatmap(out / "heatmap.png", sweep, rows)
    return rows


def write_summary(path: Path, rows: list[dict[str, object]]) -> None:
    """``sweep_summary.csv``: one row per trial, written atomically."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    with atomic_open(path) as handle:
        handle.write(text.getvalue().encode())


def write_heatmap(path: Path, sweep: SweepDefinition, rows: Sequence[Mapping[str, Any]]) -> None:
    """The metric over the first two swept parameters (one row when only one is swept); failed
    trials are blank. ``rows``: as :func:`run_sweep` returns them (JSON values)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(sweep.parameters)
    row_name, col_name = names[0], names[1] if len(names) > 1 else None
    row_values = sweep.parameters[row_name]
    col_values = sweep.parameters[col_name] if col_name else [""]
    grid = np.full((len(row_values), len(col_values)), np.nan)
    for row in rows:
        if row[sweep.metric] is None:
            continue
        r = row_values.index(row[row_name])
        c = col_values.index(row[col_name]) if col_name else 0
        grid[r, c] = float(row[sweep.metric])
    figure, axes = plt.subplots(figsize=(1.2 * len(col_values) + 2, 0.8 * len(row_values) + 1.5))
    image = axes.imshow(grid, cmap="viridis")
    axes.set_xticks(range(len(col_values)), [str(v) for v in col_values])
    axes.set_yticks(range(len(row_values)), [str(v) for v in row_values])
    axes.set_xlabel(col_name or "")
    axes.set_ylabel(row_name)
    for (r, c), value in np.ndenumerate(grid):
        if np.isfinite(value):
            axes.text(c, r, f"{100 * value:.1f}", ha="center", va="center", color="white")
    axes.set_title(f"{sweep.metric} (%)")
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    with atomic_open(path) as handle:
        handle.write(buffer.getvalue())


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``guided-flow sweep`` (arguments after ``--`` go to every trial)."""
    parser = argparse.ArgumentParser(
        prog="guided-flow sweep",
        usage="guided-flow sweep FILE [--base-config CFG] [--out DIR] [-- EXTRA_ARGS...]",
        description="Run a W&B grid sweep definition locally, each trial a fresh run.",
    )
    parser.add_argument("file", help="a W&B sweep definition (method: grid)")
    parser.add_argument(
        "--base-config", help="replaces the --config of the sweep's command (same stage)"
    )
    parser.add_argument("--out", help="folder of the trials (default: outputs/sweeps/<FILE stem>)")
    return parser


def main(argv: list[str]) -> int:
    """Console entry: ``guided-flow sweep FILE [--base-config CFG] [--out DIR] [-- EXTRA...]``."""
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    args = build_parser().parse_args(argv)
    sweep = load_sweep(args.file)
    out = Path(args.out or Path("outputs/sweeps") / Path(args.file).stem)
    rows = run_sweep(sweep, out, args.base_config, extra)
    failed = [row["trial"] for row in rows if row[sweep.metric] is None]
    print(f"[sweep] {len(rows) - len(failed)}/{len(rows)} trials done: {out / 'sweep_summary.csv'}")
    return 1 if failed else 0
