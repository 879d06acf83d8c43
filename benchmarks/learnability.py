"""The learnability mode of ``benchmarks/learning.py``: can the matching network learn at all?

``python benchmarks/learning.py --learnability [--init-checkpoint CKPT] [--seconds S]
[--train-pairs N] [--inputs global local local_encoder_decoder]``

On the demo's synthetic self-warps, whose true flow is known, the matching network is trained
with a supervised flow term (the end-point error of tau = S + M(x) against the truth, in cells,
over valid cells) while everything before it stays fixed: the features of ``--init-checkpoint``
(or of the ImageNet backbone when that file does not exist) are computed once and the network's
input x is cached, so each step costs the network alone. Each variant (:data:`VARIANTS`:
``global``, C' read by Table 1's encoder-decoder, the paper's; ``local``, the local cost volume
around S read by the plain convolution head; ``local_encoder_decoder``, the local volume read by
the encoder-decoder) trains for ``--seconds`` of CPU time (all threads counted) from its
initialisation, and the held-out pairs (warps of the test photographs, never trained on) are
scored before, during and after: EPE in input pixels. The check passes for an input when its
held-out EPE falls by at least 10 %.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from data_modules.synthetic import SyntheticPairsDataModule
from guided_flow.model.flow_model import GuidedFlowModel, ModelConfig
from guided_flow.training.stages import MatchingStage

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
REQUIRED_GAIN = 0.10
VARIANTS = {
    "global": {"matching_input": "global"},
    "local": {"matching_input": "local", "local_head": "conv"},
    "local_encoder_decoder": {"matching_input": "local", "local_head": "encoder_decoder"},
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def base_model(init_checkpoint: str | None, variant: str) -> GuidedFlowModel:
    """``demo_stage2.yaml``'s model with the options of ``variant``, its backbone (and pruning
    net) from ``init_checkpoint`` when the file exists; the matching network stays fresh."""
    options = yaml.safe_load((EXPERIMENTS / "demo_stage2.yaml").read_text())
    config = ModelConfig(**options["model"]["init_args"]["model"])
    torch.manual_seed(0)
    model = GuidedFlowModel.from_config(replace(config, **VARIANTS[variant]))
    if init_checkpoint and Path(init_checkpoint).is_file():
        trained = MatchingStage.load_from_checkpoint(init_checkpoint, map_location="cpu").model
        state = {k: v for k, v in trained.state_dict().items() if not k.startswith("matching_net")}
        model.load_state_dict(state, strict=False)
    return model.eval()


@torch.no_grad()
def cache_inputs(
    model: GuidedFlowModel, pairs: Iterator[dict], count: int, truth_in_cells: object
) -> dict[str, torch.Tensor]:
    """The matching network's input x, the flow base S, the true flow (cells) and its validity
    for the first ``count`` pairs of ``pairs``, concatenated over batches."""
    parts: dict[str, list[torch.Tensor]] = {"x": [], "base": [], "truth": [], "valid": []}
    seen = 0
    for batch in pairs:
        features = model.backbone(torch.cat((batch["source_image"], batch["target_image"])))
        source, target = features.chunk(2)
        out = model.forward_features(source, target, use_matching_net=False)
        x = model.matching_net_input(out.correlation, out.guidance, out.flow, source)
        truth, valid = truth_in_cells(batch, model.grid)  # type: ignore[operator]
        for name, value in zip(parts, (x, out.flow, truth, valid), strict=True):
            parts[name].append(value)
        seen += len(x)
        if seen >= count:
            break
    return {name: torch.cat(values)[:count] for name, values in parts.items()}


def epe_px(flow: torch.Tensor, data: Mapping[str, torch.Tensor], stride: float) -> torch.Tensor:
    """Mean end-point error over valid cells, in input pixels."""
    error = (flow - data["truth"]).norm(dim=1, keepdim=True) * stride
    valid = data["valid"]
    return error[valid].mean()


def train_input(
    variant: str,
    net: torch.nn.Module,
    train: Mapping[str, torch.Tensor],
    held_out: Mapping[str, torch.Tensor],
    seconds: float,
    stride: float,
    lr: float,
    batch_size: int = 8,
    every: int = 100,
) -> dict:
    """Train the fresh matching network ``net`` on ``train`` for ``seconds``; the held-out
    curve."""
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)

    @torch.no_grad()
    def held_out_epe() -> float:
        net.eval()
        flow = held_out["base"] + net(held_out["x"])
        net.train()
        return round(float(epe_px(flow, held_out, stride)), 3)

    records = [{"step": 0, "seconds": 0.0, "held_out_epe_px": held_out_epe()}]
    started, step = time.process_time(), 0
    generator = torch.Generator().manual_seed(0)
    net.train()
    while time.process_time() - started < seconds:
        rows = torch.randint(len(train["x"]), (batch_size,), generator=generator)
        batch = {name: value[rows] for name, value in train.items()}
        loss = epe_px(batch["base"] + net(batch["x"]), batch, 1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if step % every == 0:
            elapsed = round(time.process_time() - started, 1)
            records.append({"step": step, "seconds": elapsed, "held_out_epe_px": held_out_epe()})
            log(f"{variant} {records[-1]} train loss {loss.item():.3f} cells")
    elapsed = round(time.process_time() - started, 1)
    records.append({"step": step, "seconds": elapsed, "held_out_epe_px": held_out_epe()})
    first, last = records[0]["held_out_epe_px"], records[-1]["held_out_epe_px"]
    gain = (first - last) / first
    return {
        "records": records,
        "held_out_epe_px": {"before": first, "after": last},
        "reduction": round(gain, 4),
        "learns": gain >= REQUIRED_GAIN,
        "parameters": sum(p.numel() for p in net.parameters()),
    }


def run(args: object, truth_in_cells: object, batches: object) -> dict:
    """Both inputs side by side on the same cached pairs."""
    options = yaml.safe_load((EXPERIMENTS / "demo_stage2.yaml").read_text())["data"]["init_args"]
    datamodule = SyntheticPairsDataModule(**{**options, "cache_dir": args.cache_dir})
    datamodule.prepare_data()
    datamodule.setup("fit")
    result: dict = {
        "settings": {
            "command": " ".join(sys.argv),
            "init_checkpoint": args.init_checkpoint
            if Path(args.init_checkpoint).is_file()
            else None,
            "train_pairs": args.train_pairs,
            "cpu_seconds_per_input": args.seconds,
            "lr": args.lr,
        },
        "inputs": {},
    }
    cached: dict[str, tuple[dict, dict]] = {}  # by matching input: the variants share them
    for variant in args.inputs:
        model = base_model(args.init_checkpoint, variant)
        stride = model.input_size[1] / model.grid[1]
        kind = VARIANTS[variant]["matching_input"]
        if kind not in cached:
            started = time.perf_counter()
            train = cache_inputs(model, batches(datamodule, "train"), args.train_pairs,
                                 truth_in_cells)  # fmt: skip
            held_out = cache_inputs(model, batches(datamodule, "test"), 10**9, truth_in_cells)
            log(f"{kind}: cached {len(train['x'])} + {len(held_out['x'])} pairs in "
                f"{time.perf_counter() - started:.0f} s")  # fmt: skip
            cached[kind] = (train, held_out)
        train, held_out = cached[kind]
        net = model.matching_net
        outcome = train_input(variant, net, train, held_out, args.seconds, stride, args.lr)
        outcome["held_out_pairs"] = len(held_out["x"])
        result["inputs"][variant] = {"options": VARIANTS[variant], **outcome}
        log(f"{variant}: {outcome['held_out_epe_px']} reduction {outcome['reduction']}")
    return result
