"""Does a switch of one checkpoint change its real-pair figures beyond noise? (a benchmark, not a
test)

``python benchmarks/paired.py [--ckpt CKPT | --baseline-preset PRESET] --willow-root DIR --option
NAME[=VALUE] [--option ...] [--alphas A ...] [--draws N] [--cache-dir DIR] [--label NAME]
[--out JSON]``

Scores every keypoint of a PF-WILLOW layout twice with the same weights: the model of the
checkpoint (without ``--ckpt``: the untrained weight-free default of ``GuidedSemanticFlow()``, or
the untrained method of ``--baseline-preset``) with a test-time option as the baseline and as the
variant. ``--option NAME`` switches a boolean
option off (baseline) and on (:data:`SWITCHES`); ``--option NAME=VALUE`` compares the model's own
value with VALUE (e.g. ``feature_views=flip``, ``voting=hough``; ``input_size=640`` or
``feature_stride=8``, untrained only and alone: the same method on a finer grid, from a bigger
picture or from a hypercolumn at stride 8; ``aspect=letterbox``: the same model matching each
picture at its own aspect ratio, :mod:`letterbox`). Several ``--option`` change the variant
together (a combination against the baseline, every switch among them off). Each model runs its
own forward pass. Per class and alpha it
reports the keypoints that cross the bound each way (*gained*: outside the bound with the option
off and inside with it on; *lost*: the reverse), the difference of PCK, and a 95 % interval of
that difference from a paired bootstrap over pairs: the keypoints of one pair share its images,
so they are resampled together. A difference whose interval holds 0 is not evidence either way.

Runs are stored by ``--label`` in ``--out`` (other labels are kept), with the baseline's
test-time options; standard output is a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import letterbox
import torch

from data_modules.pf_willow import PFWillowDataModule
from guided_flow.api import PRESETS, weight_free_config
from guided_flow.cli.main import TEST_TIME_OPTIONS
from guided_flow.evaluation.keypoints import KeypointEvaluator
from guided_flow.io.atomic import write_json
from guided_flow.model.feature_views import FEATURE_VIEWS
from guided_flow.model.flow_model import GuidedFlowModel
from guided_flow.model.geometry import flow_cells_to_pixels
from guided_flow.model.voting import VOTING
from guided_flow.training.stages import MatchingStage

SWITCHES = (
    "soft_argmax_refine", "use_matching_net", "use_pruning_net", "cycle_consistency",
    "mirror_choice", "adaptive_window",
)  # fmt: skip
# Test-time options that take a value: name -> allowed values. The grid options compare the
# untrained method on two grids, so they take no checkpoint.
GRID_OPTIONS = {"input_size": ("480", "640"), "feature_stride": ("8",)}
# How the pictures reach the model: squeezed into the square (the loaders'), or letterboxed.
ASPECTS = ("squeeze", "letterbox")
VALUED_OPTIONS = {
    "feature_views": FEATURE_VIEWS, "voting": VOTING, "aspect": ASPECTS[1:], **GRID_OPTIONS
}  # fmt: skip
DEFAULT_OUT = "benchmarks/results/paired.json"
# The baseline's test-time options, stored with each run (the untrained default changes).
RECORDED_OPTIONS = (
    "cycle_consistency", "voting", "feature_views", "mirror_choice", "adaptive_window"
)  # fmt: skip


def parse_option(text: str) -> tuple[str, object | None]:
    """``NAME`` (a boolean switch: ``(NAME, None)``) or ``NAME=VALUE`` (``(NAME, VALUE)``)."""
    name, _, value = text.partition("=")
    if not value:
        if name not in SWITCHES:
            raise argparse.ArgumentTypeError(f"{name!r}: choose a switch of {SWITCHES}")
        return name, None
    if value not in VALUED_OPTIONS.get(name, ()):
        raise argparse.ArgumentTypeError(f"{text!r}: choose NAME=VALUE of {VALUED_OPTIONS}")
    return name, value


def paired_summary(
    baseline: torch.Tensor,
    variant: torch.Tensor,
    pair: torch.Tensor,
    alpha: float,
    draws: int = 2000,
    seed: int = 0,
) -> dict[str, float | int]:
    """Paired comparison at one alpha of per-keypoint errors (``K``, fractions of the pair's
    bound) of the baseline and the variant, ``pair`` (``K`` long) naming each keypoint's pair.

    Returns ``keypoints``, ``gained``, ``lost``, ``difference`` (the variant's PCK minus the
    baseline's) and ``low`` / ``high``, the 2.5 and 97.5 percentiles of that difference over
    ``draws`` resamplings of the pairs with replacement."""
    inside_baseline, inside_variant = baseline <= alpha, variant <= alpha
    _, pair_index = torch.unique(pair, return_inverse=True)
    pairs = int(pair_index.max()) + 1
    per_pair_change = torch.zeros(pairs, dtype=torch.float64).index_add_(
        0, pair_index, inside_variant.double() - inside_baseline.double()
    )
    per_pair_count = torch.zeros(pairs, dtype=torch.float64).index_add_(
        0, pair_index, torch.ones_like(baseline, dtype=torch.float64)
    )
    generator = torch.Generator().manual_seed(seed)
    resampled = torch.randint(pairs, (draws, pairs), generator=generator)
    differences = per_pair_change[resampled].sum(1) / per_pair_count[resampled].sum(1)
    low, high = torch.quantile(differences, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return {
        "keypoints": len(baseline),
        "gained": int((inside_variant & ~inside_baseline).sum()),
        "lost": int((inside_baseline & ~inside_variant).sum()),
        "difference": round(float(per_pair_change.sum() / len(baseline)), 4),
        "low": round(float(low), 4),
        "high": round(float(high), 4),
    }


# A batch of pairs -> their flow in cells of the input grid (``B x 2 x h x w``).
FlowOf = Callable[[Mapping], torch.Tensor]


def flow_function(model: GuidedFlowModel, aspect: str = "squeeze") -> FlowOf:
    """``model``'s flow of a batch: of its square inputs as every loader gives them
    (``"squeeze"``), or of the pictures' letterboxes (``"letterbox"``,
    :func:`letterbox.letterboxed_flow`)."""
    model = model.eval()
    if aspect == "letterbox":
        return lambda batch: letterbox.letterboxed_flow(model, batch)
    return lambda batch: model(batch["source_image"], batch["target_image"]).flow


@torch.no_grad()
def model_errors(flow_of: FlowOf, datamodule: PFWillowDataModule) -> dict[str, torch.Tensor]:
    """Errors of every valid keypoint of ``datamodule``'s test pairs under ``flow_of``, as
    fractions of its pair's bound (``error``), beside its ``pair`` and ``category`` index (all
    ``K``, in the loader's order)."""
    evaluator = KeypointEvaluator(pck_bound=datamodule.pck_bound, alphas=datamodule.alphas)
    columns: dict[str, list[torch.Tensor]] = {"error": [], "pair": [], "category": []}
    for batch in datamodule.test_dataloader():
        valid, size = batch["kps_valid"], tuple(batch["source_image"].shape[-2:])
        kps = evaluator.transfer(batch, flow_cells_to_pixels(flow_of(batch), size))
        error = (kps["pred_kps"] - kps["trg_kps"]).norm(dim=-1) / kps["bound"][:, None]
        columns["error"].append(error[valid])
        columns["pair"].append(batch["index"][:, None].expand_as(valid)[valid])
        columns["category"].append(batch["meta"]["category_id"][:, None].expand_as(valid)[valid])
    return {name: torch.cat(parts) for name, parts in columns.items()}


