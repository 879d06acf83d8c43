"""``guided-flow match SOURCE TARGET [--ckpt CKPT] [--kps SOURCE_KPS.json] --out DIR``: match two
pictures of any size and write, in their original pixels:

- ``warped.png``: the source warped onto the target (target size);
- ``flow_s2t.npy`` and ``flow_s2t.flo``: ``H_source x W_source x 2`` float32, for each source
  pixel the (dx, dy) in pixels to its match in the target;
- ``flow.png``: ``flow_s2t`` in flow colours (source size);
- ``matches.png``: the confident matches (Q' > rho) drawn on the pair side by side;
- ``keypoints.json`` (with ``--kps``): ``{"source_kps": [[x, y], ...], "target_kps": [...]}``;
- ``index.html``: one self-contained interactive page (no server, no network): point at the
  source to see the match on the target, toggles for the confident matches, the flow colours and
  the keypoints, a blend slider of the warped source over the target; its
  ``window.guidedFlow.transfer(x, y)`` transfers a point exactly as keypoint transfer does.

The keypoint file holds ``[[x, y], ...]`` or ``{"keypoints": [[x, y], ...]}`` in original source
pixels. Without ``--ckpt`` the untrained method runs on the embedded ImageNet backbone.

``guided-flow match --pairs PAIRS.csv --out DIR [--batch-size N]`` matches every row of a CSV
with one model, each pair into its own folder, with an overview page
(:mod:`guided_flow.cli.match_batch`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from guided_flow.api import PRESETS, as_rgb
from guided_flow.cli.match_batch import run_batch
from guided_flow.cli.match_steps import (  # noqa: F401 (UNTRAINED_NOTE re-exported)
    UNTRAINED_NOTE,
    load_matcher,
    read_keypoints,
    write_results,
)
from guided_flow.errors import ConfigError, DataError
from guided_flow.io.images import DEFAULT_MAX_PIXELS


def build_parser() -> argparse.ArgumentParser:
    """The command's options."""
    parser = argparse.ArgumentParser(
        prog="guided-flow match",
        description="Dense semantic flow between two pictures of any size, in original pixels.",
    )
    parser.add_argument("source", metavar="SOURCE", nargs="?", help="source image file")
    parser.add_argument("target", metavar="TARGET", nargs="?", help="target image file")
    parser.add_argument(
        "--pairs",
        metavar="PAIRS.csv",
        help="match many pairs instead: a CSV with the header source,target[,kps] (paths "
        "absolute or relative to the CSV); each pair goes to DIR/<row>_<source stem>_<target "
        "stem>/, with DIR/index.html listing them and DIR/failures.csv the pairs that failed",
    )
    parser.add_argument(
        "--batch-size",
        type=batch_size,
        default=8,
        metavar="N",
        help="with --pairs: pairs per network batch (default 8)",
    )
    parser.add_argument(
        "--ckpt", metavar="CKPT", help="guided-flow checkpoint (default: the untrained method)"
    )
    parser.add_argument(
        "--kps",
        metavar="SOURCE_KPS.json",
        help='source keypoints in original pixels: [[x, y], ...] or {"keypoints": [[x, y], ...]}',
    )
    parser.add_argument(
        "--out", metavar="DIR", required=True, help="folder for the results (created)"
    )
    parser.add_argument(
        "--input-size",
        type=int,
        help="network input side in pixels for the untrained method (default 320); a "
        "checkpoint fixes its own",
    )
    parser.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        help="test-time options: 'default' (guidance chosen by Hough voting; the untrained "
        "method's default) or 'fast' (0.2's default); default: a checkpoint's own",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda when available, else cpu)",
    )
    parser.add_argument(
        "--max-pixels",
        type=pixel_limit,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help=f"refuse pictures of more than N pixels (default {DEFAULT_MAX_PIXELS}, Pillow's "
        "decompression-bomb limit); 0 for no limit",
    )
    return parser


def pixel_limit(text: str) -> int | None:
    """``--max-pixels``: a whole number of pixels, 0 for no limit (None)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels >= 0, got {text!r}")
    return value or None


def batch_size(text: str) -> int:
    """``--batch-size``: a whole number of pairs >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of pairs >= 1, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    """Run ``guided-flow match``; errors in the inputs raise
    :class:`~guided_flow.errors.GuidedFlowError` subclasses naming the file (the console entry
    point prints them on one line and exits with code 2)."""
    args = build_parser().parse_args(argv)
    if args.pairs is not None:
        return run_batch(args)
    if args.source is None or args.target is None:
        raise ConfigError("give SOURCE and TARGET, or --pairs PAIRS.csv for many pairs")
    source, target = as_rgb(args.source, args.max_pixels), as_rgb(args.target, args.max_pixels)
    source_kps = None if args.kps is None else read_keypoints(args.kps)
    matcher = load_matcher(args)
    result = matcher.match(source, target, source_kps)
    out_dir = Path(args.out)
    try:
        names = write_results(out_dir, source, target, result, source_kps)
    except OSError as error:
        raise DataError(f"{out_dir}: cannot write the results ({error})") from error
    count = len(result.confident_matches[0])
    print(f"wrote {', '.join(names)} to {out_dir} ({count} confident matches)")
    return 0
