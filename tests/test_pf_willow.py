"""PF-WILLOW data module on tiny datasets in the exact on-disk layout (list read by column
position, padded keypoints), through the real loader and the evaluator."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from data_modules.pf_willow import KEYPOINTS, WILLOW_CATEGORIES, PFWillowDataModule
from guided_flow.errors import ConfigError, DataError
from guided_flow.evaluation.keypoints import pck_bound
from tests.test_pf_pascal import INPUT, affine_flow, evaluate, write_image

HEADER = ["imageA", "imageB"] + [
    f"{axis}{side}{n}" for side in "AB" for axis in "XY" for n in range(1, KEYPOINTS + 1)
]


def image(category: str, number: int) -> str:
    return f"PF-dataset/{category}/{category}_{number:03d}.png"


def cells(points: Sequence[Sequence[float | None]]) -> list[str]:
    """10 x values then 10 y values; None is an empty cell, and missing slots are -1."""
    padded = list(points) + [(-1, -1)] * (KEYPOINTS - len(points))
    return [("" if p[axis] is None else f"{p[axis]:g}") for axis in (0, 1) for p in padded]


def willow_row(source: str, target: str, src, trg) -> list[str]:
    return [source, target, *cells(src), *cells(trg)]


def write_willow(
    root: Path,
    rows: Sequence[Sequence[str]],
    name: str = "test_pairs_pf.csv",
    sizes: dict[str, tuple[int, int]] | None = None,
) -> Path:
    """The list ``name`` (relative to ``root``) and every image it names (PNG, ``sizes[path]``
    or 200 x 150)."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(",".join(row) for row in [HEADER, *rows]) + "\n")
    for row in rows:
        for relative in row[:2]:
            if not (root / relative).exists():
                write_image(root / relative, (sizes or {}).get(relative, (200, 150)))
    return path


def data_module(root: Path, **kwargs) -> PFWillowDataModule:
    return PFWillowDataModule(str(root), image_size=INPUT, batch_size=4, **kwargs)


def test_batches_mark_padding_and_the_bound_ignores_it(tmp_path):
    src = [(10, 20), (50, 60), (100, 30), (None, None), (150, 140)]
    trg = [(12, 22), (55, 66), (120, 35), (None, None), (170, 130)]
    rows = [
        willow_row(image("car(G)", 1), image("car(G)", 2), src, trg),
        willow_row(image("duck(S)", 1), image("duck(S)", 2), src[:2], trg[:2]),
    ]
    root = tmp_path / "willow"
    write_willow(root, rows, name="image_pairs/test_pairs.csv")
    module = data_module(root)
    module.prepare_data()
    module.setup("test")
    batch = next(iter(module.test_dataloader()))
    meta = batch["meta"]
    assert batch["kps_valid"].shape == (2, KEYPOINTS)
    assert batch["kps_valid"][0].tolist() == [True, True, True, False, True] + [False] * 5
    assert batch["kps_valid"][1].sum() == 2
    assert batch["category"] == ["car(G)", "duck(S)"]
    assert meta["category_id"].tolist() == [0, WILLOW_CATEGORIES.index("duck(S)")]
    assert meta["target_kps"][0, :3].tolist() == [[12, 22], [55, 66], [120, 35]]
    assert meta["target_kps"][0, 3].tolist() == [0, 0]  # padding is zeroed, never -1
    # the box of the valid target keypoints only: x 12..170, y 22..130 (not -1 or 0)
    ones = torch.ones(2, 2, dtype=torch.float64)
    bound = pck_bound(meta, batch["kps_valid"], module.pck_bound, ones, ones)
    assert bound.tolist() == [158.0, 44.0]
    # the -1-padding convention stretches the box to (-1, -1): x -1..170, y -1..130
    assert pck_bound(meta, batch["kps_valid"], "trg_kps_padded", ones, ones)[0].item() == 171.0
    assert module.pck_bound == "trg_kps" and module.alphas == (0.05, 0.1, 0.15)
    assert meta["pair_name"][0] == "000001-car(G)_001-car(G)_002:car(G)"


def test_identity_and_known_affine_pairs_score_one(tmp_path):
    matrix = np.array([[0.9, 0.05, 12.0], [-0.05, 1.1, -4.0]])
    src = np.array([[20.0, 30.0], [60.5, 90.25], [150.0, 40.0], [100.0, 120.0]])
    trg = src @ matrix[:, :2].T + matrix[:, 2]
    rows = [
        willow_row(image("car(S)", 1), image("car(S)", 1), src, src),
        willow_row(image("car(S)", 2), image("car(S)", 3), src, trg),
    ]
    root = tmp_path / "willow"
    sizes = {image("car(S)", 2): (200, 150), image("car(S)", 3): (240, 160)}
    write_willow(root, rows, sizes=sizes)
    flow = torch.stack((torch.zeros(2, INPUT, INPUT), affine_flow(matrix, *sizes.values())))
    evaluator = evaluate(data_module(root), lambda b: flow)
    result = evaluator.compute()
    assert result["pairs"] == 2
    assert [result[key] for key in ("pck@0.05", "pck@0.1", "pck@0.15")] == [1.0, 1.0, 1.0]
    assert evaluator.pck.records().distance.max() < 1e-3


GOOD = willow_row(image("car(M)", 1), image("car(M)", 2), [(1, 2), (3, 4)], [(5, 6), (7, 8)])


@pytest.mark.parametrize(
    "row, message",
    [
        (GOOD[:-1], "41 columns, expected 42"),
        (willow_row(GOOD[0], GOOD[1], [(1, 2), (3, 4)], [(5, 6)]), "keypoint count mismatch"),
        ([*GOOD[:2], "x", *GOOD[3:]], "column 3: 'x' is not a number"),
        ([GOOD[0], "PF-dataset/cat/cat_1.png", *GOOD[2:]], "not a PF-WILLOW category"),
        ([GOOD[0], "PF-dataset/car(M)/missing.png", *GOOD[2:]], "missing.png does not exist"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, row, message):
    root = tmp_path / "willow"
    path = write_willow(root, [GOOD])
    path.write_text(path.read_text() + ",".join(row) + "\n")
    with pytest.raises(DataError) as error:
        data_module(root).prepare_data()
    assert f"{path}, line 3: " in str(error.value) and message in str(error.value)


def test_missing_list_says_how_to_download_and_training_is_refused(tmp_path):
    with pytest.raises(DataError, match="guided-flow download pf-willow --root"):
        data_module(tmp_path).prepare_data()
    with pytest.raises(ConfigError, match="test benchmark"):
        data_module(tmp_path).setup("fit")
