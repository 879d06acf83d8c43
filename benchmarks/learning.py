"""What training changes (a benchmark, not a test): both stages of the embedded default, step by
step, measured on pairs training never sees.

``python benchmarks/learning.py [--stage1-steps N] [--stage2-steps N] [--eval-every K]
[--willow-root DIR] [--out JSON] [--plot PNG]``

Stage 1 (``experiments/demo.yaml``'s model options) and then stage 2 (``demo_stage2.yaml``'s,
from stage 1's weights) train on synthetic warps of the training photographs of
:class:`~data_modules.synthetic.SyntheticPairsDataModule`. Every step records the loss terms,
the confident density (source cells with a match Q' > rho) and the precision of the confident
set on the training batch (the fraction of confident matches (i, j) with p_j within one cell of
the true position p_i + flow_i). Every ``--eval-every`` steps, and at step 0, it records EPE
(pixels) and PCK@0.05 of G' and tau on the held-out test photographs' pairs.

With ``--willow-root`` (a PF-WILLOW layout, e.g. a development subset) it then scores real pairs
of different instances, PCK at the benchmark's alphas with its bound: zero flow, the argmax of
C, G' and tau of the untrained and of the trained model (same features).

Standard output ends with one JSON object, also written to ``--out``; ``--plot`` draws the curves.

Held-out mode (:mod:`heldout`): ``python benchmarks/learning.py --heldout ROOT --init-checkpoint
CKPT [--config experiments/finetune_folders.yaml] [--steps N] [--eval-every K] [--label NAME]
[--folds CLASS ...] [--set model.loss.lambda_m=2 ...]`` fine-tunes on the images of all classes
of a PF-WILLOW layout but one and scores the keypoint pairs of that one, for each class in turn;
``--set`` then overrides a dotted key of the fine-tuning config. Results go to
``benchmarks/results/learning_heldout.json`` by label, the curves to ``docs/learning.png``;
``--table`` prints the stored runs as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from data_modules.pf_willow import PFWillowDataModule
from data_modules.synthetic import SyntheticPairsDataModule
from guided_flow.evaluation.keypoints import KeypointEvaluator
from guided_flow.evaluation.metrics import DenseFlowMetric
from guided_flow.io.atomic import atomic_open
from guided_flow.model.flow_model import FlowOutput
from guided_flow.model.geometry import cell_positions
from guided_flow.training.options import upgrade_stage_options
from guided_flow.training.stages import GuidedFlowStage, MatchingStage, PruningStage

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
DEFAULT_OUT = "benchmarks/results/learning.json"
HELDOUT_OUT = "benchmarks/results/learning_heldout.json"
LEARNABILITY_OUT = "benchmarks/results/learnability.json"


def log(message: str) -> None:
    """Progress on standard error."""
    print(message, file=sys.stderr, flush=True)


def model_options(config: str, overrides: Mapping[str, object] | None = None) -> dict:
    """``model.init_args`` of an experiment config, without the checkpoint it starts from, with
    ``overrides`` (options by their own names, e.g. ``lr``) put into their groups over the
    config's values."""
    options = yaml.safe_load((EXPERIMENTS / config).read_text())["model"]["init_args"]
    options.pop("init_checkpoint", None)
    for group, values in upgrade_stage_options(overrides or {}).items():
        options[group] = {**options.get(group, {}), **values}
    return options


def batches(datamodule: SyntheticPairsDataModule, split: str) -> Iterator[dict]:
    """The split's batches, warped as the trainer would warp them, endlessly for ``train``."""
    loader = getattr(datamodule, f"{split}_dataloader")()
    while True:
        for batch in loader:
            yield datamodule.on_after_batch_transfer(batch, 0)
        if split != "train":
            return


