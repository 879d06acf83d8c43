"""Training that can learn (METHOD.md section 14): under the shipped optimiser settings the
pruning network prunes a match that L_geo rejects, and the stage-2 objective of the shipped
configs ranks the ground-truth flow above G' and the argmax of C."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from skimage import data

from data_modules.warps import sample_warp_params, synthesize_pairs
from guided_flow.io.images import normalise, resize_image
from guided_flow.model.volumes import argmax_flow
from guided_flow.training.stages import MatchingStage, PruningStage
from tests.helpers import load_benchmark

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
PRUNING_OPTIONS = (
    "optimizer", "lr", "pruning_lr_mult", "weight_decay", "momentum", "lambda_geo",
    "geo_weighting", "rho", "c_p", "window_n",
)  # fmt: skip
OBJECTIVE_OPTIONS = ("lambda_m", "lambda_sm", "temperature", "window_m", "match_features")


def config_options(name: str, keys: tuple[str, ...]) -> dict:
    """The stage options of an experiment config (its option groups' values, by name),
    restricted to ``keys``."""
    init_args = yaml.safe_load((EXPERIMENTS / name).read_text())["model"]["init_args"]
    options = {k: v for group in ("model", "loss", "optim") for k, v in init_args[group].items()}
    return {key: options[key] for key in keys if key in options}


def planted_features(grid: int = 8, dim: int = 32) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Unit features ``2 x dim x grid x grid`` of two pairs whose target is the source moved one
    cell right, except that in pair 0 source cell (3, 3)'s feature is planted at target cell
    (6, 0), far from where its neighbours go, and its true match is replaced by noise. Returns
    the two feature maps and the planted target cell's index."""
    generator = torch.Generator().manual_seed(0)
    source = F.normalize(torch.randn(2, dim, grid, grid, generator=generator), dim=1)
    target = F.normalize(torch.randn(2, dim, grid, grid, generator=generator), dim=1)
    target[..., 1:] = source[..., :-1]
    target[0, :, 6, 0] = source[0, :, 3, 3]
    target[0, :, 3, 4] = F.normalize(torch.randn(dim, generator=generator), dim=0)
    return source, target, 6 * grid + 0


def prune_planted_match(options: dict, steps: int) -> tuple[bool, list[float]]:
    """Train a stage-1 pruning network on the planted pairs with ``options``. Returns whether at
    some step the planted match fell below rho while every consistent match stayed above it,
    and the planted match's Q' per step."""
    grid = 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        stage = PruningStage.from_options(weights="none", input_size=16 * grid, **options)
    source, target, planted = planted_features(grid)
    optimizer = stage.configure_optimizers()
    stage.train()
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid - 1), indexing="ij")
    consistent = (slice(None), rows * grid + cols + 1, rows, cols)
    keep = ~((rows == 3) & (cols == 3))
    keep = torch.stack((keep, torch.ones_like(keep)))
    history, pruned = [], False
    for _ in range(steps):
        out = stage.model.forward_features(source, target, refine=False)
        refined = out.refined_confidence.detach()
        history.append(float(refined[0, planted, 3, 3]))
        consistent_ok = bool((refined[consistent][keep] > stage.hparams.model["rho"]).all())
        if history[-1] < stage.hparams.model["rho"] and consistent_ok:
            pruned = True
            break
        loss = stage.total_loss(stage.loss_terms(out, {}))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return pruned, history


@pytest.mark.slow
@pytest.mark.parametrize(("config", "steps"), [("demo.yaml", 100), ("stage1.yaml", 300)])
def test_planted_inconsistent_match_is_pruned(config: str, steps: int) -> None:
    options = config_options(config, PRUNING_OPTIONS)
    pruned, history = prune_planted_match(options, steps)
    assert history[0] > options.get("rho", 0.9)  # confident at the start: Q = 1, Q' = 0.99995
    assert pruned, f"planted match never pruned; its Q' went {history[0]:.4f} -> {history[-1]:.4f}"


@pytest.mark.slow
def test_unscaled_sgd_cannot_prune() -> None:
    """The control: the paper's SGD at lr 1e-5 without W_P's group multiplier never moves Q'."""
    options = {**config_options("stage1.yaml", PRUNING_OPTIONS), "pruning_lr_mult": 1.0}
    pruned, history = prune_planted_match(options, 300)
    assert not pruned
    assert history[-1] > 0.999


@pytest.fixture(scope="module")
def photo_pairs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic pairs of four different photographs at 320 px: source, target (``4 x 3 x 320 x
    320``), ground-truth flow in cells (``4 x 2 x 20 x 20``) and its valid cells (``4 x 1 x 20 x
    20`` bool)."""
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    images = torch.stack(
        [
            normalise(torch.from_numpy(resize_image(p, (320, 320))).permute(2, 0, 1) / 255.0)
            for p in photos
        ]
    )
    pair = synthesize_pairs(images, sample_warp_params(0, torch.arange(len(photos))))
    flow = F.interpolate(pair.flow_s2t, size=(20, 20), mode="bilinear", align_corners=False) / 16
    valid = F.interpolate(pair.flow_valid.float(), size=(20, 20), mode="bilinear") > 0.99
    return pair.source, pair.target, flow, valid


# stage2.yaml's ResNet-101 weights need a download: a single Lite0 layer stands in for it
@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "feature_layers"), [("demo_stage2.yaml", None), ("stage2.yaml", [10])]
)
def test_stage2_objective_points_at_the_truth(
    config: str, feature_layers: list[int] | None, photo_pairs
) -> None:
    """With the features fixed, lambda_M L_M + lambda_sm L_sm is lower at the ground truth than
    at G' and at the argmax of C, and descending it on tau from G' lowers the error."""
    source, target, truth, valid = photo_pairs
    options = config_options(config, OBJECTIVE_OPTIONS)
    stage = MatchingStage.from_options(feature_layers=feature_layers, **options).eval()
    with torch.no_grad():
        out = stage.model(source, target, refine=False)
    loss = stage.loss_config

    def objective(flow: torch.Tensor) -> torch.Tensor:
        terms = stage.loss_terms(dataclasses.replace(out, flow=flow), {})
        return loss.lambda_m * terms["match"] + loss.lambda_sm * terms["smooth"]

    def error(flow: torch.Tensor) -> float:
        return float((flow - truth).norm(dim=1, keepdim=True)[valid].mean())

    at_truth = objective(truth)
    assert at_truth < objective(out.guidance)
    assert at_truth < objective(argmax_flow(out.correlation))

    flow = out.guidance.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([flow], lr=0.02)
    for _ in range(100):
        optimizer.zero_grad()
        objective(flow).backward()
        optimizer.step()
    assert error(flow.detach()) < 0.95 * error(out.guidance)


def test_benchmark_overrides_win_over_the_config_s_grouped_options() -> None:
    """``--set stage2.lr=1e-4`` must reach the optimiser although the config groups its own lr:
    options given by name go into their group, over the config's value."""
    learning = load_benchmark("learning")
    plain = learning.model_options("demo_stage2.yaml")
    options = learning.model_options("demo_stage2.yaml", {"lr": 1e-4, "voting": "none"})
    assert options["optim"]["lr"] == 1e-4 != plain["optim"]["lr"]
    assert options["model"]["voting"] == "none" and plain["model"]["voting"] == "hough"
    assert options["loss"] == plain["loss"]
