"""Does stage 1 do its job? Precision of the confident set, trained against untrained pruning
network, at equal density (a benchmark, not a test).

``python benchmarks/confident_set.py [--stage1 outputs/demo/stage1.ckpt | --weight-free [PRESET]
[--cycle-consistency]] [--willow-root DIR] [--cache-dir DIR] [--out JSON] [--label NAME]``
(runs are stored by label in ``--out``; ``--weight-free`` scores the untrained method of a
preset, by default that of ``GuidedSemanticFlow()``, with the cycle test if asked)

The untrained pruning network keeps Q' = sigmoid(10) Q, so its confident set is {Q > rho}; a
trained one reorders the matches. Comparing the two at rho would mix how many matches survive
with how good they are, so the trained set is taken at the untrained one's density: for each
pair, the threshold on Q' that leaves as many source cells with a confident match as Q > rho
does. Precision is the fraction of confident matches (i, j) whose target cell p_j lies within
one cell of the true match of i:

- on the held-out self-warps of ``experiments/demo.yaml`` (photographs stage 1 never saw), every
  valid source cell, with the dense ground truth;
- on the real pairs of ``--willow-root`` (no stage saw a real pair), the source cells holding a
  keypoint, with the target keypoint as the truth, per class.

On real pairs it also reports the *background share*: the fraction of all confident matches
whose source cell lies outside the box of the source keypoints grown by one cell, for the
untrained set, the trained set at equal density and the trained set at rho (the one the method
uses: Q' > rho), with the trained set's density at rho beside it.

Every run also scores the set that enters G (``guided``): Q' > rho less the matches the cycle
test drops (``cycle_consistency``; the same set as Q' > rho without it), its precision at rho,
its density and, on real pairs, its background share. With ``--weight-free`` this measures what
the weight-free cycle test removes (``untrained`` against ``guided``), and, between the presets,
what voting changes in Q > rho.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
import yaml

from data_modules.pf_willow import PFWillowDataModule
from data_modules.synthetic import SyntheticPairsDataModule
from guided_flow.api import PRESETS, weight_free_config
from guided_flow.io.atomic import write_json
from guided_flow.model.flow_model import GuidedFlowModel
from guided_flow.model.geometry import cell_positions
from guided_flow.model.volumes import confident_mask
from guided_flow.training.stages import PruningStage

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def matched_threshold_set(refined: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The set {Q' > t_b} (``B x J x h x w`` bool) where, per pair b, t_b leaves as many source
    cells with a match as ``reference`` (a bool set) has."""
    b = refined.shape[0]
    counts = reference.any(dim=1).flatten(1).sum(dim=1)  # B
    best = refined.amax(dim=1).flatten(1).sort(dim=1, descending=True).values  # B x I
    index = (counts - 1).clamp(min=0)
    thresholds = best.gather(1, index[:, None]).view(b, 1, 1, 1)
    kept = refined >= thresholds
    return kept & (counts > 0).view(b, 1, 1, 1)