def keypoint_errors(
    baseline: tuple[FlowOf, PFWillowDataModule], variant: tuple[FlowOf, PFWillowDataModule]
) -> dict[str, torch.Tensor]:
    """The ``baseline`` and ``variant`` errors of :func:`model_errors` (each a flow and its
    data at the model's input size) on the same keypoints, with their ``pair`` and
    ``category``."""
    first, second = model_errors(*baseline), model_errors(*variant)
    if not torch.equal(first["pair"], second["pair"]):
        raise ValueError("the baseline and the variant scored different keypoints")
    index = {"pair": first["pair"], "category": first["category"]}
    return {"baseline": first["error"], "variant": second["error"], **index}


def finer_grid_model(model: GuidedFlowModel, option: str, value: int) -> GuidedFlowModel:
    """The untrained method with ``model``'s test-time options on the grid that ``option``
    (``input_size`` or ``feature_stride``) at ``value`` gives. Whatever is measured in cells is
    scaled with the grid, so that it covers the same fraction of the picture: the variances c_P
    and c_M (squared cells) by the squared ratio, the window N to the smallest odd width that
    spans its old width times the ratio."""
    assert model.backbone is not None
    options = {name: getattr(model, name) for name in TEST_TIME_OPTIONS}
    options |= {"input_size": model.input_size[0], "feature_stride": model.backbone.stride}
    options[option] = value
    ratio = (options["input_size"] / options["feature_stride"]) / model.grid[0]
    options["c_p"], options["c_m"] = model.c_p * ratio**2, model.c_m * ratio**2
    options["window_n"] = 2 * math.ceil((model.window_n * ratio - 1) / 2) + 1
    return GuidedFlowModel.from_config(weight_free_config(**options))


