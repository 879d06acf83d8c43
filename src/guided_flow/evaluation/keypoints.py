"""Keypoint-transfer evaluation, shared by every keypoint benchmark.

The protocol, each choice an option:

- ``kps_sampling``: the predicted flow (``flow_s2t``, ``B x 2 x H x W`` pixels on the network's
  input grid) is read at the source keypoint mapped into the input grid, either bilinearly at the
  exact sub-pixel position (``bilinear``, the default) or at the nearest input pixel
  (``nearest``); the read displacement is added to the exact keypoint either way.
- ``eval_resolution``: ``original`` (default) maps the transferred keypoint back to the original
  target image (with the target's own scale) and compares there; ``input`` compares in input
  pixels, with every keypoint and the bound mapped into the input grid.
- ``pck_bound``: L = max(w, h) of the target box (``trg_bbox``, default) or source box
  (``src_bbox``), max(H, W) of the target (``trg_img``) or source image (``src_img``), or max(w, h)
  of the box enclosing the target's valid keypoints (``trg_kps``), or of that box stretched to
  the point (-1, -1) (``trg_kps_padded``: the convention of codebases that pad keypoint arrays
  with -1 and take the box of the whole array), in the compared resolution.
- ``pck_protocol``: a preset of :data:`PCK_PROTOCOLS` that sets bound and resolution together,
  named after the published tables that use it.

Resizing follows the pixel-centre convention of image resampling: a point p of an image resized by
a factor s per axis lands at ``(p + 0.5) * s - 0.5``.

The batch's ``meta`` carries, in original pixels: ``source_size`` / ``target_size`` (``B x 2``,
(H, W)), ``source_kps`` / ``target_kps`` (``B x K x 2``, (x, y), padded; ``batch["kps_valid"]``
marks the real ones), ``source_bbox`` / ``target_bbox`` (``B x 4``, (x1, y1, x2, y2); needed
only by the box bounds), ``category_id`` (``B``) and ``difficulty`` (``B x F``, when the benchmark
has difficulty flags).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from guided_flow.errors import ConfigError
from guided_flow.evaluation.metrics import (
    DEFAULT_ALPHAS,
    KeypointPCK,
    KeypointRecords,
    keypoint_hits,
)
from guided_flow.io.atomic import write_json, write_jsonl
from guided_flow.model.geometry import rescale_points, resize_scale, transfer_keypoints

PCK_BOUNDS = ("trg_bbox", "src_bbox", "trg_img", "src_img", "trg_kps", "trg_kps_padded")
EVAL_RESOLUTIONS = ("original", "input")
KPS_SAMPLINGS = ("bilinear", "nearest")
HITS_ALPHA = 0.1
"""The threshold at which ``predictions.jsonl`` lists each keypoint's hit."""
PADDING_VALUE = -1.0
"""The keypoint padding that ``trg_kps_padded`` reproduces."""


@dataclass(frozen=True)
class PCKProtocol:
    """A named pair of ``pck_bound`` and ``eval_resolution``, and where it comes from."""

    bound: str
    resolution: str
    benchmark: str
    used_by: str


PCK_PROTOCOLS = {
    "hpf": PCKProtocol(
        "trg_img", "original", "PF-PASCAL", "HPF, DHPF: max(H, W) of the target at original size"
    ),
    "scnet": PCKProtocol(
        "trg_img",
        "input",
        "PF-PASCAL",
        "SCNet, WeakAlign, NC-Net, DenseMatching, CATs: max(H, W) of the square-resized target",
    ),
    "valid_kps": PCKProtocol(
        "trg_kps", "original", "PF-WILLOW", "the box of the target's valid keypoints (ours)"
    ),
    "padded_kps": PCKProtocol(
        "trg_kps_padded",
        "original",
        "PF-WILLOW",
        "DHPF, CATs: the box of a -1-padded keypoint array (for comparison only)",
    ),
}


