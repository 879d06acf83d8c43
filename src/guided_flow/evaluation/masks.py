"""Mask-transfer metrics (Caltech-101): label transfer accuracy, IoU and localisation error.

A pair is scored by warping the SOURCE object mask onto the TARGET grid with a flow defined on the
target grid and pointing into the source (``flow_t2s``, which is the model's ``flow_s2t`` when it
runs on (target, source)). For target pixel p with match m(p) = p + flow_t2s(p) (source pixels,
centres at integers), the warped mask is the source mask sampled bilinearly at m(p) (zero outside
the source image) and thresholded at 0.5. Then, per pair:

- ``lt_acc`` (label transfer accuracy): the fraction of the target image's pixels where the warped
  mask and the target mask agree (both foreground or both background);
- ``iou``: |warped AND target| / |warped OR target|;
- ``loc_err`` (localisation error): each image's pixels get coordinates relative to its object's
  bounding box, u = (x - x1) / (x2 - x1 + 1), v = (y - y1) / (y2 - y1 + 1), with (x1, y1, x2, y2)
  the extreme foreground pixels of its mask; the error of target pixel p is
  |u_t(p) - u_s(m(p))| + |v_t(p) - v_s(m(p))| (at the exact sub-pixel m(p)), averaged over the
  target pixels whose match lies inside the source image (undefined, NaN, when none does).

By default (``eval_resolution="original"``) masks are the annotation polygons rasterised at each
image's original size and the flow, predicted on the network's input grid, is read bilinearly at
every original target pixel; ``"input"`` scores on the input grid with the batch's resized masks.
As for PCK (:mod:`guided_flow.evaluation.metrics`), per-pair results are gathered, de-duplicated by
the
pair's ``index``, sorted and averaged in float64, so they do not depend on the process count.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from guided_flow.evaluation.keypoints import (
    EVAL_RESOLUTIONS,
    check_choice,
)
from guided_flow.evaluation.metrics import first_occurrences
from guided_flow.io.atomic import write_json, write_jsonl
from guided_flow.model.geometry import (
    cell_positions,
    rasterise_polygon,
    sample_at,
    transfer_original_points,
)

MASK_METRICS = ("lt_acc", "iou", "loc_err")
MASK_THRESHOLD = 0.5


def object_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Extreme foreground pixels of each mask (``B x H x W`` bool): ``B x 4`` float64 as
    (x1, y1, x2, y2), inclusive pixel indices; NaN for an empty mask."""
    _, height, width = masks.shape
    boxes = []
    for axis, size in ((1, width), (2, height)):  # columns give x, rows give y
        present = masks.any(dim=axis)
        positions = torch.arange(size, device=masks.device)
        low = torch.where(present, positions, size).amin(dim=1)
        high = torch.where(present, positions, -1).amax(dim=1)
        boxes.append((low, high))
    box = torch.stack((boxes[0][0], boxes[1][0], boxes[0][1], boxes[1][1]), dim=1).double()
    return box.masked_fill(~masks.flatten(1).any(dim=1, keepdim=True), float("nan"))