def correct_matches(truth: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``B x J x h x w`` bool: target cell j within one cell of the true match ``truth``
    (``B x 2 x h x w`` positions in cells) of source cell i."""
    h, w = grid
    cells = cell_positions(h, w, device=truth.device, dtype=truth.dtype)  # J x 2
    return (cells.t().reshape(1, 2, h * w, 1, 1) - truth[:, :, None]).norm(dim=1) <= 1.0


def precision(
    selected: torch.Tensor, correct: torch.Tensor, counted: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair (``B``): confident matches over the source cells ``counted``, and the correct
    ones among them."""
    chosen = selected & counted
    return chosen.flatten(1).sum(1), (chosen & correct).flatten(1).sum(1)


def self_warp_truth(batch: dict, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The true match in cells at each cell centre, and where it is valid (self-warps): the
    ground truth read at the centre's nearest pixel, not interpolated over the cell (as
    ``learning.truth_in_cells`` does for EPE), so each match is one warped point."""
    h, w = grid
    size = batch["flow_s2t"].shape[-2:]
    stride = size[1] / w
    centres = ((cell_positions(h, w) + 0.5) * stride - 0.5).round().long()  # J x 2 pixels
    flow = batch["flow_s2t"][:, :, centres[:, 1], centres[:, 0]] / stride  # B x 2 x J
    valid = batch["flow_valid"][:, :, centres[:, 1], centres[:, 0]]
    match = cell_positions(h, w).t()[None] + flow
    return match.view(-1, 2, h, w), valid.view(-1, 1, h, w)


def keypoint_truth(batch: dict, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The target keypoint in cells at the source cell of each keypoint, and those cells."""
    h, w = grid
    stride = batch["source_image"].shape[-1] / w
    b = batch["source_image"].shape[0]
    source = ((batch["source_kps"] + 0.5) / stride - 0.5).round().long().clamp(0, w - 1)
    target = (batch["target_kps"] + 0.5) / stride - 0.5
    truth = torch.zeros(b, 2, h, w)
    counted = torch.zeros(b, 1, h, w, dtype=torch.bool)
    pair, slot = batch["kps_valid"].nonzero(as_tuple=True)
    ys, xs = source[pair, slot, 1], source[pair, slot, 0]
    truth[pair, :, ys, xs] = target[pair, slot]
    counted[pair, 0, ys, xs] = True
    return truth, counted


def keypoint_box_background(batch: dict, grid: tuple[int, int]) -> torch.Tensor:
    """``B x 1 x h x w`` bool: source cells outside the box of the pair's valid source keypoints
    grown by one cell (the background)."""
    h, w = grid
    stride = batch["source_image"].shape[-1] / w
    cells = ((batch["source_kps"] + 0.5) / stride - 0.5).round()  # B x K x 2
    valid = batch["kps_valid"][..., None]
    low = torch.where(valid, cells, torch.full_like(cells, float("inf"))).amin(dim=1) - 1  # B x 2
    high = torch.where(valid, cells, torch.full_like(cells, -float("inf"))).amax(dim=1) + 1
    xs = torch.arange(w).view(1, 1, w)
    ys = torch.arange(h).view(1, h, 1)
    inside = (
        (xs >= low[:, 0, None, None]) & (xs <= high[:, 0, None, None])
        & (ys >= low[:, 1, None, None]) & (ys <= high[:, 1, None, None])
    )  # fmt: skip
    return ~inside[:, None]


def background_counts(selected: torch.Tensor, background: torch.Tensor) -> list[torch.Tensor]:
    """Per pair: confident matches, and those whose source cell is background."""
    return [selected.flatten(1).sum(1), (selected & background).flatten(1).sum(1)]


@torch.no_grad()
def compare(
    model: GuidedFlowModel, batches: Iterable[dict], truth_of, by_category: bool = False
) -> dict:
    """Per category (``by_category``) or over ``"all"`` pairs: precision of the untrained (Q' = Q at
    rho) and trained (equal density) confident sets, their match count and density, and the
    precision and density of the set that enters G (Q' > rho after the cycle test, when the
    model has it); on keypoint pairs (``by_category``) also the background shares."""
    sums: dict[str, dict[str, torch.Tensor]] = {}  # category -> column -> per-category sum
    for batch in batches:
        out = model(batch["source_image"], batch["target_image"], refine=False)
        truth, counted = truth_of(batch, model.grid)
        correct = correct_matches(truth, model.grid)
        untrained = confident_mask(out.confidence, model.rho)
        trained = matched_threshold_set(out.refined_confidence, untrained)
        guided = confident_mask(out.guided_confidence, model.rho)
        columns = {}
        for name, selected in (("untrained", untrained), ("trained", trained), ("guided", guided)):
            found, right = precision(selected, correct, counted)
            columns |= {f"{name}_matches": found, f"{name}_correct": right}
        columns["with_match"] = (untrained.any(dim=1, keepdim=True) & counted).flatten(1).sum(1)
        columns["guided_with_match"] = (guided.any(dim=1, keepdim=True) & counted).flatten(1).sum(1)
        columns["counted"] = counted.flatten(1).sum(1)
        if by_category:
            background = keypoint_box_background(batch, model.grid)
            at_rho = confident_mask(out.refined_confidence, model.rho)
            sets = {"untrained": untrained, "trained": trained, "trained_at_rho": at_rho}
            for name, selected in {**sets, "guided": guided}.items():
                found, behind = background_counts(selected, background)
                columns |= {f"{name}_all": found, f"{name}_bg": behind}
            columns["cells_at_rho"] = at_rho.any(dim=1).flatten(1).sum(1)
            columns["cells_untrained"] = untrained.any(dim=1).flatten(1).sum(1)
        groups = batch["category"] if by_category else ["all"] * len(columns["counted"])
        for index, category in enumerate(groups):
            total = sums.setdefault(category, {})
            for name, values in columns.items():
                total[name] = total.get(name, 0) + values[index]
    return {category: summary(c, by_category) for category, c in sorted(sums.items())}


def summary(c: dict[str, torch.Tensor], backgrounds: bool) -> dict:
    """The figures of one category from its summed columns (see :func:`compare`)."""

    def ratio(numerator: str, denominator: str) -> float:
        return round(float(c[numerator] / c[denominator].clamp(min=1)), 4)

    result = {
        "untrained": ratio("untrained_correct", "untrained_matches"),
        "trained": ratio("trained_correct", "trained_matches"),
        "matches": int(c["untrained_matches"]),
        "density": ratio("with_match", "counted"),
        "guided": ratio("guided_correct", "guided_matches"),
        "guided_matches": int(c["guided_matches"]),
        "guided_density": ratio("guided_with_match", "counted"),
    }
    if backgrounds:
        names = ("untrained", "trained", "trained_at_rho", "guided")
        result["background_share"] = {name: ratio(f"{name}_bg", f"{name}_all") for name in names}
        result["source_cells_at_rho"] = {
            "trained": int(c["cells_at_rho"]), "untrained": int(c["cells_untrained"])
        }  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage1", default="outputs/demo/stage1.ckpt")
    parser.add_argument("--willow-root", default=None)
    parser.add_argument("--cache-dir", default="outputs/cache")
    parser.add_argument("--out", default="benchmarks/results/confident_set.json")
    parser.add_argument("--label", default="demo_stage1", help="the run's name in --out")
    parser.add_argument(
        "--weight-free",
        nargs="?",
        const="default",
        choices=tuple(PRESETS),
        help="score the untrained method of this preset (default: 'default') instead of --stage1",
    )
    parser.add_argument(
        "--cycle-consistency",
        action="store_true",
        help="with --weight-free: turn the cycle test on (the set that enters G loses the matches "
        "whose round trip goes further than a cell)",
    )
    args = parser.parse_args(argv)
    if args.weight_free:
        config = weight_free_config(args.weight_free, cycle_consistency=args.cycle_consistency)
        model = GuidedFlowModel.from_config(config).eval()
    else:
        model = PruningStage.load_from_checkpoint(args.stage1, map_location="cpu").model.eval()
    data = yaml.safe_load((EXPERIMENTS / "demo.yaml").read_text())["data"]["init_args"]
    synthetic = SyntheticPairsDataModule(**{**data, "cache_dir": args.cache_dir})
    synthetic.prepare_data()
    synthetic.setup("test")
    warped = (synthetic.on_after_batch_transfer(b, 0) for b in synthetic.test_dataloader())
    result = {"self_warps": compare(model, warped, self_warp_truth)["all"]}
    if args.willow_root:
        willow = PFWillowDataModule(root=args.willow_root, cache_dir=args.cache_dir, batch_size=8)
        willow.prepare_data()
        willow.setup("test")
        result["real_pairs"] = compare(model, willow.test_dataloader(), keypoint_truth, True)
    result["settings"] = vars(args)
    out = Path(args.out)
    stored = json.loads(out.read_text()) if out.exists() else {}
    stored[args.label] = result
    write_json(out, stored)
    print(json.dumps(result, indent=1), file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