def truth_in_cells(batch: Mapping, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ground-truth flow at the cell centres in cells (``B x 2 x h x w``) and where it is
    valid (``B x 1 x h x w`` bool)."""
    size = batch["flow_s2t"].shape[-2:]
    flow = F.interpolate(batch["flow_s2t"], size=grid, mode="bilinear", align_corners=False)
    flow = flow / flow.new_tensor([size[1] / grid[1], size[0] / grid[0]]).view(1, 2, 1, 1)
    valid = F.interpolate(batch["flow_valid"].float(), size=grid, mode="bilinear") > 0.99
    return flow, valid


def confident_precision(out: FlowOutput, truth: torch.Tensor, valid: torch.Tensor) -> float:
    """Fraction of the confident matches (Q' > rho, valid source cells) whose target cell lies
    within one cell of the true position."""
    b, hw, h, w = out.refined_confidence.shape
    cells = cell_positions(h, w, device=truth.device, dtype=truth.dtype)  # J x 2
    source = cells.t().reshape(1, 2, h, w)
    distance = (cells.t().reshape(1, 2, hw, 1, 1) - (source + truth)[:, :, None]).norm(dim=1)
    confident = (out.refined_confidence > out.rho) & valid
    return float((distance[confident] <= 1.0).float().mean()) if confident.any() else float("nan")


@torch.no_grad()
def held_out_scores(stage: GuidedFlowStage, pairs: list[dict]) -> dict:
    """EPE (pixels) and PCK@0.05 of G' and tau over the held-out pairs."""
    stage.eval()
    metrics = {"guidance": DenseFlowMetric(), "gsf": DenseFlowMetric()}
    for batch in pairs:
        flows = stage.predictor_flows(batch, stage(batch["source_image"], batch["target_image"]))
        for name, metric in metrics.items():
            metric.update(batch["index"], flows[name], batch["flow_s2t"], batch["flow_valid"])
    stage.train()
    scores = {}
    for name, metric in metrics.items():
        result = metric.compute()
        scores[f"{name}_epe_px"] = result["epe_px"]
        scores[f"{name}_pck@0.05"] = result["pck@0.05"]
    return scores


def train(
    stage: GuidedFlowStage, data: Iterator[dict], held_out: list[dict], steps: int, every: int
) -> list[dict]:
    """``steps`` optimiser steps of ``stage``; one record per step (held-out scores every
    ``every`` steps and at both ends)."""
    optimizer = stage.configure_optimizers()
    stage.train()
    records = []
    for step in range(steps + 1):
        record: dict = {"step": step}
        if step % every == 0 or step == steps:
            record.update(held_out_scores(stage, held_out))
            log(f"stage {stage.stage} step {step}: {record}")
        if step == steps:
            records.append(record)
            break
        batch = next(data)
        out = stage.model(batch["source_image"], batch["target_image"], refine=stage.stage == 2)
        terms = stage.loss_terms(out, batch)
        loss = stage.total_loss(terms)
        truth, valid = truth_in_cells(batch, stage.model.grid)
        record.update({f"loss_{name}": value.item() for name, value in terms.items()})
        record["loss"] = loss.item()
        record["confident_density"] = float(out.confident_density.mean())
        record["confident_precision"] = confident_precision(out, truth, valid)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        records.append(record)
    stage.eval()
    return records


@torch.no_grad()
def real_pairs(stages: Mapping[str, GuidedFlowStage], root: str, cache_dir: str) -> dict:
    """PCK of each predictor on a PF-WILLOW layout: identity, argmax and G' of the trained
    model, tau of each stage in ``stages``."""
    datamodule = PFWillowDataModule(root=root, cache_dir=cache_dir, batch_size=8)
    datamodule.prepare_data()
    datamodule.setup("test")
    evaluators: dict[str, KeypointEvaluator] = {}
    for batch in datamodule.test_dataloader():
        for name, stage in stages.items():
            out = stage(batch["source_image"], batch["target_image"])
            flows = stage.predictor_flows(batch, out)
            chosen = {f"gsf_{name}": flows["gsf"]}
            if name == "trained":
                chosen.update({k: flows[k] for k in ("identity", "argmax", "guidance")})
            for key, flow in chosen.items():
                if key not in evaluators:
                    evaluators[key] = KeypointEvaluator(
                        pck_bound=datamodule.pck_bound,
                        alphas=datamodule.alphas,
                        categories=datamodule.categories,
                    )
                evaluators[key].update(batch, flow)
    results = {}
    for key, evaluator in evaluators.items():
        summary = evaluator.compute()
        results[key] = {k: v for k, v in summary.items() if k == "pairs" or k.startswith("pck@")}
    return results


def plot(result: Mapping, path: str) -> None:
    """Loss, confident density and precision, and held-out EPE of G' and tau, per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    offset = 0
    for stage in ("stage1", "stage2"):
        records = result[stage]
        steps = [offset + r["step"] for r in records if "loss" in r]
        axes[0].plot(steps, [r["loss"] for r in records if "loss" in r], label=f"{stage} loss")
        for key in ("confident_density", "confident_precision"):
            values = [r[key] for r in records if key in r]
            axes[1].plot(steps, values, label=f"{stage} {key.replace('_', ' ')}")
        for name in ("guidance", "gsf"):
            evaluated = [r for r in records if f"{name}_epe_px" in r]
            axes[2].plot(
                [offset + r["step"] for r in evaluated],
                [r[f"{name}_epe_px"] for r in evaluated],
                marker="o",
                label=f"{stage} {'G' + chr(39) if name == 'guidance' else 'tau'}",
            )
        offset += records[-1]["step"]
    for axis, title in zip(
        axes,
        ("training loss", "confident set (training batches)", "held-out EPE (px)"),
        strict=True,
    ):
        axis.set_title(title)
        axis.set_xlabel("step (stage 2 after stage 1)")
        axis.legend(fontsize=8)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage1-steps", type=int, default=100)
    parser.add_argument("--stage2-steps", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--willow-root", default=None, help="a PF-WILLOW layout to score")
    parser.add_argument("--cache-dir", default="outputs/cache")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--plot", default=None, help="write the curves to this PNG")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="STAGE.OPTION=VALUE",
        help="override a model option of one stage, e.g. --set stage2.lr=1e-4; with --heldout "
        "a dotted key of the fine-tuning config, e.g. --set model.loss.lambda_m=2",
    )
    parser.add_argument("--heldout", default=None, metavar="ROOT", help="held-out mode's layout")
    parser.add_argument("--init-checkpoint", default="outputs/demo/stage2.ckpt")
    parser.add_argument("--config", default=str(EXPERIMENTS / "finetune_folders.yaml"))
    parser.add_argument("--steps", type=int, default=300, help="held-out fine-tuning steps")
    parser.add_argument("--label", default="finetune_folders", help="held-out run's name")
    parser.add_argument("--folds", nargs="*", default=None, help="held-out classes (all)")
    parser.add_argument(
        "--unseen", action="store_true", help="held-out mode: hold out whole categories"
    )
    parser.add_argument(
        "--table", action="store_true", help="print the held-out runs' table and stop"
    )
    parser.add_argument(
        "--learnability", action="store_true", help="supervised learnability check of W_M"
    )
    parser.add_argument("--seconds", type=float, default=150.0, help="CPU seconds per input")
    parser.add_argument("--train-pairs", type=int, default=320)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--inputs", nargs="*", default=["global", "local", "local_encoder_decoder"])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.table:
        import heldout

        print(heldout.markdown_table(json.loads(Path(HELDOUT_OUT).read_text())))
        return 0
    if args.heldout:
        return heldout_mode(args)
    if args.learnability:
        return learnability_mode(args)
    started = time.perf_counter()

    data_options = yaml.safe_load((EXPERIMENTS / "demo.yaml").read_text())["data"]["init_args"]
    datamodule = SyntheticPairsDataModule(**{**data_options, "cache_dir": args.cache_dir})
    datamodule.prepare_data()
    datamodule.setup("fit")
    held_out = list(batches(datamodule, "test"))

    overrides: dict[str, dict] = {"stage1": {}, "stage2": {}}
    for item in args.set:
        key, _, value = item.partition("=")
        stage_name, _, option = key.partition(".")
        overrides[stage_name][option] = yaml.safe_load(value)
    untrained = MatchingStage.from_options(**model_options("demo_stage2.yaml")).eval()
    stage1 = PruningStage.from_options(**model_options("demo.yaml", overrides["stage1"]))
    result: dict = {"stage1": train(stage1, batches(datamodule, "train"), held_out,
                                    args.stage1_steps, args.eval_every)}  # fmt: skip
    stage2 = MatchingStage.from_options(**model_options("demo_stage2.yaml", overrides["stage2"]))
    stage2.load_state_dict(stage1.state_dict())
    result["stage2"] = train(
        stage2, batches(datamodule, "train"), held_out, args.stage2_steps, args.eval_every
    )
    if args.willow_root:
        stages = {"untrained": untrained, "trained": stage2.eval()}
        result["real_pairs"] = real_pairs(stages, args.willow_root, args.cache_dir)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["settings"] = vars(args)
    text = json.dumps(result, indent=1)
    with atomic_open(args.out) as handle:
        handle.write((text + "\n").encode())
    if args.plot:
        plot(result, args.plot)
    print(text)
    return 0


def learnability_mode(args: argparse.Namespace) -> int:
    """``--learnability``: the matching network trained with a supervised flow term on cached
    inputs, ``global`` against ``local`` (:mod:`learnability`); results are stored by variant
    in ``--out``, variants run before are kept."""
    import learnability

    if args.out == DEFAULT_OUT:
        args.out = LEARNABILITY_OUT
    out = Path(args.out)
    stored = json.loads(out.read_text()) if out.exists() else {"inputs": {}}
    result = learnability.run(args, truth_in_cells, batches)
    for outcome in result["inputs"].values():
        outcome["settings"] = result["settings"]
    stored["inputs"].update(result["inputs"])  # variants run before are kept
    text = json.dumps(stored, indent=1)
    with atomic_open(args.out) as handle:
        handle.write((text + "\n").encode())
    print(text)
    return 0


def heldout_mode(args: argparse.Namespace) -> int:
    """``--heldout``: leave-one-class-out fine-tuning runs (:mod:`heldout`)."""
    import heldout

    if args.out == DEFAULT_OUT:
        args.out = HELDOUT_OUT
    args.plot = args.plot or "docs/learning.png"
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    result = heldout.run(args, overrides, args.folds)
    print(json.dumps(result["mean"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
