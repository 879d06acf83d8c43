"""Inference and training speed of Guided Semantic Flow (a benchmark, not a test).

``python benchmarks/speed.py [--threads N] [--device cpu|cuda] [--full]
[--matching-input global|local] [--backbones NAME ...]``

``python benchmarks/speed.py --test-time NAME=VALUE [NAME=VALUE ...] [--threads N]`` times
only the untrained method (EfficientNet-Lite0, 320 px, batch 1 and 8): its ``fast`` preset
(0.2's default), its ``default`` preset and the fast preset with each setting of test-time
options (``feature_views=flip``; several options in one setting joined by commas), all
interleaved.

Everything runs in one process. Each figure is the median over :data:`RUNS` timed runs after
warm-up, in milliseconds per image pair; the three inference paths of a configuration are timed
in turn within each run (rotating their order), so that they see the same machine load:

- ``backbone``: the feature extraction of both images of the pair (the floor of any method built
  on these features);
- ``nn_argmax``: backbone + correlation + argmax, the plain nearest-neighbour flow;
- ``gsf``: the whole Guided Semantic Flow forward (backbone, correlation, both networks,
  guidance): :meth:`guided_flow.cli.export.FlowPredictor.predict` with the default
  :class:`~guided_flow.cli.export.InferenceOptions`.

All three run under ``torch.inference_mode`` on the same model in the same memory layout, and
``nn_argmax`` and ``gsf`` end with the flow in pixels at the input resolution.
``components_ms_per_pair`` splits the GSF part after the backbone. ``inference_options`` compares
the inference settings users expect (``torch.no_grad``, ``torch.inference_mode``,
``channels_last``, bfloat16 autocast, and ``torch.compile`` with ``--full``) on the ResNet-101
and EfficientNet-Lite0 models at 320 px, batch 1, with each one's deviation from the float32
eager flow. ``train`` times one optimisation step (forward, losses, backward, SGD step) of each
stage at batch 8.

The default covers both backbones at 320 x 320 (grid 20 x 20), batch 1 and 8, and the training
steps; ``--full`` adds the 40 x 40 grid (640 x 640 input, batch 1) and ``torch.compile``.
``--matching-input`` chooses what the matching network reads (``ModelConfig.matching_input``:
the paper's global C' or the proposed local cost volume, which ``components_ms_per_pair`` then
times as ``matching_input``); ``--backbones`` restricts the backbones.
ResNet-101 runs with random weights (``weights="none"``, which does not change its speed),
EfficientNet-Lite0 with its embedded ImageNet weights. Progress and warnings go to standard
error; the last line of standard output is one JSON object (see :func:`main`).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from typing import Any

import torch
import yaml
from skimage import data as skdata

from guided_flow.api import weight_free_config
from guided_flow.cli.export import FlowPredictor, InferenceOptions
from guided_flow.io.images import normalise, resize_image
from guided_flow.model import volumes
from guided_flow.model.backbone import FeatureExtractor
from guided_flow.model.flow_model import GuidedFlowModel
from guided_flow.model.geometry import flow_cells_to_pixels
from guided_flow.model.subcell import subcell_refinement
from guided_flow.training.stages import MatchingStage, PruningStage

RUNS = 10
BACKBONES = ("resnet101", "efficientnet_lite0")
WEIGHTS = {"resnet101": "none", "efficientnet_lite0": "imagenet"}
BATCHES = (1, 8)
TRAIN_BATCH = 8
DEFAULT_INPUT = 320
FULL_INPUT = 640
STRIDE = 16


def log(message: str) -> None:
    """Progress on standard error."""
    print(message, file=sys.stderr, flush=True)


class PeakMemory:
    """Peak resident memory (RSS) of stretches of this process, MiB.

    On Linux :meth:`start` resets the kernel's high-water mark (``/proc/self/clear_refs``), so
    :meth:`peak_mb` is the peak since then; where that is not possible it is the process's peak
    so far. :attr:`overall_mb` keeps the largest value seen, the process's peak."""

    def __init__(self) -> None:
        self.overall_mb = 0.0

    def start(self) -> float:
        """Begin a stretch; returns the resident memory now, MiB."""
        self.peak_mb()  # keep the previous stretch's peak in overall_mb before the reset
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            pass
        return self._status("VmRSS") or self.peak_mb()

    def peak_mb(self) -> float:
        """The peak resident memory of the current stretch, MiB."""
        peak = self._status("VmHWM")
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        self.overall_mb = max(self.overall_mb, peak)
        return peak

    @staticmethod
    def _status(field: str) -> float | None:
        """A ``kB`` field of ``/proc/self/status`` in MiB; None where it cannot be read."""
        try:
            with open("/proc/self/status", encoding="ascii") as handle:
                for line in handle:
                    if line.startswith(f"{field}:"):
                        return int(line.split()[1]) / 1024.0
        except (OSError, ValueError, IndexError):
            return None
        return None