def resolve_protocol(
    protocol: str | None, pck_bound: str | None, eval_resolution: str | None
) -> tuple[str | None, str]:
    """``(pck_bound, eval_resolution)`` from a preset of :data:`PCK_PROTOCOLS` or the two
    options (``None`` bound: the benchmark's own). A preset excludes the two options."""
    if protocol is None:
        return pck_bound, eval_resolution or "original"
    check_choice("pck_protocol", protocol, tuple(PCK_PROTOCOLS))
    if pck_bound is not None or eval_resolution is not None:
        raise ConfigError(
            f"--pck_protocol {protocol} sets the bound and the resolution: "
            "leave out --pck_bound and --eval_resolution"
        )
    preset = PCK_PROTOCOLS[protocol]
    return preset.bound, preset.resolution


def check_choice(option: str, value: str, allowed: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise :class:`ConfigError` naming the
    option and its allowed values."""
    if value not in allowed:
        raise ConfigError(f"--{option} {value!r} is not one of: {', '.join(allowed)}")
    return value


def sample_keypoint_flow(
    flow_s2t: torch.Tensor, points: torch.Tensor, kps_sampling: str = "bilinear"
) -> torch.Tensor:
    """Transfer source keypoints (``B x K x 2`` pixels of the flow's grid) by ``flow_s2t``
    (``B x 2 x H x W`` pixels), reading the flow bilinearly at the exact position or at the
    nearest pixel. Returns ``B x K x 2`` target positions, same grid."""
    check_choice("kps_sampling", kps_sampling, KPS_SAMPLINGS)
    if kps_sampling == "bilinear":
        return transfer_keypoints(flow_s2t, points)
    nearest = points.round()
    return transfer_keypoints(flow_s2t, nearest) + (points - nearest)


def pck_bound(
    meta: Mapping[str, torch.Tensor],
    valid: torch.Tensor,
    kind: str,
    source_scale: torch.Tensor,
    target_scale: torch.Tensor,
) -> torch.Tensor:
    """The PCK bound L of each pair (``B`` float64) from the original-pixel fields of ``meta``,
    expressed in a resolution that scales the source by ``source_scale`` and the target by
    ``target_scale`` (``B x 2`` (x, y) factors; ones for original pixels). ``valid``: ``B x K``
    bool keypoint mask (for the keypoint bounds). ``kind`` is one of :data:`PCK_BOUNDS`."""
    check_choice("pck_bound", kind, PCK_BOUNDS)
    side, scale = ("target", target_scale) if kind.startswith("trg") else ("source", source_scale)
    if kind.endswith("bbox"):
        if f"{side}_bbox" not in meta:
            raise ConfigError(
                f"--pck_bound {kind} needs boxes (meta['{side}_bbox']), which this dataset lacks"
            )
        box = meta[f"{side}_bbox"].double()
        extent = box[:, 2:] - box[:, :2]
    elif kind.endswith("img"):
        extent = meta[f"{side}_size"].flip(-1).double()
    else:
        points = meta["target_kps"].double()
        mask = valid.unsqueeze(-1)
        high = points.masked_fill(~mask, float("-inf")).amax(dim=1)
        low = points.masked_fill(~mask, float("inf")).amin(dim=1)
        if kind == "trg_kps_padded":
            low = low.clamp(max=PADDING_VALUE)
            high = high.clamp(min=PADDING_VALUE)
        extent = high - low
    return (extent * scale).amax(dim=-1)


class KeypointEvaluator(nn.Module):
    """Keypoint transfer + PCK over a test split; writes ``metrics.json``, ``predictions.jsonl``
    and ``run.json``. An ``nn.Module`` so that it follows its LightningModule to the device.

    Args:
        pck_bound: one of :data:`PCK_BOUNDS`.
        eval_resolution: one of :data:`EVAL_RESOLUTIONS`.
        kps_sampling: one of :data:`KPS_SAMPLINGS`.
        alphas: PCK thresholds (fractions of the bound).
        categories: category names indexed by ``meta["category_id"]``.
        difficulty_names: names of the columns of ``meta["difficulty"]`` (empty if none).
        protocol: the :data:`PCK_PROTOCOLS` preset that chose bound and resolution, if any
            (recorded in ``run.json``).
    """

    def __init__(
        self,
        pck_bound: str = "trg_bbox",
        eval_resolution: str = "original",
        kps_sampling: str = "bilinear",
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        categories: Sequence[str] | None = None,
        difficulty_names: Sequence[str] = (),
        protocol: str | None = None,
    ) -> None:
        super().__init__()
        self.protocol = protocol
        self.pck_bound = check_choice("pck_bound", pck_bound, PCK_BOUNDS)
        self.eval_resolution = check_choice("eval_resolution", eval_resolution, EVAL_RESOLUTIONS)
        self.kps_sampling = check_choice("kps_sampling", kps_sampling, KPS_SAMPLINGS)
        if not alphas or any(not 0 < alpha <= 1 for alpha in alphas):
            raise ConfigError(f"--alphas must be numbers in (0, 1], got {list(alphas)}")
        self.pck = KeypointPCK(alphas, categories, difficulty_names)

    def transfer(self, batch: Mapping, flow_s2t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Transfer the batch's source keypoints with ``flow_s2t`` (``B x 2 x H x W`` input
        pixels on the grid of ``batch["source_image"]``).

        Returns ``src_kps``, ``pred_kps``, ``trg_kps`` (``B x K x 2`` float64) and ``bound``
        (``B`` float64), all in the compared resolution (original pixels of each image, or input
        pixels)."""
        height, width = batch["source_image"].shape[-2:]
        if flow_s2t.shape[1:] != (2, height, width):
            raise ValueError(
                f"flow_s2t must be B x 2 x {height} x {width} (the input grid), "
                f"got {tuple(flow_s2t.shape)}"
            )
        meta = batch["meta"]
        source_scale = resize_scale(meta["source_size"], (height, width)).unsqueeze(1)
        target_scale = resize_scale(meta["target_size"], (height, width)).unsqueeze(1)
        source_kps = meta["source_kps"].double()
        target_kps = meta["target_kps"].double()
        source_input = rescale_points(source_kps, source_scale)
        flow = flow_s2t.detach().double()
        pred_input = sample_keypoint_flow(flow, source_input, self.kps_sampling)
        valid = batch["kps_valid"]
        if self.eval_resolution == "original":
            ones = torch.ones_like(source_scale[:, 0])
            return {
                "src_kps": source_kps,
                "pred_kps": rescale_points(pred_input, 1.0 / target_scale),
                "trg_kps": target_kps,
                "bound": pck_bound(meta, valid, self.pck_bound, ones, ones),
            }
        return {
            "src_kps": source_input,
            "pred_kps": pred_input,
            "trg_kps": rescale_points(target_kps, target_scale),
            "bound": pck_bound(meta, valid, self.pck_bound, source_scale[:, 0], target_scale[:, 0]),
        }

    @torch.no_grad()
    def update(self, batch: Mapping, flow_s2t: torch.Tensor) -> None:
        """Score a batch: ``flow_s2t`` is ``B x 2 x H x W`` in input pixels on the input grid."""
        kps = self.transfer(batch, flow_s2t)
        meta = batch["meta"]
        self.pck.update(
            index=batch["index"],
            pred_kps=kps["pred_kps"],
            trg_kps=kps["trg_kps"],
            valid=batch["kps_valid"],
            bound=kps["bound"],
            category=meta["category_id"],
            difficulty=meta.get("difficulty"),
            src_kps=kps["src_kps"],
        )

    def compute(self) -> dict:
        """The ``metrics.json`` dict (see :meth:`KeypointPCK.summary`), gathered over processes."""
        return self.pck.compute()

    def reset(self) -> None:
        """Forget every recorded pair."""
        self.pck.reset()

    def settings(self) -> dict:
        """The evaluation options, for ``run.json``."""
        return {
            "pck_protocol": self.protocol,
            "pck_bound": self.pck_bound,
            "eval_resolution": self.eval_resolution,
            "kps_sampling": self.kps_sampling,
            "alphas": list(self.pck.alphas),
            "hits_alpha": HITS_ALPHA,
            "keypoint_units": f"{self.eval_resolution} pixels",
        }

    def pair_rows(self, records: KeypointRecords, pair_names: Sequence[str]) -> list[dict]:
        """One dict per pair of ``records``
        (:class:`~guided_flow.evaluation.metrics.KeypointRecords`), in index order: ``index``,
        ``pair_id``, ``category``, ``src_kps``, ``pred_kps``, ``trg_kps`` (keypoints in annotation
        order, compared resolution), ``bound``, ``hits`` (at :data:`HITS_ALPHA`) and, where the
        benchmark has them, ``difficulty`` flags."""
        categories = self.pck.categories
        flags = self.pck.difficulty_names
        hits = keypoint_hits(
            records.distance,
            records.bound.repeat_interleave(records.kps_offsets.diff()),
            torch.tensor([HITS_ALPHA], dtype=torch.float64),
        )[:, 0].tolist()
        offsets = records.kps_offsets.tolist()
        src, pred, trg = (records.src_kps.tolist(), records.pred_kps.tolist(),
                          records.trg_kps.tolist())  # fmt: skip
        difficulty = records.difficulty.tolist()
        pairs = zip(
            records.index.tolist(), records.category.tolist(), records.bound.tolist(), strict=True
        )
        rows = []
        for n, (index, category, bound) in enumerate(pairs):
            kps = slice(offsets[n], offsets[n + 1])
            row = {
                "index": index,
                "pair_id": pair_names[index],
                "category": str(category) if categories is None else categories[category],
                "src_kps": src[kps],
                "pred_kps": pred[kps],
                "trg_kps": trg[kps],
                "bound": bound,
                "hits": hits[kps],
            }
            if flags:
                row["difficulty"] = dict(zip(flags, difficulty[n], strict=True))
            rows.append(row)
        return rows

    def write(
        self,
        results_dir: str | os.PathLike,
        pair_names: Sequence[str],
        run_info: Mapping | None = None,
        extra_metrics: Mapping | None = None,
        records: KeypointRecords | None = None,
    ) -> dict:
        """Gather the results and write, atomically, into ``results_dir``: ``metrics.json``
        (metric values only, plus ``extra_metrics``), ``predictions.jsonl`` (one line per pair
        in index order, :meth:`pair_rows`) and ``run.json`` (the options plus ``run_info``).
        Every process must call it; only process 0 writes. ``pair_names`` is indexed by the
        pairs' ``index``; ``records`` are the gathered records when the caller has them already.
        Returns the metrics dict."""
        records = self.pck.records() if records is None else records
        metrics = {**self.pck.summary(records), **(extra_metrics or {})}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_rank() != 0:
                return metrics
        rows = self.pair_rows(records, pair_names)
        results_dir = os.fspath(results_dir)
        write_jsonl(os.path.join(results_dir, "predictions.jsonl"), rows)
        run = {**self.settings(), "pairs": metrics["pairs"], **(run_info or {})}
        write_json(os.path.join(results_dir, "metrics.json"), metrics)
        write_json(os.path.join(results_dir, "run.json"), run)
        return metrics


def format_table(metrics: Mapping) -> str:
    """A plain-text table of a ``metrics.json`` dict: overall, per category, then per value of
    each difficulty flag; PCK in percent."""
    keys = [key for key in metrics if key.startswith("pck@")]
    rows = [("overall", "all", metrics)]
    rows += [("category", name, row) for name, row in metrics.get("per_category", {}).items()]
    for flag, table in metrics.get("per_difficulty", {}).items():
        rows += [(flag, value, row) for value, row in table.items()]
    widths = [
        max(len("group"), *(len(r[0]) for r in rows)),
        max(len("name"), *(len(r[1]) for r in rows)),
    ]
    header = f"{'group':<{widths[0]}}  {'name':<{widths[1]}}  {'pairs':>7}" + "".join(
        f"  {key:>9}" for key in keys
    )
    lines = [header, "-" * len(header)]
    for group, name, row in rows:
        values = "".join(f"  {100 * row[key]:>9.2f}" for key in keys)
        lines.append(f"{group:<{widths[0]}}  {name:<{widths[1]}}  {row['pairs']:>7d}{values}")
    return "\n".join(lines)
