"""benchmarks/objective_reach.py: the flow that stage 2's objective reaches without a network."""

from __future__ import annotations

import torch

from guided_flow.training.stages import MatchingStage
from tests.helpers import load_benchmark


def test_on_an_identity_pair_the_objective_brings_a_shifted_flow_back_to_zero() -> None:
    """L_M's positive is the source cell's own features where the flow is right, so from a
    flow half a cell off everywhere Adam moves every cell back towards zero."""
    reach = load_benchmark("objective_reach")
    torch.manual_seed(0)
    stage = MatchingStage.from_options(
        backbone="resnet18", weights="none", input_size=64, temperature=0.1
    ).eval()
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    batch = {"source_image": image, "target_image": image}
    start = torch.full((1, 2, 4, 4), 0.5)
    reached = reach.optimise(stage, batch, start, lambda_sm=0.1, steps=60, lr=0.05)
    assert reached.abs().mean() < 0.2 * start.abs().mean()
    assert torch.equal(start, torch.full((1, 2, 4, 4), 0.5))  # the start is left as it was
