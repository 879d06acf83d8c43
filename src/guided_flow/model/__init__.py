"""The method, plain PyTorch: features, volumes, networks, the model, losses and geometry."""

from guided_flow.model.flow_model import FlowOutput, GuidedFlowModel, ModelConfig

__all__ = ["FlowOutput", "GuidedFlowModel", "ModelConfig"]
