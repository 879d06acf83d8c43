"""The interactive page of a test run: thumbnails of every pair, and per-pair rows for
:func:`~guided_flow.viz.results_page.write_results_page`.

Keypoint benchmarks give their own rows
(:meth:`~guided_flow.evaluation.keypoints.KeypointEvaluator.pair_rows`). Pairs with a dense
ground-truth
flow (the synthetic test pairs) are shown through a grid of sampled source points
(:data:`DENSE_GRID` squared, where the truth is valid) with their true and predicted targets,
hits at :data:`DENSE_ALPHA` of the image's longest side.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from guided_flow.io.images import resize_image
from guided_flow.viz.drawing import draw_matches
from guided_flow.viz.html import fitted_size
from guided_flow.viz.panels import to_uint8
from guided_flow.viz.results_page import write_pair_thumbnails, write_results_page

DENSE_GRID = 6
DENSE_ALPHA = 0.05  # PCK@0.1 of dense flow is saturated on self-warps; 0.05 is not
THUMBNAIL_SIDE = 160


def thumbnail(image: torch.Tensor, original_size: Sequence[int]) -> np.ndarray:
    """The network input ``image`` (``3 x H x W``) back at the original aspect ratio of
    ``original_size = (H, W)``, longest side :data:`THUMBNAIL_SIDE`: ``h x w x 3`` uint8."""
    size = fitted_size((int(original_size[0]), int(original_size[1])), THUMBNAIL_SIDE)
    return resize_image(to_uint8(image), size)


def dense_grid_points(flow_valid: torch.Tensor) -> torch.Tensor:
    """``DENSE_GRID**2`` integer source positions (``N x 2`` (x, y)) spread over an ``H x W``
    image, keeping those where ``flow_valid`` (``H x W`` bool) holds."""
    height, width = flow_valid.shape
    xs = torch.linspace(0, width - 1, DENSE_GRID + 2)[1:-1].round().long()
    ys = torch.linspace(0, height - 1, DENSE_GRID + 2)[1:-1].round().long()
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), dim=1)
    return points[flow_valid.cpu()[points[:, 1], points[:, 0]]]


class ResultsPageRecorder:
    """Collects, during a test, what the page needs beyond the evaluator's records: each pair's
    original sizes and thumbnails (written at once), and the rows of dense pairs."""

    def __init__(self, results_dir: str) -> None:
        self.results_dir = results_dir
        self.pairs: dict[int, dict] = {}  # pair index -> sizes, thumbnails (and dense rows)

    def add_batch(self, batch: Mapping) -> None:
        """Write the thumbnails of a batch and keep the pairs' original sizes."""
        meta = batch.get("meta", {})
        # one copy of the batch to the host, not one per image
        sources, targets = (batch[key].detach().cpu() for key in ("source_image", "target_image"))
        input_size = list(sources.shape[-2:])
        for item, index in enumerate(batch["index"].tolist()):
            sizes = [
                meta[key][item].tolist() if key in meta else input_size
                for key in ("source_size", "target_size")
            ]
            thumbs = write_pair_thumbnails(
                self.results_dir,
                index,
                thumbnail(sources[item], sizes[0]),
                thumbnail(targets[item], sizes[1]),
                size=THUMBNAIL_SIDE,
            )
            self.pairs[index] = {
                "source_size": sizes[0],
                "target_size": sizes[1],
                "source_thumb": thumbs[0],
                "target_thumb": thumbs[1],
            }

    def add_dense_rows(self, batch: Mapping, flow_s2t: torch.Tensor) -> None:
        """Rows of pairs with a dense truth: ``flow_s2t`` (``B x 2 x H x W`` pixels) read at the
        grid points, against ``batch["flow_s2t"]`` where ``batch["flow_valid"]``."""
        height, width = flow_s2t.shape[-2:]
        bound = float(max(height, width))
        for item in range(flow_s2t.shape[0]):
            points = dense_grid_points(batch["flow_valid"][item, 0])
            xs, ys = points[:, 0], points[:, 1]
            truth = points.double() + batch["flow_s2t"][item][:, ys, xs].t().double().cpu()
            predicted = points.double() + flow_s2t[item][:, ys, xs].t().double().cpu()
            hits = ((predicted - truth).norm(dim=1) <= DENSE_ALPHA * bound).tolist()
            index = int(batch["index"][item])
            self.pairs.setdefault(index, {}).update(
                pair_id=f"pair {index:05d}",
                category=str(batch["category"][item]),
                src_kps=points.double().tolist(),
                pred_kps=predicted.tolist(),
                trg_kps=truth.tolist(),
                bound=bound,
                hits=hits,
            )

    def write(
        self,
        metrics: Mapping,
        keypoint_rows: list[dict] | None = None,
        difficulty_names: Sequence[str] = (),
        alpha: float = DENSE_ALPHA,
    ) -> list[dict]:
        """Write ``index.html`` (and ``pairs.js``): the keypoint rows of the evaluator (matched
        by their ``index``) or the dense rows collected here; each with its PCK at ``alpha``.
        Pairs another process tested have rows but no thumbnails here. Returns the pages'
        pair records."""
        if keypoint_rows is None:
            keypoint_rows = [{"index": i, **self.pairs[i]} for i in sorted(self.pairs)]
        pairs = []
        for row in keypoint_rows:
            hits = row["hits"]
            pairs.append(
                {
                    **self.pairs.get(row["index"], {}),
                    **row,
                    "pck": sum(hits) / len(hits) if hits else 0.0,
                    "difficulty": row.get("difficulty", {}),
                }
            )
        write_results_page(self.results_dir, metrics, pairs, alpha, difficulty_names)
        return pairs


def pair_panel_image(results_dir: str, pair: Mapping) -> np.ndarray | None:
    """The pair's thumbnails side by side, each source keypoint joined to its predicted target
    (``h x w x 3`` uint8); None without thumbnails."""
    if "source_thumb" not in pair:
        return None
    thumbs = [
        np.asarray(Image.open(os.path.join(results_dir, pair[key])).convert("RGB"))
        for key in ("source_thumb", "target_thumb")
    ]
    points = []
    for image, kps, size in zip(
        thumbs,
        (pair["src_kps"], pair["pred_kps"]),
        (pair["source_size"], pair["target_size"]),
        strict=True,
    ):
        scale = np.array([image.shape[1] / size[1], image.shape[0] / size[0]])
        points.append((np.asarray(kps, dtype=np.float64).reshape(-1, 2) + 0.5) * scale - 0.5)
    source_points, target_points = points
    return draw_matches(thumbs[0], thumbs[1], source_points, target_points)


def log_pairs_table(loggers: Sequence, results_dir: str, pairs: list[dict]) -> None:
    """Log the page's pairs to each W&B logger as a ``wandb.Table`` (pair, category, PCK, and
    the pair panel as an image), so that the same exploration works in the W&B interface."""
    from pytorch_lightning.loggers import WandbLogger

    wandb_loggers = [logger for logger in loggers if isinstance(logger, WandbLogger)]
    if not wandb_loggers:
        return
    import wandb

    data = []
    for pair in pairs:
        panel = pair_panel_image(results_dir, pair)
        image = None if panel is None else wandb.Image(panel)
        data.append([pair["pair_id"], pair["category"], pair["pck"], image])
    table = wandb.Table(columns=["pair_id", "category", "pck", "panel"], data=data)
    for logger in wandb_loggers:
        logger.experiment.log({"test/pairs": table})