def variant_model(model: GuidedFlowModel, option: str, value: object | None) -> GuidedFlowModel:
    """``model`` with a test-time ``option`` on (a switch, ``value`` None) or at ``value``; a
    grid option (:data:`GRID_OPTIONS`) builds the untrained method on that grid
    (:func:`finer_grid_model`)."""
    if option in GRID_OPTIONS:
        return finer_grid_model(model, option, int(str(value)))
    if option == "aspect":  # not the model's: the flow function's (:func:`flow_function`)
        return model
    variant = copy.deepcopy(model)
    setattr(variant, option, True if value is None else value)
    return variant


def compared_models(
    model: GuidedFlowModel, options: Sequence[tuple[str, object | None]]
) -> tuple[GuidedFlowModel, GuidedFlowModel]:
    """The baseline (``model`` with every switch among ``options`` off) and the variant (the
    baseline with all ``options`` applied: each switch on, each valued option at its value)."""
    for option, value in options:
        if value is None:
            model = variant_model(model, option, False)
    variant = model
    for option, value in options:
        variant = variant_model(variant, option, value)
    return model, variant


def compare(
    errors: dict[str, torch.Tensor], categories: Sequence[str], alphas: Sequence[float], draws: int
) -> dict[str, dict[str, dict]]:
    """:func:`paired_summary` per class (by name) and over all keypoints (``"all"``), per
    alpha (``"pck@A"``)."""
    groups = {name: errors["category"] == index for index, name in enumerate(categories)}
    groups["all"] = torch.ones_like(errors["pair"], dtype=torch.bool)
    baseline, variant, pair = errors["baseline"], errors["variant"], errors["pair"]
    return {
        name: {
            f"pck@{alpha:g}": paired_summary(
                baseline[rows], variant[rows], pair[rows], alpha, draws
            )
            for alpha in alphas
        }
        for name, rows in groups.items()
        if rows.any()
    }


def markdown_table(result: dict[str, dict[str, dict]]) -> str:
    """One row per group: gained / lost, the difference and its interval at each alpha."""
    alphas = list(next(iter(result.values())))
    lines = [
        "| class | " + " | ".join(f"{a}: gained / lost, difference [95 %]" for a in alphas) + " |",
        "|---|" + "---|" * len(alphas),
    ]
    for group, row in result.items():
        cells = [
            f"+{s['gained']} / -{s['lost']}, {s['difference']:+.4f} "
            f"[{s['low']:+.4f}, {s['high']:+.4f}]"
            for s in row.values()
        ]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="a stage-2 checkpoint (default: the untrained default)")
    parser.add_argument("--willow-root", required=True, help="a PF-WILLOW layout")
    parser.add_argument(
        "--option", required=True, type=parse_option, action="append", help="NAME or NAME=VALUE"
    )
    parser.add_argument(
        "--baseline-preset",
        choices=tuple(PRESETS),
        help="the untrained method of this preset as the baseline (default: 'default')",
    )
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.05, 0.1, 0.15])
    parser.add_argument("--draws", type=int, default=2000, help="bootstrap resamplings")
    parser.add_argument("--cache-dir", default="outputs/cache")
    parser.add_argument("--label", default=None, help="default: the option and checkpoint")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    names = [option for option, _ in args.option]
    if set(names) & set(GRID_OPTIONS) and (args.ckpt or len(names) > 1):
        raise SystemExit(f"--option {names[0]} compares the untrained method: give it alone")
    if args.ckpt and args.baseline_preset:
        raise SystemExit("--baseline-preset sets up the untrained method: leave out --ckpt")
    if args.ckpt:
        model = MatchingStage.load_from_checkpoint(args.ckpt, map_location="cpu").model
    else:
        model = GuidedFlowModel.from_config(weight_free_config(args.baseline_preset or "default"))
    model, variant = compared_models(model, args.option)

    def willow(model: GuidedFlowModel) -> PFWillowDataModule:
        datamodule = PFWillowDataModule(
            root=args.willow_root,
            cache_dir=args.cache_dir,
            image_size=model.input_size[0],
            batch_size=8,
            num_workers=0,
        )
        datamodule.prepare_data()
        datamodule.setup("test")
        return datamodule

    datamodule = willow(model)
    aspect = dict(args.option).get("aspect", "squeeze")
    errors = keypoint_errors(
        (flow_function(model), datamodule), (flow_function(variant, aspect), willow(variant))
    )
    result = compare(errors, datamodule.categories, args.alphas, args.draws)
    described = "+".join(
        name if value is None else f"{name}={value}" for name, value in args.option
    )
    label = args.label or f"{described}_{Path(args.ckpt).stem if args.ckpt else 'untrained'}"
    out = Path(args.out)
    stored = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    stored["runs"][label] = {
        "checkpoint": args.ckpt or "untrained default",
        "option": described,
        "baseline": {name: getattr(model, name) for name in RECORDED_OPTIONS},
        "draws": args.draws,
        "classes": result,
    }
    write_json(out, stored)
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
