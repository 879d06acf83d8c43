"""Match two pictures from Python: :class:`GuidedSemanticFlow` wraps a :class:`GuidedFlowModel`
for inference on images of any size and aspect ratio.

Each image is resized (anisotropically, bilinear) to the model's square input, the model runs
once in each direction, and every result is mapped back to the **original pixels** of the
images (pixel centres at integers, the convention of
:func:`~guided_flow.model.geometry.rescale_points`).
Flows are ``H x W x 2`` float32 arrays of (dx, dy) displacements in pixels: ``flow_s2t`` lives
on the source grid and points into the target, ``flow_t2s`` the reverse.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from guided_flow.errors import ConfigError, GuidedFlowError, MatchFailure, one_line
from guided_flow.io.batches import read_in_batches
from guided_flow.io.images import (
    DEFAULT_MAX_PIXELS,
    load_image,
    normalise,
    pil_to_rgb,
    read_image,
    resize_image,
    scale_16bit,
)
from guided_flow.io.resample import resize_bilinear, upsample_flow, warp_picture
from guided_flow.model.flow_model import GuidedFlowModel, ModelConfig
from guided_flow.model.geometry import (
    rescale_points,
    resize_scale,
    transfer_original_points,
)

ImageInput = str | os.PathLike | Image.Image | np.ndarray | torch.Tensor
"""A file path, a PIL image, an ``H x W (x 3|4)`` array or a ``(3|1) x H x W`` tensor; arrays
and tensors are uint8 in 0..255, uint16 in 0..65535 or float in [0, 1]. Files and PIL images are
turned upright by their EXIF orientation (:mod:`guided_flow.io.images`)."""

_RANDOM_WEIGHTS_WARNING = "BACKBONE .* HAS RANDOM WEIGHTS"


class CheckpointError(GuidedFlowError):
    """A checkpoint file is missing, unreadable or not a guided-flow checkpoint."""


@dataclass(frozen=True)
class MatchResult:
    """What :meth:`GuidedSemanticFlow.match` returns, everything in original pixels.

    Attributes:
        flow_s2t: ``H_s x W_s x 2`` float32: for each source pixel, the (dx, dy) in pixels to its
            match in the target.
        flow_t2s: ``H_t x W_t x 2`` float32: the same from the target into the source (from
            running the model on (target, source)); it warps the source onto the target.
        confidence: ``H_s x W_s`` float32 in [0, 1]: each source pixel's largest refined
            confidence Q' over the target, bilinearly upsampled from the feature grid.
        confident_matches: ``(source_points, target_points)``, each ``N x 2`` float32 (x, y)
            pixels of its own image: every source feature cell with a match in Q' > rho (its
            centre) and the Q'-weighted mean of its confident target cells (p_i + G_i).
        keypoints: ``K x 2`` float64 target pixels: the given source keypoints transferred by the
            flow (``None`` when none were given).
        flow_input: ``2 x H x W`` float32: tau in input pixels on the network's input grid
            (``H x W``, both images resized to it), from which every transfer is read.
    """

    flow_s2t: np.ndarray
    flow_t2s: np.ndarray
    confidence: np.ndarray
    confident_matches: tuple[np.ndarray, np.ndarray]
    keypoints: np.ndarray | None
    flow_input: np.ndarray


def as_rgb(image: ImageInput, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Any :data:`ImageInput` -> ``H x W x 3`` uint8 RGB, upright. Files are read with
    :func:`~guided_flow.io.images.load_image` (a missing or unreadable file, or one of more than
    ``max_pixels`` pixels, raises :class:`~guided_flow.errors.DataError` naming it); grey images
    are repeated over the three channels, 16-bit ones scaled to 8 bits and alpha is dropped.
    Raises TypeError / ValueError for other types and shapes."""
    if isinstance(image, str | os.PathLike):
        return load_image(image, max_pixels=max_pixels)
    if isinstance(image, Image.Image):
        return pil_to_rgb(image)
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"an image tensor must be 3 x H x W or 1 x H x W, got {image.shape}")
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(
            "an image must be a file path, a PIL image, a numpy array or a torch tensor, "
            f"not {type(image).__name__}"
        )
    array = image[..., None] if image.ndim == 2 else image
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or 0 in array.shape[:2]:
        raise ValueError(f"an image array must be H x W, H x W x 1, 3 or 4, got {image.shape}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("a float image must be finite (values in [0, 1])")
        array = np.rint(np.clip(array, 0.0, 1.0) * 255.0)
    elif array.dtype == np.uint16:
        array = scale_16bit(array)
    elif array.dtype != np.uint8:
        raise ValueError(
            f"an image array must be uint8, uint16 or float in [0, 1], not {array.dtype}"
        )
    rgb = np.broadcast_to(array[..., :3], (*array.shape[:2], 3))
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def as_points(points: object) -> np.ndarray:
    """Keypoints given as ``[[x, y], ...]`` (any array-like, ``K x 2`` pixels) -> a float64
    ``K x 2`` array. Raises ValueError unless they are finite numbers of that shape."""
    try:
        array = np.asarray(points, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError("keypoints must be a list of [x, y] number pairs") from error
    if array.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2:
        raise ValueError(f"keypoints must be a list of [x, y] pairs, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("keypoints must be finite numbers")
    return array


def flow_to_original_pixels(
    flow_s2t: torch.Tensor, source_size: tuple[int, int], target_size: tuple[int, int]
) -> torch.Tensor:
    """Map a flow on the network's input grid to the original images.

    ``flow_s2t``: ``2 x H x W`` input pixels (source input grid -> target input grid);
    ``source_size`` / ``target_size``: the original (H, W) of each image, which were resized
    (each with its own per-axis factors) to ``H x W``. Each original source pixel p goes to the
    input grid (q = (p + 0.5) s_source - 0.5), takes the flow there (bilinear, clamped to the
    grid), and the matched input position returns to the original target with the target's
    factors; the result is that position minus p. Returns ``H_s x W_s x 2`` pixels, same dtype,
    computed a band of rows at a time (:func:`~guided_flow.io.resample.upsample_flow`)."""
    return upsample_flow(flow_s2t, source_size, target_size)


def warp_source(source: np.ndarray, flow_t2s: np.ndarray) -> np.ndarray:
    """The source warped onto the target: ``source`` (``H_s x W_s x 3`` uint8) bilinearly sampled
    at ``q + flow_t2s(q)`` for every target pixel q (``flow_t2s``: ``H_t x W_t x 2`` pixels).
    Samples outside the source, and non-finite flows, are black. Returns ``H_t x W_t x 3`` uint8,
    computed a band of rows at a time (:func:`~guided_flow.io.resample.warp_picture`)."""
    return warp_picture(source, flow_t2s)


# The weight-free method with no checkpoint: the flow base that scored best on held-out real
# pairs (docs/learning.md: the guided soft-argmax S beats G' and the argmax of C on every fold).
WEIGHT_FREE_FLOW_BASE = "soft_argmax"
WEIGHT_FREE_BETA = 50.0


# Test-time presets: weight-free options that no weight depends on, so they apply to a
# checkpoint's model too. "default" is the most accurate setting measured on held-out real pairs
# (the guidance chosen by Hough voting over displacements, docs/decisions.md); "fast" is 0.2's
# default, for users who need every millisecond. Cycle consistency adds nothing measurable once
# the matches are voted, so neither preset turns it on.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {"voting": "hough", "cycle_consistency": False},
    "fast": {"voting": "none", "cycle_consistency": False},
}


def preset_options(preset: str) -> dict[str, Any]:
    """The test-time options of ``preset`` (a key of :data:`PRESETS`); ConfigError otherwise."""
    if preset not in PRESETS:
        raise ConfigError(f"preset={preset!r} is invalid: choose one of {tuple(PRESETS)}")
    return dict(PRESETS[preset])


def weight_free_config(preset: str = "default", **options: Any) -> ModelConfig:
    """The options of the weight-free method (:data:`WEIGHT_FREE_FLOW_BASE` at
    :data:`WEIGHT_FREE_BETA`, the test-time options of ``preset``), with ``options`` of
    :class:`ModelConfig` over them."""
    defaults = {"flow_base": WEIGHT_FREE_FLOW_BASE, "soft_argmax_beta": WEIGHT_FREE_BETA}
    return ModelConfig(**{**defaults, **preset_options(preset), **options})


def apply_preset(model: GuidedFlowModel, preset: str) -> GuidedFlowModel:
    """``model`` (in place, returned) with the test-time options of ``preset``."""
    for name, value in preset_options(preset).items():
        setattr(model, name, value)
    return model


class GuidedSemanticFlow:
    """Dense semantic flow between two pictures of any size.

    ``GuidedSemanticFlow()`` is the untrained method on the embedded ImageNet EfficientNet-Lite0
    backbone (see :meth:`untrained`); :meth:`from_checkpoint` loads trained networks. A model
    given directly is used as it is. The model is kept in eval mode on ``device``.
    """

    def __init__(
        self, model: GuidedFlowModel | None = None, device: str | torch.device = "cpu"
    ) -> None:
        if model is None:
            model = GuidedFlowModel.from_config(weight_free_config())
        if model.backbone is None:
            raise ValueError("GuidedSemanticFlow needs a model with a backbone")
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.checkpoint: str | None = None
        """The checkpoint the weights came from (``None``: untrained or given directly)."""

    @classmethod
    def untrained(
        cls,
        backbone: str = "efficientnet_lite0",
        input_size: int = 320,
        device: str | torch.device = "cpu",
        flow_base: str = WEIGHT_FREE_FLOW_BASE,
        preset: str = "default",
    ) -> GuidedSemanticFlow:
        """The method before training: ImageNet features of ``backbone`` (embedded for
        efficientnet_lite0, downloaded by torchvision for the others), the pruning net passing
        Q through (Q' = 0.99995 Q) and a zero matching residual, so the flow tau is the flow
        base: by default the guided soft-argmax S (the best weight-free setting on held-out
        real pairs), or the interpolated guidance G' with ``flow_base="guidance"``.
        ``input_size``: pixels of the square network input, a multiple of 16. ``preset``: the
        test-time options of :data:`PRESETS` (``"fast"``: 0.2's default)."""
        config = weight_free_config(
            preset, backbone=backbone, input_size=input_size, flow_base=flow_base
        )
        return cls.from_config(config, device)

    @classmethod
    def from_config(
        cls, config: ModelConfig, device: str | torch.device = "cpu"
    ) -> GuidedSemanticFlow:
        """The model of ``config`` with freshly initialised networks (see :meth:`untrained`)."""
        return cls(GuidedFlowModel.from_config(config), device)

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, map_location: str | torch.device = "cpu"
    ) -> GuidedSemanticFlow:
        """The trained networks of a guided-flow Lightning checkpoint (stage 1 or 2: both hold
        the whole model, backbone included), on the device ``map_location``. Raises
        :class:`CheckpointError` naming the file when it is missing, unreadable or does not
        hold a guided-flow model."""
        name = os.fspath(path)
        if not os.path.isfile(name):
            raise CheckpointError(f"{name}: no such checkpoint file")
        try:
            checkpoint = torch.load(name, map_location=map_location, weights_only=True)
        except Exception as error:  # the unpickler fails in many ways on a foreign file
            reason = f"{type(error).__name__}: {one_line(error)}"
            raise CheckpointError(f"{name}: not a readable checkpoint ({reason})") from error
        if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
            raise CheckpointError(f"{name}: not a Lightning checkpoint (no state_dict)")
        invalid = f"{name}: does not hold a guided-flow model"
        try:
            # Every backbone weight comes from the checkpoint: build the trunk without loading
            # (or downloading) the ImageNet weights it was initialised from.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", _RANDOM_WEIGHTS_WARNING, UserWarning)
                config = ModelConfig.from_hparams(checkpoint.get("hyper_parameters", {}))
                model = GuidedFlowModel.from_config(replace(config, weights="none"))
            state = {
                key.removeprefix("model."): value
                for key, value in checkpoint["state_dict"].items()
                if key.startswith("model.")
            }
            keys = model.load_state_dict(state, strict=False)
        except (GuidedFlowError, RuntimeError, TypeError) as error:
            raise CheckpointError(f"{invalid} ({one_line(error)[:300]})") from error
        if keys.missing_keys or keys.unexpected_keys:
            raise CheckpointError(
                f"{invalid}: {len(keys.missing_keys)} missing keys {keys.missing_keys[:3]}, "
                f"{len(keys.unexpected_keys)} unexpected keys {keys.unexpected_keys[:3]}"
            )
        matcher = cls(model, map_location)
        matcher.checkpoint = name
        return matcher

    @property
    def input_size(self) -> tuple[int, int]:
        """(H, W) in pixels that every image is resized to for the network."""
        return self.model.input_size

    def _network_input(self, rgb: np.ndarray) -> torch.Tensor:
        """``H x W x 3`` uint8 -> ``3 x H' x W'`` normalised float on the model's device."""
        resized = resize_image(rgb, self.input_size)
        pixels = torch.from_numpy(resized).permute(2, 0, 1).to(self.device, torch.float32)
        return normalise(pixels / 255.0)

    def _picture(
        self, image: ImageInput, max_pixels: int | None
    ) -> tuple[np.ndarray, tuple[int, int]]:
        """The picture the network input is resized from, and the full upright (H, W): a JPEG
        file is decoded at a reduced scale (Pillow's draft) that keeps twice the input size."""
        if isinstance(image, str | os.PathLike):
            side = 2 * max(self.input_size)
            return read_image(image, max_pixels=max_pixels, min_side=side)
        rgb = as_rgb(image)
        return rgb, (rgb.shape[0], rgb.shape[1])

    def match(
        self,
        source: ImageInput,
        target: ImageInput,
        source_kps: object | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> MatchResult:
        """Match ``source`` to ``target`` (see :data:`ImageInput`; any sizes) and transfer
        ``source_kps`` (``K x 2`` (x, y) original source pixels, optional). Pictures are upright
        (EXIF orientation); files of more than ``max_pixels`` pixels (None: no limit) raise
        :class:`~guided_flow.errors.DataError`.

        Returns a :class:`MatchResult` in original pixels."""
        pictures = [self._picture(image, max_pixels) for image in (source, target)]
        inputs = torch.stack([self._network_input(rgb) for rgb, _ in pictures])
        sizes = [size for _, size in pictures]
        del pictures  # a big picture is not kept while its flow is upsampled
        kps = None if source_kps is None else as_points(source_kps)
        return self._match_batch([(inputs, sizes, kps)])[0]

    def _to_original(self, points: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """``N x 2`` input pixels -> ``N x 2`` float32 pixels of an original image of
        ``size = (H, W)``."""
        scale = resize_scale(torch.tensor([size], device=points.device), self.input_size)[0]
        return rescale_points(points.double(), 1.0 / scale).float().cpu().numpy()

    def _transfer(
        self,
        flow_s2t: torch.Tensor,
        kps: np.ndarray,
        source_size: tuple[int, int],
        target_size: tuple[int, int],
    ) -> np.ndarray:
        """Transfer ``kps`` (``K x 2`` original source pixels) by ``flow_s2t`` (``2 x H x W``
        input pixels), read bilinearly at the keypoints' exact input positions. Returns
        ``K x 2`` float64 original target pixels."""
        if len(kps) == 0:
            return kps.copy()
        points = torch.from_numpy(kps).to(flow_s2t.device)
        return transfer_original_points(flow_s2t, points, source_size, target_size).cpu().numpy()

    def match_many(
        self,
        pairs: Iterable[Sequence[Any]],
        batch_size: int = 8,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> Iterator[MatchResult | MatchFailure]:
        """Match each ``(source, target[, source_kps])`` of ``pairs`` as :meth:`match` does, the
        network on ``batch_size`` pairs at a time. Yields, in order, each pair's
        :class:`MatchResult`, or a :class:`~guided_flow.errors.MatchFailure` (``index``: its
        0-based position) when it cannot be read; the others go on."""

        def read(pair: Sequence[Any]) -> tuple[torch.Tensor, list[tuple[int, int]], Any]:
            if isinstance(pair, str | os.PathLike) or len(pair) not in (2, 3):
                raise TypeError("a pair is (source, target) or (source, target, source_kps)")
            pictures = [self._picture(image, max_pixels) for image in pair[:2]]
            kps = None if len(pair) == 2 or pair[2] is None else as_points(pair[2])
            inputs = torch.stack([self._network_input(rgb) for rgb, _ in pictures])
            return inputs, [size for _, size in pictures], kps

        for batch in read_in_batches(pairs, batch_size, read):
            yield from [batch] if isinstance(batch, MatchFailure) else self._match_batch(batch)

    def _match_batch(self, batch: list[tuple[torch.Tensor, Any, Any]]) -> list[MatchResult]:
        """B read pairs (``2 x 3 x H x W`` inputs, sizes, keypoints) -> their results (the one
        computation of :meth:`match` and :meth:`match_many`)."""
        backbone, count, size = self.model.backbone, len(batch), self.input_size
        assert backbone is not None  # checked in __init__
        results = []
        with torch.inference_mode():
            features = backbone(torch.cat([inputs for inputs, _, _ in batch]))  # s0 t0 s1 t1 ...
            both = (features[0::2], features[1::2])
            out = self.model.forward_features(torch.cat(both), torch.cat(both[::-1]))
            flows = out.flow_pixels(size)  # 2B x 2 x H x W: pair i at i, its reverse at B + i
            best = out.refined_confidence[:count].amax(dim=1)  # B x h x w
            for i, (_, (s_size, t_size), kps) in enumerate(batch):
                confidence = resize_bilinear(best[i].float().cpu().numpy(), s_size)
                s2t = flow_to_original_pixels(flows[i], s_size, t_size).cpu().numpy()
                t2s = flow_to_original_pixels(flows[count + i], t_size, s_size).cpu().numpy()
                s_points, t_points = out.confident_matches(i, size)
                matches = self._to_original(s_points, s_size), self._to_original(t_points, t_size)
                kps = None if kps is None else self._transfer(flows[i], kps, s_size, t_size)
                tau = flows[i].float().cpu().numpy()  # flow_input
                results.append(MatchResult(s2t, t2s, confidence, matches, kps, tau))
        return results
