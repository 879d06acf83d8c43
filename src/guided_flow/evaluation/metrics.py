"""Correspondence metrics that stay exact on many processes.

Both metrics keep one record per pair (and, for keypoints, one per keypoint) in ``cat``-reduced
states. At compute time the gathered records are de-duplicated by the pair's ``index`` (the
distributed sampler pads the last batch with repeated pairs), sorted by index and reduced in
float64 on the CPU, so the result does not depend on the number of processes, the batch size or
the order of the updates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

DEFAULT_ALPHAS = (0.01, 0.05, 0.1)


def metric_key(alpha: float) -> str:
    """The name of PCK at ``alpha`` in result dicts and files: ``pck@0.1``."""
    return f"pck@{alpha:g}"


def keypoint_hits(
    distance: torch.Tensor, bound: torch.Tensor, alphas: torch.Tensor
) -> torch.Tensor:
    """Whether each keypoint lies within ``alpha * bound`` (inclusive) of its ground truth.

    ``distance`` and ``bound``: ``M`` (same units, float64), ``alphas``: ``A``. Returns ``M x A``
    bool."""
    return distance.unsqueeze(-1) <= alphas * bound.unsqueeze(-1)


def first_occurrences(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct values of ``index`` (``N`` int64) in ascending order and, for each, the position
    of its first occurrence. Returns two ``U`` int64 tensors."""
    unique, inverse = torch.unique(index, sorted=True, return_inverse=True)
    positions = torch.arange(index.numel(), device=index.device)
    first = torch.full_like(unique, index.numel()).scatter_reduce(
        0, inverse, positions, reduce="amin"
    )
    return unique, first