MEMORY = PeakMemory()


def synchronise(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    calls: dict[str, Callable[[], Any]], device: torch.device, warmup: int, runs: int = RUNS
) -> dict[str, float]:
    """Median wall-clock milliseconds of each call over ``runs`` rounds after ``warmup`` rounds;
    every round runs each call once, in an order rotated from round to round."""
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + runs):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronise(device)
            start = time.perf_counter()
            calls[name]()
            synchronise(device)
            if round_index >= warmup:
                samples[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(values) for name, values in samples.items()}


def image_pair(size: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A photograph and a zoomed crop of it, ``size`` pixels squared, normalised, ``batch``
    copies each: ``B x 3 x size x size``."""
    photo = skdata.astronaut()
    crop = photo[40:472, 24:456]
    tensors = []
    for picture in (photo, crop):
        pixels = torch.from_numpy(resize_image(picture, (size, size))).permute(2, 0, 1)
        tensors.append(normalise(pixels.float() / 255.0).expand(batch, 3, size, size).clone())
    return tensors[0].to(device), tensors[1].to(device)


MATCHING_INPUT = {"value": "global"}  # --matching-input, for every model built


def build_model(backbone: str, input_size: int, device: torch.device) -> GuidedFlowModel:
    """An eval-mode GuidedFlowModel at ``input_size`` on ``device`` (weights: :data:`WEIGHTS`),
    its matching network reading ``--matching-input``."""
    grid = (input_size // STRIDE,) * 2
    extractor = FeatureExtractor(backbone, WEIGHTS[backbone])
    model = GuidedFlowModel(extractor, grid, matching_input=MATCHING_INPUT["value"])
    return model.eval().to(device)


def free_memory() -> None:
    """Return the memory of the previous measurement to the system (collect, hand the C heap's
    free pages back where the C library can, empty the GPU cache), so that the next
    configuration's resident memory starts from a clean baseline."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: freed heap memory may stay resident
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_components(
    model: GuidedFlowModel, features: torch.Tensor, device: torch.device, batch: int
) -> dict[str, float]:
    """Milliseconds per pair of each GSF step after the backbone, from the features of a batch
    (``2B x D x h x w``, sources then targets)."""
    source, target = features.chunk(2, dim=0)
    volume = volumes.correlation(source, target)
    confidence = volumes.soft_mutual_confidence(volume)
    refined = model.pruning_net.refine(confidence)
    sparse, weight = volumes.sparse_guidance(refined, model.rho)
    guidance = volumes.interpolate_guidance(
        sparse, weight, model.c_p, model.window_n, model.guidance_model
    )
    matching_input = model.matching_net_input(volume, guidance, guidance, source)

    def guidance_steps() -> torch.Tensor:
        g, v = volumes.sparse_guidance(refined, model.rho)
        return volumes.interpolate_guidance(g, v, model.c_p, model.window_n, model.guidance_model)

    calls = {
        "correlation": lambda: volumes.correlation(source, target),
        "confidence": lambda: volumes.soft_mutual_confidence(volume),
        "pruning_net": lambda: model.pruning_net.refine(confidence),
        "guidance": guidance_steps,
        "soft_argmax": lambda: volumes.guided_soft_argmax(
            volume, guidance, model.c_m, model.soft_argmax_beta
        ),
        "subcell_refinement": lambda: subcell_refinement(guidance, source, target),
        "matching_input": lambda: model.matching_net_input(volume, guidance, guidance, source),
        "matching_net": lambda: guidance + model.matching_net(matching_input),
    }
    times = time_interleaved(calls, device, warmup=1)
    return {name: round(ms / batch, 3) for name, ms in times.items()}


def measure_inference(
    backbone: str, input_size: int, batch: int, device: torch.device
) -> dict[str, Any]:
    """One entry of ``runs``: backbone, nearest-neighbour and GSF times of one configuration,
    and the resident memory before it (``rss_before_mb``) and at its peak (``peak_rss_mb``: plus
    the model, ``model_mb`` of weights, its inputs and the largest of its passes)."""
    rss_before = MEMORY.start()
    model = build_model(backbone, input_size, device)
    predictor = FlowPredictor(model)  # the default InferenceOptions, applied to ``model``
    layout = torch.channels_last if predictor.options.channels_last else torch.contiguous_format
    source, target = (
        x.contiguous(memory_format=layout) for x in image_pair(input_size, batch, device)
    )
    size = (input_size, input_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def extract() -> torch.Tensor:
        return model.backbone(torch.cat((source, target), dim=0))

    def nn_argmax() -> torch.Tensor:
        source_features, target_features = extract().chunk(2, dim=0)
        volume = volumes.correlation(source_features, target_features)
        return flow_cells_to_pixels(volumes.argmax_flow(volume), size)

    with torch.inference_mode():
        calls = {
            "backbone": extract,
            "nn_argmax": nn_argmax,
            "gsf": lambda: predictor.predict(source, target),
        }
        times = time_interleaved(calls, device, warmup=2 if batch == 1 else 1)
        components = measure_components(model, extract(), device, batch)
        cells = model.grid[0] * model.grid[1]
        networks = (model.pruning_net, model.matching_net)
        entry = {
            "backbone": backbone,
            "input": input_size,
            "grid": model.grid[0],
            "batch": batch,
            "backbone_ms_per_pair": round(times["backbone"] / batch, 3),
            "gsf_ms_per_pair": round(times["gsf"] / batch, 3),
            "nn_argmax_ms_per_pair": round(times["nn_argmax"] / batch, 3),
            "ratio_gsf_over_backbone": round(times["gsf"] / times["backbone"], 4),
            "pairs_per_s": round(1000.0 * batch / times["gsf"], 3),
            "components_ms_per_pair": components,
            "volume_mb_per_pair": round(cells * cells * 4 / 2**20, 3),
            "model_mb": round(
                sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
                / 2**20,
                1,
            ),
            "gsf_networks_params_m": round(
                sum(p.numel() for net in networks for p in net.parameters()) / 1e6, 3
            ),
            "rss_before_mb": round(rss_before, 1),
            "peak_rss_mb": round(MEMORY.peak_mb(), 1),
        }
        if device.type == "cuda":
            entry["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return entry


def measure_training(stage: int, backbone: str, device: torch.device) -> dict[str, Any]:
    """One entry of ``train``: the median time of one SGD step of ``stage`` at batch 8."""
    stage_class = PruningStage if stage == 1 else MatchingStage
    module = stage_class.from_options(
        backbone=backbone,
        weights=WEIGHTS[backbone],
        input_size=DEFAULT_INPUT,
        matching_input=MATCHING_INPUT["value"],
    ).to(device)
    module.train()
    optimizer = module.configure_optimizers()
    source, target = image_pair(DEFAULT_INPUT, TRAIN_BATCH, device)
    batch = {"source_image": source, "target_image": target}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = module(source, target)
        module.total_loss(module.loss_terms(out, batch)).backward()
        optimizer.step()

    times = time_interleaved({"step": step}, device, warmup=1)
    return {
        "stage": stage,
        "backbone": backbone,
        "batch": TRAIN_BATCH,
        "step_ms": round(times["step"], 1),
        "trainable_blocks": module.hparams.model["trainable_blocks"],
    }


def measure_options(backbone: str, device: torch.device, compile_too: bool) -> dict[str, Any]:
    """GSF milliseconds per pair (batch 1, 320 px) under each inference option, with the largest
    and mean deviation (pixels) of its flow from the float32 eager flow under ``no_grad``. Each
    option is :class:`InferenceOptions` with that option alone on, on its own copy of the model;
    ``no_grad`` and ``inference_mode`` have every option off."""
    model = build_model(backbone, DEFAULT_INPUT, device)
    source, target = image_pair(DEFAULT_INPUT, 1, device)
    plain = InferenceOptions(channels_last=False)
    settings = {
        "inference_mode": plain,
        "channels_last": InferenceOptions(channels_last=True),
        "bf16_autocast": InferenceOptions(channels_last=False, bf16=True),
    }
    if compile_too:
        settings["compile"] = InferenceOptions(channels_last=False, compile=True)
    eager = FlowPredictor(copy.deepcopy(model), plain)
    predictors = {name: FlowPredictor(copy.deepcopy(model), o) for name, o in settings.items()}
    calls: dict[str, Callable[[], torch.Tensor]] = {
        "no_grad": lambda: _no_grad(eager, source, target)
    }
    calls.update({name: partial(p.predict, source, target) for name, p in predictors.items()})
    reference = calls["no_grad"]()
    result: dict[str, Any] = {"backbone": backbone, "input": DEFAULT_INPUT, "batch": 1}
    if compile_too:
        start = time.perf_counter()
        calls["compile"]()
        result["compile_first_call_ms"] = round((time.perf_counter() - start) * 1000.0, 1)
    times = time_interleaved(calls, device, warmup=2)
    result["options"] = {}
    for name, call in calls.items():
        error = (call() - reference).abs()
        result["options"][name] = {
            "gsf_ms_per_pair": round(times[name], 3),
            "speedup_over_inference_mode": round(times["inference_mode"] / times[name], 4),
            "flow_max_abs_diff_px": round(float(error.max()), 5),
            "flow_mean_abs_diff_px": round(float(error.mean()), 5),
        }
    return result


def _no_grad(predictor: FlowPredictor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The predictor's plain forward under ``torch.no_grad`` (no inference mode)."""
    with torch.no_grad():
        return predictor(source, target)


def parse_setting(text: str) -> dict[str, Any]:
    """``NAME=VALUE[,NAME=VALUE...]`` -> model options, each value read as YAML (``true`` and
    ``false`` are booleans, ``8`` and ``20.0`` numbers)."""
    options: dict[str, Any] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        options[name] = yaml.safe_load(value)
    return options


def measure_test_time_options(
    settings: list[str], device: torch.device, input_size: int = DEFAULT_INPUT
) -> list[dict[str, Any]]:
    """Per batch size, ms per pair of the untrained method's presets (``fast``, ``default``) and
    of the fast preset with each setting of test-time options, interleaved, with each one's
    ratio to ``fast``."""
    entries = []
    for batch in BATCHES:
        configs = {"fast": weight_free_config("fast"), "default": weight_free_config()}
        for setting in settings:
            configs[setting] = weight_free_config("fast", **parse_setting(setting))
        predictors = {
            name: FlowPredictor(GuidedFlowModel.from_config(config).to(device))
            for name, config in configs.items()
        }
        source, target = (
            x.contiguous(memory_format=torch.channels_last)
            for x in image_pair(input_size, batch, device)
        )
        with torch.inference_mode():
            calls = {
                name: partial(predictor.predict, source, target)
                for name, predictor in predictors.items()
            }
            times = time_interleaved(calls, device, warmup=2 if batch == 1 else 1)
        entries.append(
            {
                "batch": batch,
                "input": input_size,
                "ms_per_pair": {name: round(t / batch, 2) for name, t in times.items()},
                "ratio_to_fast": {name: round(t / times["fast"], 3) for name, t in times.items()},
            }
        )
        log(f"  {json.dumps(entries[-1])}")
    return entries


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="intra-op CPU threads (default: torch's default, %(default)s here)",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--matching-input", default="global", choices=("global", "local"))
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    parser.add_argument(
        "--full",
        action="store_true",
        help="add the 40 x 40 grid (640 x 640 input) and torch.compile",
    )
    parser.add_argument(
        "--test-time",
        nargs="+",
        metavar="NAME=VALUE[,NAME=VALUE]",
        help="time only the untrained method's presets and these settings of test-time options",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its JSON object as the last line of standard output:
    ``device``, ``threads``, ``peak_rss_mb``, ``runs`` (one entry per backbone, input size and
    batch), ``train`` (one entry per stage and backbone), plus ``inference_options_default``,
    ``inference_options``, ``loadavg_start`` / ``loadavg_end`` (1, 5, 15 min), ``torch`` and
    ``wall_s``."""
    args = build_parser().parse_args(argv)
    if args.threads < 1:
        raise SystemExit("--threads must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    MATCHING_INPUT["value"] = args.matching_input
    device = torch.device(args.device)
    start = time.perf_counter()
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    log(f"threads {args.threads}, device {device}, load average {loadavg_start}")
    if args.test_time:
        entries = measure_test_time_options(args.test_time, device)
        result = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": args.threads,
            "test_time_options": entries,
            "loadavg_start": loadavg_start,
            "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "torch": torch.__version__,
        }
        print(json.dumps(result))
        return 0

    configs = [(b, DEFAULT_INPUT, n) for b in args.backbones for n in BATCHES]
    if args.full:
        configs += [(b, FULL_INPUT, 1) for b in args.backbones]
    runs = []
    for backbone, input_size, batch in configs:
        log(f"inference: {backbone}, {input_size} px, batch {batch}")
        runs.append(measure_inference(backbone, input_size, batch, device))
        free_memory()
        log(f"  {json.dumps(runs[-1])}")
    options = []
    for backbone in args.backbones:
        log(f"inference options: {backbone}")
        options.append(measure_options(backbone, device, compile_too=args.full))
        free_memory()
        log(f"  {json.dumps(options[-1])}")
    train = []
    for backbone in args.backbones:
        for stage in (1, 2):
            log(f"training step: stage {stage}, {backbone}")
            train.append(measure_training(stage, backbone, device))
            free_memory()
            log(f"  {json.dumps(train[-1])}")

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": args.threads,
        "matching_input": args.matching_input,
        "peak_rss_mb": round(max(MEMORY.overall_mb, MEMORY.peak_mb()), 1),
        "runs": runs,
        "train": train,
        "inference_options_default": asdict(InferenceOptions()),
        "inference_options": options,
        "loadavg_start": loadavg_start,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
