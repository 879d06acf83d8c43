"""GuidedFlowModel: the Guided Semantic Flow network, a pair of images -> a dense semantic flow
(METHOD.md sections 1-8)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from torch import nn

from guided_flow.errors import ConfigError
from guided_flow.model import volumes
from guided_flow.model.backbone import STRIDE, FeatureExtractor
from guided_flow.model.feature_views import mirror_choice, view_features
from guided_flow.model.flow_output import FlowOutput
from guided_flow.model.local_cost import local_correlation
from guided_flow.model.networks import MatchingNet, PruningNet
from guided_flow.model.options import check_hyper_parameters, check_network_options
from guided_flow.model.subcell import subcell_refinement
from guided_flow.model.voting import voted_volume

# New options that change the flow: a checkpoint written before them loads with these values.
PREDATED_OPTIONS = {"soft_argmax_refine": False}


@dataclass(frozen=True)
class ModelConfig:
    """Every option of :class:`GuidedFlowModel` (``--model.model.*`` on the command line).

    ``backbone``, ``weights``, ``feature_layers`` and ``trainable_blocks`` build the feature
    extractor (:class:`~guided_flow.model.backbone.FeatureExtractor`; ``feature_layers=None``: the
    backbone's default layers, ``trainable_blocks=None``: the training stage's default);
    ``input_size`` is the square network input in pixels, a multiple of ``feature_stride``, the
    feature grid's stride (16, the paper's; 8 is proposed, a hypercolumn with the backbone's last
    stride-8 block, :class:`~guided_flow.model.backbone.FeatureExtractor`). The rest
    are METHOD.md's: rho (section 4), c_P and N (section 5), c_M (section 7), the guidance model
    and the flow base (section 8 and the proposed soft-argmax base, with its sharpness beta).
    ``use_pruning_net`` and ``use_matching_net`` are ablation switches: off, Q' = Q and tau = the
    flow base alone (G' or S); the networks' weights are kept, only their use is switched.

    ``matching_input``: what W_M reads, ``"global"`` (C', the paper's) or ``"local"`` (proposed:
    C sampled in a ``(2 local_radius + 1)^2`` window of displacements around the flow base, plus
    the base flow itself with ``local_base_flow`` and the source features with
    ``local_source_features``, read by ``local_head``: a plain ``"conv"`` stack or Table 1's
    ``"encoder_decoder"``; the global input always has the encoder-decoder). ``pruning_mask``:
    ``"sigmoid"`` (the paper's Q' = Q sigmoid(z))
    or ``"relative"`` (proposed: Q' = min(1, Q sigmoid(z) / sigmoid(z0)), Q' = Q at
    initialisation with a live gradient), z starting at ``pruning_init_logit`` (z0).
    ``soft_argmax_refine``: S is moved below a cell where the features place the match
    (proposed, :mod:`~guided_flow.model.subcell`). ``feature_views``: features averaged over
    mirrored and rescaled views of each picture (proposed, :mod:`.feature_views`).
    ``cycle_consistency``: G keeps only the confident matches whose round trip comes back within
    a cell (proposed, :func:`~guided_flow.model.volumes.round_trip_consistent`). ``voting``:
    the geometric voting that rescores C for Q, the cycle test and G (proposed,
    :mod:`.voting`). ``mirror_choice``: each pair is matched against the target or its mirror
    image, whichever scores higher (proposed, :func:`.feature_views.mirror_choice`).
    ``adaptive_window``: S's Gaussian window widens where the confident matches around a cell
    disagree, c_M + their spread about G' (proposed, :func:`.volumes.guidance_spread`).
    """

    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"
    feature_layers: list[int] | None = None
    trainable_blocks: int | None = None
    input_size: int = 320
    feature_stride: int = 16
    rho: float = 0.9
    c_p: float = 5.0
    c_m: float = 5.0
    window_n: int = 5
    guidance_model: str = "translation"
    flow_base: str = "guidance"
    soft_argmax_beta: float = 50.0
    use_pruning_net: bool = True
    use_matching_net: bool = True
    matching_input: str = "global"
    local_radius: int = 4
    local_base_flow: bool = True
    local_source_features: bool = False
    local_head: str = "conv"
    pruning_mask: str = "sigmoid"
    pruning_init_logit: float = 10.0
    soft_argmax_refine: bool = True
    feature_views: str = "none"
    cycle_consistency: bool = False
    voting: str = "none"
    mirror_choice: bool = False
    adaptive_window: bool = False

    def check(self) -> None:
        """Raise ConfigError naming the first option outside its range."""
        if self.input_size <= 0:
            raise ConfigError(f"input_size={self.input_size} is invalid: it must be positive")
        check_hyper_parameters(
            self.rho,
            self.c_p,
            self.c_m,
            self.window_n,
            self.guidance_model,
            self.flow_base,
            self.soft_argmax_beta,
        )
        check_network_options(
            self.matching_input,
            self.local_radius,
            self.pruning_mask,
            self.local_head,
            self.feature_views,
            self.voting,
        )

    @classmethod
    def from_hparams(cls, hparams: Mapping) -> ModelConfig:
        """The model options of a checkpoint's hyper-parameters, nested under ``"model"``
        (0.2 and later) or flat (0.1); options a checkpoint predates take the value that keeps
        its flow (:data:`PREDATED_OPTIONS`), or else their defaults."""
        nested = hparams.get("model")
        options = {**PREDATED_OPTIONS, **(nested if isinstance(nested, Mapping) else hparams)}
        return cls(**{f.name: options[f.name] for f in fields(cls) if f.name in options})


class GuidedFlowModel(nn.Module):
    """Features -> C -> Q -> Q' (pruning net) -> G -> G' -> C' -> tau = G' + M(C').

    ``flow_base="soft_argmax"`` is the proposed tau = S + M(C'), S the soft-argmax of
    ``soft_argmax_beta`` C under the Gaussian of variance ``c_m`` around p_i + G'_i
    (:func:`~guided_flow.model.volumes.guided_soft_argmax`; weight-free, so an untrained model gives
    S), refined to sub-cell precision with ``soft_argmax_refine``
    (:func:`~guided_flow.model.subcell.subcell_refinement`).

    ``grid`` is the feature grid (h, w); the networks' first and last layers have h*w channels,
    so the input size must be ``grid * backbone.stride``. ``backbone=None`` builds a model that
    only accepts features (:meth:`forward_features`), for tests and custom extractors.
    """

    def __init__(
        self,
        backbone: FeatureExtractor | None,
        grid: tuple[int, int] = (20, 20),
        rho: float = 0.9,
        c_p: float = 5.0,
        c_m: float = 5.0,
        window_n: int = 5,
        guidance_model: str = "translation",
        flow_base: str = "guidance",
        soft_argmax_beta: float = 50.0,
        use_pruning_net: bool = True,
        use_matching_net: bool = True,
        matching_input: str = "global",
        local_radius: int = 4,
        local_base_flow: bool = True,
        local_source_features: bool = False,
        local_head: str = "conv",
        pruning_mask: str = "sigmoid",
        pruning_init_logit: float = 10.0,
        feature_channels: int | None = None,
        soft_argmax_refine: bool = True,
        feature_views: str = "none",
        cycle_consistency: bool = False,
        voting: str = "none",
        mirror_choice: bool = False,
        adaptive_window: bool = False,
    ) -> None:
        super().__init__()
        check_hyper_parameters(rho, c_p, c_m, window_n, guidance_model, flow_base, soft_argmax_beta)
        check_network_options(
            matching_input, local_radius, pruning_mask, local_head, feature_views, voting
        )
        self.feature_views, self.cycle_consistency = feature_views, cycle_consistency
        self.voting, self.mirror_choice = voting, mirror_choice
        self.adaptive_window = adaptive_window
        self.backbone = backbone
        self.grid = tuple(grid)
        self.rho, self.c_p, self.c_m = rho, c_p, c_m
        self.window_n, self.guidance_model = window_n, guidance_model
        self.flow_base, self.soft_argmax_beta = flow_base, soft_argmax_beta
        self.soft_argmax_refine = soft_argmax_refine
        self.use_pruning_net, self.use_matching_net = use_pruning_net, use_matching_net
        self.matching_input, self.local_radius = matching_input, local_radius
        self.local_base_flow, self.local_source_features = local_base_flow, local_source_features
        cells = self.grid[0] * self.grid[1]
        self.pruning_net = PruningNet(cells, pruning_init_logit, pruning_mask == "relative")
        in_channels, head = cells, "encoder_decoder"
        if matching_input == "local":
            head = local_head
            in_channels = (2 * local_radius + 1) ** 2 + 2 * local_base_flow
            if local_source_features:
                if feature_channels is None:
                    if backbone is None:
                        raise ConfigError("local_source_features needs the feature channels")
                    feature_channels = backbone.out_channels
                in_channels += feature_channels
        self.matching_net = MatchingNet(in_channels, head)

    @classmethod
    def from_config(cls, config: ModelConfig, trainable_blocks: int = 0) -> GuidedFlowModel:
        """The model of ``config``, its backbone's last ``trainable_blocks`` blocks trainable
        (``config.trainable_blocks`` wins when it is set)."""
        config.check()
        if config.trainable_blocks is not None:
            trainable_blocks = config.trainable_blocks
        extractor = FeatureExtractor(
            config.backbone,
            config.weights,
            trainable_blocks,
            config.feature_layers,
            config.feature_stride,
        )
        if config.input_size % extractor.stride:
            raise ConfigError(
                f"input_size={config.input_size} is invalid: it must be a multiple of the "
                f"backbone stride {extractor.stride}"
            )
        grid = (config.input_size // extractor.stride,) * 2
        return cls(
            extractor,
            grid,
            rho=config.rho,
            c_p=config.c_p,
            c_m=config.c_m,
            window_n=config.window_n,
            guidance_model=config.guidance_model,
            flow_base=config.flow_base,
            soft_argmax_beta=config.soft_argmax_beta,
            use_pruning_net=config.use_pruning_net,
            use_matching_net=config.use_matching_net,
            matching_input=config.matching_input,
            local_radius=config.local_radius,
            local_base_flow=config.local_base_flow,
            local_source_features=config.local_source_features,
            local_head=config.local_head,
            pruning_mask=config.pruning_mask,
            pruning_init_logit=config.pruning_init_logit,
            soft_argmax_refine=config.soft_argmax_refine,
            feature_views=config.feature_views,
            cycle_consistency=config.cycle_consistency,
            voting=config.voting,
            mirror_choice=config.mirror_choice,
            adaptive_window=config.adaptive_window,
        )

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) in pixels that gives the model's grid."""
        stride = self.backbone.stride if self.backbone is not None else STRIDE
        return self.grid[0] * stride, self.grid[1] * stride

    def forward(
        self, source_image: torch.Tensor, target_image: torch.Tensor, refine: bool = True
    ) -> FlowOutput:
        """``B x 3 x H x W`` normalised images (H, W = :attr:`input_size`) -> FlowOutput.
        ``refine=False`` skips C' and the matching network (tau = G'), which stage 1 does not
        train."""
        if self.backbone is None:
            raise ConfigError("this model was built without a backbone: call forward_features")
        if tuple(source_image.shape[-2:]) != self.input_size:
            raise ConfigError(
                f"input size {tuple(source_image.shape[-2:])} does not match the model's "
                f"{self.input_size} (grid {self.grid} x stride {self.backbone.stride})"
            )
        # One backbone pass over all images keeps BatchNorm statistics and kernels shared.
        images = [source_image, target_image]
        if self.mirror_choice:
            images.append(target_image.flip(-1))
        features = view_features(self.backbone, torch.cat(images), self.feature_views)
        source_features, target_features, *mirrored = features.chunk(len(images), dim=0)
        if mirrored:
            target_features, _ = mirror_choice(
                source_features, target_features, mirrored[0].flip(-1)
            )
        return self.forward_features(source_features, target_features, refine)

    def matching_net_input(
        self,
        volume: torch.Tensor,
        guidance: torch.Tensor,
        base_flow: torch.Tensor,
        source_features: torch.Tensor,
    ) -> torch.Tensor:
        """What W_M reads: C' (``B x (h*w) x h x w``) for ``matching_input="global"``; for
        ``"local"``, C around the flow base (``B x (2r+1)^2 x h x w``), then the base flow in
        grid widths (``B x 2 x h x w``) and the source features, as configured."""
        if self.matching_input == "global":
            return volumes.guided_correlation(volume, guidance, self.c_m)
        parts = [local_correlation(volume, base_flow, self.local_radius)]
        if self.local_base_flow:
            parts.append(base_flow / max(self.grid))
        if self.local_source_features:
            parts.append(source_features)
        return torch.cat(parts, dim=1)

    def forward_features(
        self,
        source_features: torch.Tensor,
        target_features: torch.Tensor,
        refine: bool = True,
        use_pruning_net: bool | None = None,
        use_matching_net: bool | None = None,
    ) -> FlowOutput:
        """L2-normalised features ``B x D x h x w`` of both images -> FlowOutput.
        ``use_pruning_net`` / ``use_matching_net`` (``None``: the model's own switches) ablate a
        network for this pass: Q' = Q, or tau = the flow base alone."""
        if use_pruning_net is None:
            use_pruning_net = self.use_pruning_net
        if use_matching_net is None:
            use_matching_net = self.use_matching_net
        if tuple(source_features.shape[-2:]) != self.grid:
            raise ConfigError(
                f"feature grid {tuple(source_features.shape[-2:])} does not match the model's "
                f"grid {self.grid}"
            )
        volume = volumes.correlation(source_features, target_features)
        voted = voted_volume(volume, self.voting)
        confidence = volumes.soft_mutual_confidence(voted)
        refined = self.pruning_net.refine(confidence) if use_pruning_net else confidence
        kept = refined
        if self.cycle_consistency:
            kept = refined * volumes.round_trip_consistent(voted)
        sparse, weight = volumes.sparse_guidance(kept, self.rho)
        guidance = volumes.interpolate_guidance(
            sparse, weight, self.c_p, self.window_n, self.guidance_model
        )
        flow = guidance
        if refine:
            if self.flow_base == "soft_argmax":
                window: float | torch.Tensor = self.c_m
                if self.adaptive_window:
                    window = self.c_m + volumes.guidance_spread(
                        sparse, weight, guidance, self.c_p, self.window_n
                    )
                flow = volumes.guided_soft_argmax(volume, guidance, window, self.soft_argmax_beta)
                if self.soft_argmax_refine:
                    flow = subcell_refinement(flow, source_features, target_features)
            if use_matching_net:
                matching_input = self.matching_net_input(volume, guidance, flow, source_features)
                flow = flow + self.matching_net(matching_input)
        return FlowOutput(
            flow=flow,
            guidance=guidance,
            sparse_guidance=sparse,
            guidance_weight=weight,
            correlation=volume,
            confidence=confidence,
            refined_confidence=refined,
            guided_confidence=kept,
            source_features=source_features,
            target_features=target_features,
            rho=self.rho,
        )
