"""Random synthetic warps with dense ground-truth flow (METHOD.md section 11).

A warp ``T = A o S`` composes a local thin-plate spline ``S`` and a global affine ``A`` and maps
each SOURCE pixel to its match in the TARGET (proposed formulation: the paper does not say how the
two are combined; we apply the spline first, on a regular control grid spanning the image). The
target is the original image and the source is sampled from it, ``source(q) = target(T(q))``, so
nothing is inverted and the ground truth is exact: ``flow_s2t(q) = T(q) - q``.

Parameters live in the **unit frame** of an image: origin at the image centre, sides of length 1,
x to the right and y down; pixel ``(x, y)`` (centres at integers) sits at
``((x - (W - 1) / 2) / W, (y - (H - 1) / 2) / H)``. Rotations and scales act in this frame, so
they are rigid only on square images (the project's inputs are square).

Each sample's parameters are a pure function of ``(seed, key)``: they are drawn on the CPU from a
counter-based hash (splitmix64), so a pair is identical in every run, process and device and does
not depend on its batch neighbours.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import kornia
import numpy as np
import torch
from kornia.geometry.transform import get_tps_transform, warp_points_tps

from guided_flow.errors import ConfigError
from guided_flow.model.geometry import cell_positions, warp_by_flow

_KEY_EPOCH_STRIDE = 2**32
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)
# How far (unit frame, image side = 1) the spline may leave a control point from its moved
# position: round-off of the float64 12 x 12 solve is about 1e-15; a wrong convention misses by
# about 1e-2.
_CONTROL_POINT_TOLERANCE = 1e-9


@dataclass(frozen=True)
class WarpConfig:
    """Ranges of the random warps, in the unit frame (image side = 1) and degrees.

    Defaults follow METHOD.md section 11: translation within +-0.15 [S], rotation uniform in
    +-10 degrees [S], isotropic scale uniform in [0.8, 1.2] [S], a 3 x 3 TPS control grid [D] whose
    points each move uniformly within +-0.1 per axis [S]. Proposed formulation (the spread of the
    Gaussian is not stated): each translation component is a normal with ``translation_sigma =
    0.05`` (a third of the bound) truncated to ``+-max_translation`` (sampled by inverse CDF, so
    no mass piles up at the bound). Set a range to 0 (or the scales to 1) to switch a part off.
    """

    max_translation: float = 0.15
    translation_sigma: float = 0.05
    max_rotation_deg: float = 10.0
    min_scale: float = 0.8
    max_scale: float = 1.2
    tps_grid_size: int = 3
    max_tps_offset: float = 0.1

    def __post_init__(self) -> None:
        for name in ("max_translation", "max_rotation_deg", "max_tps_offset"):
            if getattr(self, name) < 0:
                raise ConfigError(f"warp option {name} must be >= 0, got {getattr(self, name)}")
        if self.translation_sigma <= 0:
            raise ConfigError(
                f"warp option translation_sigma must be > 0, got {self.translation_sigma}"
            )
        if not 0 < self.min_scale <= self.max_scale:
            raise ConfigError(
                "warp options need 0 < min_scale <= max_scale, "
                f"got {self.min_scale} and {self.max_scale}"
            )
        if self.tps_grid_size < 2:
            raise ConfigError(f"warp option tps_grid_size must be >= 2, got {self.tps_grid_size}")


@dataclass
class WarpParams:
    """A batch of warps in the unit frame.

    ``affine``: ``B x 2 x 3``, ``A(u) = affine[:, :, :2] @ u + affine[:, :, 2]``.
    ``tps_offsets``: ``B x K x 2`` (K = g * g), the (dx, dy) moves of the regular control grid of
    :func:`tps_control_points`; the spline maps control point k to ``point_k + offset_k``.
    """

    affine: torch.Tensor
    tps_offsets: torch.Tensor

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> WarpParams:
        """Both tensors moved to ``device`` and cast to ``dtype``."""
        return WarpParams(
            self.affine.to(device=device, dtype=dtype),
            self.tps_offsets.to(device=device, dtype=dtype),
        )

    @classmethod
    def identity(
        cls, batch: int, grid_size: int = 3, device: torch.device | str | None = None
    ) -> WarpParams:
        """``batch`` identity warps (float32)."""
        affine = torch.eye(2, 3, device=device).expand(batch, 2, 3).clone()
        return cls(affine, torch.zeros(batch, grid_size * grid_size, 2, device=device))


@dataclass
class SyntheticPair:
    """A batch of synthetic pairs.

    ``source``, ``target``: ``B x C x H x W`` (the images' dtype); ``flow_s2t``: ``B x 2 x H x W``
    pixels on the source grid (channel 0 dx, 1 dy); ``flow_valid``: ``B x 1 x H x W`` bool, True
    where ``q + flow_s2t(q)`` lies inside the target (``[0, W-1] x [0, H-1]``).
    """

    source: torch.Tensor
    target: torch.Tensor
    flow_s2t: torch.Tensor
    flow_valid: torch.Tensor


def warp_key(epoch: int | torch.Tensor, index: int | torch.Tensor) -> int | torch.Tensor:
    """Key of training pair ``index`` (``0 <= index < 2**32``) in ``epoch`` (>= 0):
    ``(epoch + 1) * 2**32 + index``. Validation and test pairs use their plain index as key, which
    never collides with a training key. Works on ints and int64 tensors alike."""
    return (epoch + 1) * _KEY_EPOCH_STRIDE + index


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, a bijective 64-bit mixer, on a uint64 array (wrapping)."""
    values = (values ^ (values >> np.uint64(30))) * _MIX_1
    values = (values ^ (values >> np.uint64(27))) * _MIX_2
    return values ^ (values >> np.uint64(31))


def _uniforms(seed: int, keys: np.ndarray, count: int) -> torch.Tensor:
    """``B x count`` float64 uniforms in the open interval (0, 1): draw j of sample b is a hash of
    ``(seed, keys[b], j)`` only. ``keys``: int64 array of length B."""
    seed_bits = np.array([seed % 2**64], dtype=np.uint64)
    streams = _splitmix64(_splitmix64(seed_bits) ^ keys.astype(np.uint64))  # B
    counters = np.arange(1, count + 1, dtype=np.uint64) * _GAMMA  # count
    bits = _splitmix64(streams[:, None] + counters[None, :])
    return torch.from_numpy(((bits >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53)


def _truncated_normal(uniforms: torch.Tensor, sigma: float, bound: float) -> torch.Tensor:
    """Normal(0, sigma) truncated to [-bound, bound] by inverse CDF of float64 uniforms."""
    if bound == 0:
        return torch.zeros_like(uniforms)
    low = torch.special.ndtr(torch.tensor(-bound / sigma, dtype=torch.float64))
    probabilities = low + uniforms * (1 - 2 * low)
    return (sigma * torch.special.ndtri(probabilities)).clamp(-bound, bound)


def sample_warp_params(
    seed: int,
    keys: torch.Tensor,
    config: WarpConfig | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> WarpParams:
    """Random warps, one per key: sample b is a pure function of ``(seed, keys[b])`` and
    ``config`` (computed in float64 on the CPU, then cast), whatever the batch, process or device.

    ``keys``: ``B`` int64 (a pair index, or :func:`warp_key` for training). Returns
    :class:`WarpParams` on ``device`` (default: that of ``keys``).
    """
    config = config or WarpConfig()
    grid_points = config.tps_grid_size**2
    keys_np = keys.detach().to("cpu", torch.int64).reshape(-1).numpy()
    draws = _uniforms(seed, keys_np, 4 + 2 * grid_points)
    translation = _truncated_normal(draws[:, 0:2], config.translation_sigma, config.max_translation)
    angle = (2 * draws[:, 2] - 1) * math.radians(config.max_rotation_deg)
    scale = config.min_scale + draws[:, 3] * (config.max_scale - config.min_scale)
    cos, sin = scale * torch.cos(angle), scale * torch.sin(angle)
    row_x = torch.stack((cos, -sin, translation[:, 0]), dim=1)
    row_y = torch.stack((sin, cos, translation[:, 1]), dim=1)
    affine = torch.stack((row_x, row_y), dim=1)
    offsets = (2 * draws[:, 4:] - 1) * config.max_tps_offset
    params = WarpParams(affine, offsets.view(-1, grid_points, 2))
    return params.to(device=keys.device if device is None else device, dtype=dtype)


def tps_control_points(
    grid_size: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The regular ``g x g`` control grid spanning the image, in the unit frame: ``(g*g) x 2``
    (x, y) in raster order, coordinates from -0.5 to 0.5 (the image's outer edges)."""
    return cell_positions(grid_size, grid_size, device=device, dtype=dtype) / (grid_size - 1) - 0.5


def warp_points(params: WarpParams, points: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Apply ``T = A o S`` to source pixel positions ``points`` (``B x N x 2``, (x, y), centres at
    integers) of ``size = (H, W)`` images. Returns their matches in the target, ``B x N x 2``
    pixels (not clamped to the image)."""
    height, width = size
    side = points.new_tensor([width, height])
    centre = (side - 1) / 2
    unit = (points - centre) / side
    grid_size = math.isqrt(params.tps_offsets.shape[1])
    controls = tps_control_points(grid_size, device=points.device, dtype=points.dtype)
    controls = controls.expand_as(params.tps_offsets)
    moved = controls + params.tps_offsets
    bent = thin_plate_spline(controls, moved, unit)
    mapped = bent @ params.affine[:, :, :2].transpose(1, 2) + params.affine[:, None, :, 2]
    return mapped * side + centre


def thin_plate_spline(
    controls: torch.Tensor, moved: torch.Tensor, points: torch.Tensor
) -> torch.Tensor:
    """Bookstein's thin-plate spline that maps ``controls`` onto ``moved`` (both ``B x K x 2``),
    applied to ``points`` (``B x N x 2``): ``B x N x 2``, in the frame of the inputs.

    The spline is kornia's (0.9.2 and newer 0.9 releases), whose radial kernels are centred on
    the first argument of ``get_tps_transform``. The installed kornia is checked once per process
    (:func:`check_kornia_spline`), so an other convention raises instead of making other warps.
    """
    check_kornia_spline()
    return _kornia_spline(controls, moved, points)


def _kornia_spline(
    controls: torch.Tensor, moved: torch.Tensor, points: torch.Tensor
) -> torch.Tensor:
    with warnings.catch_warnings():
        # kornia 0.9.2 repeats on every call which tensor holds the kernel centres: we pass the
        # first argument, and check_kornia_spline verifies that the spline interpolates.
        warnings.filterwarnings(
            "ignore", message="`get_tps_transform` centres", category=FutureWarning
        )
        kernel_weights, affine_weights = get_tps_transform(controls, moved)
    return warp_points_tps(points, controls, kernel_weights, affine_weights)


@functools.cache
def check_kornia_spline() -> None:
    """Raise ``RuntimeError`` unless the installed kornia's spline maps a fixed 3 x 3 control
    grid exactly onto its moved positions (kornia 0.9.0 and older centre the kernels on the
    second argument of ``get_tps_transform``, which gives a wrong warp of the right shape)."""
    controls = tps_control_points(3, dtype=torch.float64)[None]
    moved = controls.clone()
    moved[0, 4] += controls.new_tensor([0.08, -0.06])  # a bend no affine map makes
    moved[0, 0] += controls.new_tensor([0.05, 0.05])
    miss = (_kornia_spline(controls, moved, controls) - moved).abs().max().item()
    if not miss <= _CONTROL_POINT_TOLERANCE:
        raise RuntimeError(
            f"kornia {kornia.__version__}'s thin-plate spline leaves a control point {miss:.3g} "
            "image sides from its moved position: guided-flow's synthetic warps need "
            "kornia>=0.9.2,<0.10 (`make install` installs the tested versions, requirements.lock)"
        )


def dense_flow(params: WarpParams, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth of the warps on a ``size = (H, W)`` source grid, in the params' dtype:
    ``flow_s2t = T(q) - q`` (``B x 2 x H x W`` pixels) and ``flow_valid`` (``B x 1 x H x W`` bool,
    True where ``T(q)`` lies in ``[0, W-1] x [0, H-1]``)."""
    height, width = size
    batch = params.affine.shape[0]
    grid = cell_positions(height, width, device=params.affine.device, dtype=params.affine.dtype)
    matches = warp_points(params, grid.expand(batch, -1, -1), size)
    flow = (matches - grid).view(batch, height, width, 2).permute(0, 3, 1, 2).contiguous()
    inside = (
        (matches[..., 0] >= 0)
        & (matches[..., 0] <= width - 1)
        & (matches[..., 1] >= 0)
        & (matches[..., 1] <= height - 1)
    )
    return flow, inside.view(batch, 1, height, width)


def synthesize_pairs(images: torch.Tensor, params: WarpParams) -> SyntheticPair:
    """Make pairs from ``images`` (``B x C x H x W``, any float dtype and device; normalised or
    not): the target is the image itself, the source is the image sampled bilinearly at ``T(q)``
    (zero outside the image). The flow is computed in float32 (float64 for float64 images)."""
    geometry_dtype = torch.promote_types(images.dtype, torch.float32)
    params = params.to(device=images.device, dtype=geometry_dtype)
    flow_s2t, flow_valid = dense_flow(params, (images.shape[-2], images.shape[-1]))
    source = warp_by_flow(images, flow_s2t)
    return SyntheticPair(source=source, target=images, flow_s2t=flow_s2t, flow_valid=flow_valid)
