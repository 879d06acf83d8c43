"""How far could stage 2's weak objective move tau on self-warps? (a benchmark, not a test)

``python benchmarks/objective_reach.py [--steps 150] [--lr 0.05] [--lambda-sm 0.1 0.3]
[--cache-dir DIR] [--out JSON]``

On the validation self-warps of ``experiments/demo.yaml`` (16 pairs of photographs no stage
trains on), a flow per cell starts from S, the untrained tau of ``experiments/demo_stage2.yaml``
(its backbone is frozen until stage 2, so its features are the untrained model's), and Adam
moves every cell freely under lambda_M L_M + lambda_sm L_sm, the part of stage 2's loss that
depends on tau (its options: window, temperature, features). No network stands between the
objective and the flow, so the EPE and PCK@0.05 it reaches bound what a matching network trained
on that objective could add on these pairs. Each ``--lambda-sm`` is one run; the result is
written to ``--out`` (default ``benchmarks/results/objective_reach.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from data_modules.synthetic import SyntheticPairsDataModule
from guided_flow.evaluation.metrics import DenseFlowMetric
from guided_flow.io.atomic import write_json
from guided_flow.model import losses
from guided_flow.model.geometry import flow_cells_to_pixels
from guided_flow.training.stages import MatchingStage

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def stage_two() -> MatchingStage:
    """The untrained model and loss options of ``experiments/demo_stage2.yaml``."""
    from learning import model_options  # a sibling script: benchmarks/ is not a package

    return MatchingStage(**model_options("demo_stage2.yaml")).eval()


def validation_pairs(cache_dir: str) -> list[dict]:
    """The demo's validation self-warps, warped as the trainer warps them."""
    options = yaml.safe_load((EXPERIMENTS / "demo.yaml").read_text())["data"]["init_args"]
    datamodule = SyntheticPairsDataModule(**{**options, "cache_dir": cache_dir})
    datamodule.prepare_data()
    datamodule.setup("fit")
    return [datamodule.on_after_batch_transfer(b, 0) for b in datamodule.val_dataloader()]


def scores(flows: list[torch.Tensor], pairs: list[dict]) -> dict[str, float]:
    """EPE (pixels) and PCK@0.05 of flows in cells (one ``B x 2 x h x w`` per batch)."""
    metric = DenseFlowMetric()
    for flow, batch in zip(flows, pairs, strict=True):
        pixels = flow_cells_to_pixels(flow, tuple(batch["flow_s2t"].shape[-2:]))
        metric.update(batch["index"], pixels, batch["flow_s2t"], batch["flow_valid"])
    result = metric.compute()
    return {
        "epe_px": round(float(result["epe_px"]), 3),
        "pck@0.05": round(float(result["pck@0.05"]), 4),
    }


def optimise(
    stage: MatchingStage, batch: dict, start: torch.Tensor, lambda_sm: float, steps: int, lr: float
) -> torch.Tensor:
    """The flow (cells) that Adam reaches from ``start`` under lambda_M L_M + lambda_sm L_sm."""
    with torch.no_grad():
        out = stage.model(batch["source_image"], batch["target_image"])
        source, target = stage.match_features(out)
    loss = stage.loss_config
    stride = batch["source_image"].shape[-1] / stage.model.grid[1]
    flow = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([flow], lr=lr)
    for _ in range(steps):
        match = losses.matching_loss(source, target, flow, loss.window_m, loss.temperature)
        total = loss.lambda_m * match + lambda_sm * losses.smoothness_loss(flow, None, stride)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    return flow.detach()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=0.05, help="Adam's step, in cells")
    parser.add_argument("--lambda-sm", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--cache-dir", default="outputs/cache")
    parser.add_argument("--out", default="benchmarks/results/objective_reach.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    stage, pairs = stage_two(), validation_pairs(args.cache_dir)
    stage.model.use_matching_net = False  # tau = S
    with torch.no_grad():
        starts = [stage.model(b["source_image"], b["target_image"]).flow for b in pairs]
    result: dict = {"settings": vars(args), "soft_argmax": scores(starts, pairs)}
    for lambda_sm in args.lambda_sm:
        reached = [
            optimise(stage, b, s, lambda_sm, args.steps, args.lr)
            for b, s in zip(pairs, starts, strict=True)
        ]
        result[f"optimised_lambda_sm_{lambda_sm:g}"] = scores(reached, pairs)
    write_json(Path(args.out), result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