def mask_transfer_scores(
    source_mask: torch.Tensor, target_mask: torch.Tensor, matches: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Score warped source masks against target masks (see the module docstring).

    Args:
        source_mask: ``B x Hs x Ws`` bool, source object masks.
        target_mask: ``B x Ht x Wt`` bool, target object masks.
        matches: ``B x Ht x Wt x 2`` (x, y) source pixels matched to each target pixel.

    Returns ``lt_acc``, ``iou``, ``loc_err``: ``B`` float64 each (``loc_err`` NaN when no match
    lies inside the source image or a mask is empty).
    """
    batch, target_h, target_w = target_mask.shape
    source_h, source_w = source_mask.shape[-2:]
    points = matches.reshape(batch, -1, 2).double()
    sampled = sample_at(source_mask[:, None].double(), points)[..., 0]  # B x N
    warped = sampled >= MASK_THRESHOLD
    target = target_mask.reshape(batch, -1)
    lt_acc = (warped == target).double().mean(dim=1)
    iou = (warped & target).sum(dim=1).double() / (warped | target).sum(dim=1).double()
    grid = cell_positions(target_h, target_w, device=points.device, dtype=torch.float64)
    target_box, source_box = object_boxes(target_mask), object_boxes(source_mask)
    target_rel = (grid - target_box[:, None, :2]) / (
        target_box[:, None, 2:] - target_box[:, None, :2] + 1
    )
    source_rel = (points - source_box[:, None, :2]) / (
        source_box[:, None, 2:] - source_box[:, None, :2] + 1
    )
    x, y = points[..., 0], points[..., 1]
    inside = (x >= 0) & (x <= source_w - 1) & (y >= 0) & (y <= source_h - 1)
    error = (target_rel - source_rel).abs().sum(dim=-1).masked_fill(~inside, 0.0)
    loc_err = error.sum(dim=1) / inside.sum(dim=1).double()  # 0 / 0 = NaN when none inside
    return {"lt_acc": lt_acc, "iou": iou, "loc_err": loc_err}


@dataclass(frozen=True)
class MaskRecords:
    """De-duplicated per-pair results of :class:`MaskTransferMetric`, sorted by pair index, on the
    CPU: ``index``, ``category`` (``N`` int64), ``lt_acc``, ``iou``, ``loc_err`` (``N`` float64,
    ``loc_err`` NaN where undefined)."""

    index: torch.Tensor
    category: torch.Tensor
    lt_acc: torch.Tensor
    iou: torch.Tensor
    loc_err: torch.Tensor


def _finite_or_none(value: float) -> float | None:
    """``value``, or None (JSON ``null``) when it is NaN."""
    return None if math.isnan(value) else value


class MaskTransferMetric(Metric):
    """LT-ACC, IoU and LOC-ERR per pair, averaged over pairs and per category (LOC-ERR over the
    pairs where it is defined, counted in ``loc_err_pairs``).

    Args:
        categories: category names indexed by category id (ids are reported as numbers if not
            given).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    _STATES = ("index", "category", *MASK_METRICS)
    # The states (``add_state``): lists of batch tensors until synced; the scores' lists too.
    index: list[torch.Tensor]
    category: list[torch.Tensor]

    def __init__(self, categories: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.categories = None if categories is None else tuple(categories)
        for name in self._STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        index: torch.Tensor,
        category: torch.Tensor,
        lt_acc: torch.Tensor,
        iou: torch.Tensor,
        loc_err: torch.Tensor,
    ) -> None:
        """Record a batch: ``index`` and ``category`` ``B`` int64, the scores ``B`` float (as
        returned by :func:`mask_transfer_scores`)."""
        self.index.append(index.long())
        self.category.append(category.long())
        for name, value in (("lt_acc", lt_acc), ("iou", iou), ("loc_err", loc_err)):
            getattr(self, name).append(value.double())

    def records(self) -> MaskRecords:
        """The de-duplicated, sorted per-pair records, gathered from every process first."""
        with self.sync_context():
            return self._records()

    def _records(self) -> MaskRecords:
        state = {name: dim_zero_cat(getattr(self, name)).cpu() for name in self._STATES}
        index, first = first_occurrences(state["index"])
        return MaskRecords(index=index, **{name: state[name][first] for name in self._STATES[1:]})

    def _row(self, lt_acc: torch.Tensor, iou: torch.Tensor, loc_err: torch.Tensor) -> dict:
        """Means of one group of pairs (``n`` float64 each)."""
        defined = loc_err[~loc_err.isnan()]
        return {
            "pairs": lt_acc.numel(),
            "lt_acc": float(lt_acc.mean()),
            "iou": float(iou.mean()),
            "loc_err": float(defined.mean()) if defined.numel() else None,
            "loc_err_pairs": defined.numel(),
        }

    def summary(self, records: MaskRecords) -> dict:
        """``{"pairs", "lt_acc", "iou", "loc_err", "loc_err_pairs", "per_category": {name: same
        keys}}``: float64 means over pairs, ``loc_err`` None where undefined for every pair."""
        result = self._row(records.lt_acc, records.iou, records.loc_err)
        table = {}
        for group in torch.unique(records.category).tolist():
            rows = records.category == group
            name = str(group) if self.categories is None else self.categories[group]
            table[name] = self._row(records.lt_acc[rows], records.iou[rows], records.loc_err[rows])
        result["per_category"] = table
        return result

    def compute(self) -> dict:
        """The results of :meth:`summary` on the gathered records."""
        return self.summary(self._records())


def _original_matches(
    flow_t2s: torch.Tensor,
    target_size: tuple[int, int],
    source_size: tuple[int, int],
) -> torch.Tensor:
    """The source match (original source pixels) of every original target pixel, reading one
    pair's ``flow_t2s`` (``2 x h x w`` input pixels on the target's input grid) bilinearly.
    Returns ``Ht x Wt x 2`` float64."""
    grid = cell_positions(*target_size, device=flow_t2s.device, dtype=torch.float64)
    matched = transfer_original_points(flow_t2s, grid, target_size, source_size)
    return matched.view(*target_size, 2)


class MaskTransferEvaluator(nn.Module):
    """Mask transfer over a test split; writes ``metrics.json``, ``predictions.jsonl`` and
    ``run.json``. An ``nn.Module`` so that it follows its LightningModule to the device.

    The batch's ``meta`` carries, in original pixels: ``source_polygon`` / ``target_polygon``
    (``B x P x 2`` (x, y), NaN-padded), ``source_size`` / ``target_size`` (``B x 2`` (H, W)) and
    ``category_id`` (``B``); ``eval_resolution="input"`` uses ``batch["source_mask"]`` /
    ``batch["target_mask"]`` (``B x 1 x H x W``) instead of the polygons.

    Args:
        eval_resolution: one of :data:`~guided_flow.evaluation.keypoints.EVAL_RESOLUTIONS`.
        categories: category names indexed by ``meta["category_id"]``.
    """

    def __init__(
        self, eval_resolution: str = "original", categories: Sequence[str] | None = None
    ) -> None:
        super().__init__()
        self.eval_resolution = check_choice("eval_resolution", eval_resolution, EVAL_RESOLUTIONS)
        self.metric = MaskTransferMetric(categories)

    def scores(self, batch: Mapping, flow_t2s: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-pair ``lt_acc``, ``iou``, ``loc_err`` (``B`` float64) of a batch, with
        ``flow_t2s`` ``B x 2 x H x W`` in input pixels on the grid of ``batch["target_image"]``
        (the model's flow when run on (target, source))."""
        height, width = batch["target_image"].shape[-2:]
        if flow_t2s.shape[1:] != (2, height, width):
            raise ValueError(
                f"flow_t2s must be B x 2 x {height} x {width} (the target's input grid), "
                f"got {tuple(flow_t2s.shape)}"
            )
        flow = flow_t2s.detach().double()
        if self.eval_resolution == "input":
            grid = cell_positions(height, width, device=flow.device, dtype=flow.dtype)
            matches = grid.view(height, width, 2) + flow.permute(0, 2, 3, 1)
            source = batch["source_mask"][:, 0] >= MASK_THRESHOLD
            target = batch["target_mask"][:, 0] >= MASK_THRESHOLD
            return mask_transfer_scores(source, target, matches)
        meta = batch["meta"]
        rows = []
        for b in range(flow.shape[0]):
            sizes: dict[str, tuple[int, int]] = {}
            masks = {}
            for side in ("source", "target"):
                size_h, size_w = meta[f"{side}_size"][b].tolist()
                sizes[side] = (int(size_h), int(size_w))
                polygon = meta[f"{side}_polygon"][b].detach().cpu().numpy()
                masks[side] = torch.from_numpy(rasterise_polygon(polygon, sizes[side]))
            matches = _original_matches(flow[b], sizes["target"], sizes["source"])
            rows.append(
                mask_transfer_scores(
                    masks["source"][None].to(flow.device),
                    masks["target"][None].to(flow.device),
                    matches[None],
                )
            )
        return {name: torch.cat([row[name] for row in rows]) for name in MASK_METRICS}

    @torch.no_grad()
    def update(self, batch: Mapping, flow_t2s: torch.Tensor) -> None:
        """Score a batch (see :meth:`scores`) and record it."""
        scores = self.scores(batch, flow_t2s)
        self.metric.update(batch["index"], batch["meta"]["category_id"], **scores)

    def compute(self) -> dict:
        """The ``metrics.json`` dict (:meth:`MaskTransferMetric.summary`), gathered."""
        return self.metric.compute()

    def reset(self) -> None:
        """Forget every recorded pair."""
        self.metric.reset()

    def settings(self) -> dict:
        """The evaluation options, for ``run.json``."""
        return {
            "metrics": list(MASK_METRICS),
            "eval_resolution": self.eval_resolution,
            "flow": "target -> source (the model run on (target, source))",
            "mask_warp": f"bilinear, foreground where >= {MASK_THRESHOLD}",
        }

    def write(
        self,
        results_dir: str | os.PathLike,
        pair_names: Sequence[str],
        run_info: Mapping | None = None,
    ) -> dict:
        """Gather the results and write, atomically, into ``results_dir``: ``metrics.json``,
        ``predictions.jsonl`` (one line per pair in index order: ``pair_id``, ``category`` and
        the three scores) and ``run.json`` (the options plus ``run_info``). Every process must
        call it; only process 0 writes. ``pair_names`` is indexed by the pairs' ``index``.
        Returns the metrics dict."""
        records = self.metric.records()
        metrics = self.metric.summary(records)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_rank() != 0:
                return metrics
        categories = self.metric.categories
        lines = []
        for index, category, lt_acc, iou, loc_err in zip(
            records.index.tolist(),
            records.category.tolist(),
            records.lt_acc.tolist(),
            records.iou.tolist(),
            records.loc_err.tolist(),
            strict=True,
        ):
            line = {
                "pair_id": pair_names[index],
                "category": str(category) if categories is None else categories[category],
                "lt_acc": lt_acc,
                "iou": iou,
                "loc_err": _finite_or_none(loc_err),
            }
            lines.append(line)
        results_dir = os.fspath(results_dir)
        write_jsonl(os.path.join(results_dir, "predictions.jsonl"), lines)
        run = {**self.settings(), "pairs": metrics["pairs"], **(run_info or {})}
        write_json(os.path.join(results_dir, "metrics.json"), metrics)
        write_json(os.path.join(results_dir, "run.json"), run)
        return metrics
