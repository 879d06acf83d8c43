"""The LightningModules of both stages, their option groups, optimisers and callbacks."""

from guided_flow.training.stages import GuidedFlowStage, MatchingStage, PruningStage

__all__ = ["GuidedFlowStage", "MatchingStage", "PruningStage"]