def _group_means(
    values: torch.Tensor, groups: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Means of the rows of ``values`` (``N x A`` float64) per group id (``N`` int64, >= 0).

    Returns the present group ids (``G``), their pair counts (``G``) and means (``G x A``); the
    sums run in row order."""
    present, inverse = torch.unique(groups, sorted=True, return_inverse=True)
    sums = values.new_zeros(present.numel(), values.shape[1]).index_add_(0, inverse, values)
    counts = torch.bincount(inverse, minlength=present.numel())
    return present, counts, sums / counts.unsqueeze(1).to(values.dtype)


@dataclass(frozen=True)
class KeypointRecords:
    """De-duplicated per-pair and per-keypoint records of :class:`KeypointPCK`, sorted by pair
    index and, within a pair, by keypoint slot (the annotation order). All on the CPU.

    Pairs (``N``): ``index``, ``category``, ``difficulty`` (``N x F``), ``bound`` (float64, the
    units of the keypoints), ``pck`` (``N x A`` float64, fraction of the pair's keypoints within
    ``alpha * bound``), ``kps_offsets`` (``N + 1``: the keypoints of pair ``n`` are rows
    ``kps_offsets[n]:kps_offsets[n + 1]``).
    Keypoints (``M``): ``src_kps``, ``pred_kps``, ``trg_kps`` (``M x 2`` float64), ``distance``
    (``M`` float64, ``||pred - trg||``), ``hits`` (``M x A`` bool)."""

    index: torch.Tensor
    category: torch.Tensor
    difficulty: torch.Tensor
    bound: torch.Tensor
    pck: torch.Tensor
    kps_offsets: torch.Tensor
    src_kps: torch.Tensor
    pred_kps: torch.Tensor
    trg_kps: torch.Tensor
    distance: torch.Tensor
    hits: torch.Tensor


class KeypointPCK(Metric):
    """Percentage of correct keypoints per pair, averaged over pairs, per category and per
    difficulty flag value.

    The PCK of a pair is the fraction of its valid keypoints whose prediction lies within
    ``alpha * bound`` (``<=``) of the ground truth; a dataset's PCK is the mean over pairs, and
    every table is a mean over its pairs. Keypoints and bounds may be in any pixel units, as long
    as they are the same units within a pair.

    Args:
        alphas: the PCK thresholds, as fractions of each pair's bound.
        categories: category names indexed by category id (ids are reported as numbers if not
            given).
        difficulty_names: names of the difficulty flags, one per column of ``difficulty``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    # Per pair: index, category, difficulty, bound; per keypoint: its pair's index, slot, values.
    _STATES = (
        "index",
        "category",
        "difficulty",
        "bound",
        "kps_pair",
        "kps_slot",
        "src_kps",
        "pred_kps",
        "trg_kps",
    )
    # The states (``add_state``): lists of batch tensors until synced.
    index: list[torch.Tensor]
    category: list[torch.Tensor]
    difficulty: list[torch.Tensor]
    bound: list[torch.Tensor]
    kps_pair: list[torch.Tensor]
    kps_slot: list[torch.Tensor]
    src_kps: list[torch.Tensor]
    pred_kps: list[torch.Tensor]
    trg_kps: list[torch.Tensor]

    def __init__(
        self,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        categories: Sequence[str] | None = None,
        difficulty_names: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not alphas or any(not 0 < alpha for alpha in alphas):
            raise ValueError(f"alphas must be a non-empty list of positive numbers, got {alphas}")
        self.alphas = tuple(float(alpha) for alpha in alphas)
        self.categories = None if categories is None else tuple(categories)
        self.difficulty_names = tuple(difficulty_names)
        for name in self._STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        index: torch.Tensor,
        pred_kps: torch.Tensor,
        trg_kps: torch.Tensor,
        valid: torch.Tensor,
        bound: torch.Tensor,
        category: torch.Tensor,
        difficulty: torch.Tensor | None = None,
        src_kps: torch.Tensor | None = None,
    ) -> None:
        """Record a batch of pairs.

        Args:
            index: ``B`` int64, each pair's index in its split.
            pred_kps: ``B x K x 2`` predicted target keypoints (x, y).
            trg_kps: ``B x K x 2`` ground-truth target keypoints, same units.
            valid: ``B x K`` bool, which keypoint slots are real (not padding).
            bound: ``B`` the PCK bound L of each pair, same units.
            category: ``B`` int64 category ids.
            difficulty: ``B x F`` int64 difficulty flag values (``F = len(difficulty_names)``).
            src_kps: ``B x K x 2`` source keypoints, kept for the predictions file only (NaN if
                not given).
        """
        batch = index.shape[0]
        if difficulty is None:
            difficulty = index.new_zeros(batch, 0)
        if difficulty.shape[1] != len(self.difficulty_names):
            raise ValueError(
                f"difficulty has {difficulty.shape[1]} flags, expected "
                f"{len(self.difficulty_names)} ({', '.join(self.difficulty_names)})"
            )
        counts = valid.sum(dim=1)
        if bool((counts == 0).any()):
            empty = index[counts == 0].tolist()
            raise ValueError(f"pairs without valid keypoints cannot be scored: indices {empty}")
        if src_kps is None:
            src_kps = torch.full_like(pred_kps, float("nan"))
        pair, slot = valid.nonzero(as_tuple=True)
        self.index.append(index.long())
        self.category.append(category.long())
        self.difficulty.append(difficulty.long())
        self.bound.append(bound.double())
        self.kps_pair.append(index.long()[pair])
        self.kps_slot.append(slot)
        self.src_kps.append(src_kps[pair, slot].double())
        self.pred_kps.append(pred_kps[pair, slot].double())
        self.trg_kps.append(trg_kps[pair, slot].double())

    def records(self) -> KeypointRecords:
        """The de-duplicated, sorted per-pair and per-keypoint records (gathered from every
        process first when running distributed)."""
        with self.sync_context():
            return self._records()

    def _records(self) -> KeypointRecords:
        """:meth:`records` on the states as they are (already gathered when called in
        :meth:`compute`)."""
        state = {name: dim_zero_cat(getattr(self, name)).cpu() for name in self._STATES}
        index, first = first_occurrences(state["index"])
        # Keypoint keys order keypoints by (pair index, slot); repeats of a padded pair collapse.
        slots = int(state["kps_slot"].max()) + 1
        keys, kps_first = first_occurrences(state["kps_pair"] * slots + state["kps_slot"])
        kps_pair = torch.searchsorted(index, keys // slots)
        bound = state["bound"][first]
        src, pred, trg = (state[name][kps_first] for name in ("src_kps", "pred_kps", "trg_kps"))
        distance = torch.linalg.vector_norm(pred - trg, dim=-1)
        alphas = torch.tensor(self.alphas, dtype=torch.float64)
        hits = keypoint_hits(distance, bound[kps_pair], alphas)
        counts = torch.bincount(kps_pair, minlength=index.numel())
        hit_counts = torch.zeros(index.numel(), len(self.alphas), dtype=torch.float64)
        hit_counts.index_add_(0, kps_pair, hits.double())
        return KeypointRecords(
            index=index,
            category=state["category"][first],
            difficulty=state["difficulty"][first],
            bound=bound,
            pck=hit_counts / counts.unsqueeze(1).double(),
            kps_offsets=torch.cat((counts.new_zeros(1), counts.cumsum(0))),
            src_kps=src,
            pred_kps=pred,
            trg_kps=trg,
            distance=distance,
            hits=hits,
        )

    def _table(self, pck: torch.Tensor, groups: torch.Tensor, names: Sequence[str] | None) -> dict:
        """``{group name: {"pairs": n, "pck@a": mean, ...}}`` over the groups present."""
        present, counts, means = _group_means(pck, groups)
        return {
            (str(group) if names is None else names[group]): self._row(count, row)
            for group, count, row in zip(
                present.tolist(), counts.tolist(), means.tolist(), strict=True
            )
        }

    def _row(self, pairs: int, values: Sequence[float]) -> dict:
        """``{"pairs": n, "pck@a": value, ...}``."""
        return {
            "pairs": pairs,
            **{metric_key(a): v for a, v in zip(self.alphas, values, strict=True)},
        }

    def compute(self) -> dict:
        """The results of :meth:`summary` on the gathered records."""
        return self.summary(self._records())

    def summary(self, records: KeypointRecords) -> dict:
        """``{"pairs": N, "pck@a": mean, ..., "per_category": {name: {"pairs": n, "pck@a": ...}},
        "per_difficulty": {flag: {value: {"pairs": n, "pck@a": ...}}}}``, floats unrounded."""
        result = self._row(records.index.numel(), records.pck.mean(dim=0).tolist())
        result["per_category"] = self._table(records.pck, records.category, self.categories)
        result["per_difficulty"] = {
            name: self._table(records.pck, records.difficulty[:, column], None)
            for column, name in enumerate(self.difficulty_names)
        }
        return result


class DenseFlowMetric(Metric):
    """PCK and end-point error of dense flows against dense ground truth (synthetic pairs).

    Per pair: PCK = fraction of the valid source pixels whose predicted flow lies within
    ``alpha * max(H, W)`` pixels of the ground truth (``<=``); EPE = mean end-point error over
    the valid pixels, in pixels. Results are means over pairs. Pairs without any valid pixel are
    not scored (the synthetic warp moved all of them out of the target).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    # The states (``add_state``): lists of batch tensors until synced.
    index: list[torch.Tensor]
    pck: list[torch.Tensor]
    epe: list[torch.Tensor]

    def __init__(self, alphas: Sequence[float] = DEFAULT_ALPHAS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not alphas or any(not 0 < alpha for alpha in alphas):
            raise ValueError(f"alphas must be a non-empty list of positive numbers, got {alphas}")
        self.alphas = tuple(float(alpha) for alpha in alphas)
        for name in ("index", "pck", "epe"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        index: torch.Tensor,
        flow_pred: torch.Tensor,
        flow_gt: torch.Tensor,
        valid: torch.Tensor,
    ) -> None:
        """Record a batch of pairs.

        Args:
            index: ``B`` int64, each pair's index in its split.
            flow_pred: ``B x 2 x H x W`` predicted ``flow_s2t`` in pixels.
            flow_gt: ``B x 2 x H x W`` ground-truth ``flow_s2t`` in pixels.
            valid: ``B x 1 x H x W`` bool, source pixels with a ground truth.
        """
        height, width = flow_gt.shape[-2:]
        error = torch.linalg.vector_norm(flow_pred.double() - flow_gt.double(), dim=1)  # B x H x W
        mask = valid[:, 0].to(error.dtype)
        counts = mask.sum(dim=(1, 2))
        alphas = error.new_tensor(self.alphas).view(1, -1, 1, 1)
        within = (error.unsqueeze(1) <= alphas * max(height, width)).to(error.dtype)
        pck = (within * mask.unsqueeze(1)).sum(dim=(2, 3)) / counts.clamp(min=1).unsqueeze(1)
        epe = (error * mask).sum(dim=(1, 2)) / counts.clamp(min=1)
        scored = counts > 0
        self.index.append(index.long()[scored])
        self.pck.append(pck[scored])
        self.epe.append(epe[scored])

    def compute(self) -> dict:
        """``{"pairs": N, "pck@a": mean, ..., "epe_px": mean}``, float64 means over the distinct
        pairs."""
        index, pck, epe = (
            dim_zero_cat(getattr(self, name)).cpu() for name in ("index", "pck", "epe")
        )
        _, first = first_occurrences(index)
        means = pck[first].mean(dim=0).tolist()
        return {
            "pairs": first.numel(),
            **{metric_key(alpha): value for alpha, value in zip(self.alphas, means, strict=True)},
            "epe_px": float(epe[first].mean()),
        }
