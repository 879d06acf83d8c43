"""The steps of matching one pair that ``guided-flow match`` (:mod:`guided_flow.cli.match`) and
``guided-flow match --pairs`` (:mod:`guided_flow.cli.match_batch`) share: load the matcher, read
the source keypoints, write the result files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from guided_flow.api import GuidedSemanticFlow, MatchResult, apply_preset, as_points, warp_source
from guided_flow.errors import ConfigError, DataError
from guided_flow.io.atomic import write_json
from guided_flow.io.flow_files import write_flo, write_flow_npy
from guided_flow.viz.drawing import draw_matches, flow_picture, save_png
from guided_flow.viz.match_page import write_match_page

UNTRAINED_NOTE = (
    "note: no --ckpt given: running the untrained method on the embedded ImageNet "
    "EfficientNet-Lite0 backbone (tau = S, the guided soft-argmax, no learned weights); pass a "
    "trained checkpoint with "
    "--ckpt for the trained networks"
)


def load_matcher(args: argparse.Namespace) -> GuidedSemanticFlow:
    """The matcher of ``--ckpt``, ``--input-size``, ``--preset`` and ``--device``, saying which
    on stdout. Without ``--preset`` the untrained method takes the default preset and a
    checkpoint keeps its own test-time options."""
    if args.ckpt is None:
        print(UNTRAINED_NOTE)
        size = 320 if args.input_size is None else args.input_size
        preset = "default" if args.preset is None else args.preset
        return GuidedSemanticFlow.untrained(input_size=size, device=args.device, preset=preset)
    if args.input_size is not None:
        raise ConfigError("--input-size applies without --ckpt only: a checkpoint fixes its own")
    matcher = GuidedSemanticFlow.from_checkpoint(args.ckpt, map_location=args.device)
    if args.preset is not None:
        apply_preset(matcher.model, args.preset)
    print(f"using the trained networks of {args.ckpt}")
    return matcher


def read_keypoints(path: str | Path) -> np.ndarray:
    """Source keypoints from a JSON file (``[[x, y], ...]`` or ``{"keypoints": [[x, y], ...]}``,
    original pixels) as ``K x 2`` float64. Raises :class:`DataError` naming the file."""
    try:
        content = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path}: cannot read the keypoints JSON ({error})") from error
    if isinstance(content, dict):
        if "keypoints" not in content:
            raise DataError(f'{path}: a keypoints object needs a "keypoints" list')
        content = content["keypoints"]
    try:
        return as_points(content)
    except ValueError as error:
        raise DataError(f"{path}: {error}") from error


def write_results(
    out_dir: Path,
    source: np.ndarray,
    target: np.ndarray,
    result: MatchResult,
    source_kps: np.ndarray | None,
) -> list[str]:
    """Write the result files (listed in :mod:`guided_flow.cli.match`) atomically into
    ``out_dir``; ``source`` and
    ``target`` are the ``H x W x 3`` uint8 pictures. Returns the names written. The matches
    picture is dropped before the warped picture and the flow colours (kept for the page) are
    made, so that a big pair never holds all three."""
    save_png(out_dir / "matches.png", draw_matches(source, target, *result.confident_matches))
    write_flow_npy(out_dir / "flow_s2t.npy", result.flow_s2t)
    write_flo(out_dir / "flow_s2t.flo", result.flow_s2t)
    warped = warp_source(source, result.flow_t2s)
    save_png(out_dir / "warped.png", warped)
    colours = flow_picture(result.flow_s2t)
    save_png(out_dir / "flow.png", colours)
    names = ["warped.png", "flow_s2t.npy", "flow_s2t.flo", "flow.png", "matches.png"]
    if source_kps is not None:
        assert result.keypoints is not None  # the result of matching with source_kps
        write_json(
            str(out_dir / "keypoints.json"),
            {"source_kps": source_kps.tolist(), "target_kps": result.keypoints.tolist()},
        )
        names.append("keypoints.json")
    write_match_page(
        out_dir / "index.html",
        source,
        target,
        result.flow_input,
        result.confident_matches,
        colours,
        warped,
        source_kps,
        result.keypoints,
    )
    return [*names, "index.html"]
