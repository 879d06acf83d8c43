"""PF-PASCAL data module on tiny datasets in the exact on-disk layout (lists at the top or in
image_pairs/, JPEGImages, Annotations/*.mat, VOC 2012 masks), through the real loader, the
evaluator and the CLI."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from data_modules.pf_pascal import VOC_CATEGORIES, PFPascalDataModule
from data_modules.synthetic import pf_pascal_source
from guided_flow.cli.main import main
from guided_flow.errors import DataError
from guided_flow.evaluation.keypoints import KeypointEvaluator
from guided_flow.io.images import denormalise
from guided_flow.training.stages import MatchingStage
from tests.helpers import save_stage_checkpoint

INPUT = 64
IMAGES = "PF-dataset-PASCAL/JPEGImages"
REPO = Path(__file__).resolve().parents[1]
TEST_HEADER = ("source_image", "target_image", "class", "XA", "YA", "XB", "YB")
PAIR_HEADER = ("source_image", "target_image", "class", "flip")
NO_AUGMENT = {"hflip_p": 0.0, "swap_p": 0.0, "jitter_p": 0.0, "blur_p": 0.0}

# The header's three rows of the public PF-PASCAL test list (coordinates ;-separated).
REAL_ROWS = (
    (
        "PF-dataset-PASCAL/JPEGImages/2011_001407.jpg",
        "PF-dataset-PASCAL/JPEGImages/2010_004184.jpg",
        "1",
        (
            "253.631662222222;234.369475555556;288.39216;250.532;7.8727288888889;"
            "45.0686755555556;49.27536;154.221066666667;200.051786666667;233.926666666667;"
            "224.62768"
        ),
        (
            "58.1813333333333;89.168;61.28;118.384;120.597333333333;94.0373333333334;127.016;"
            "117.72;99.128;97.8;90.496"
        ),
        (
            "272.801888;263.5592;285.3264;189.439093333333;10.523872;39.52448;34.50128;156.3976;"
            "205.62496;244.80592;231.41072"
        ),
        (
            "65.2755428571429;99.8622857142857;62.3262857142857;106.788571428571;"
            "111.927428571429;96.846;114.608571428571;116.284285714286;95.673;95.0027142857143;"
            "86.1214285714286"
        ),
    ),
    (
        "PF-dataset-PASCAL/JPEGImages/2008_004165.jpg",
        "PF-dataset-PASCAL/JPEGImages/2010_006034.jpg",
        "1",
        ("54.66864;28.1112;80.6728;261.04208;225.35552;209.3104;215.39648;171.41072;70.43712"),
        (
            "65.4325714285714;110.283428571429;108.622285714286;115.266857142857;"
            "107.791714285714;101.977714285714;112.221428571429;122.649714285714;"
            "104.746285714286"
        ),
        (
            "7.05408000000001;19.13888;36.0576;296.744;262.90656;223.88992;244.60672;"
            "220.667306666667;74.38368"
        ),
        (
            "52.9585714285714;122.389714285714;126.189428571429;127.225714285714;"
            "115.481142857143;109.954285714286;136.897714285714;133.443428571429;"
            "94.7554285714286"
        ),
    ),
    (
        "PF-dataset-PASCAL/JPEGImages/2009_001332.jpg",
        "PF-dataset-PASCAL/JPEGImages/2011_000874.jpg",
        "1",
        (
            "36.146752;57.53248;19.0293688888889;104.396266666667;289.871253333333;"
            "263.249102222222;263.249102222222;179.972373333333;127.718151111111;"
            "86.5748266666667;97.7957333333333"
        ),
        "46.596;84.48;43.56;104.28;110.88;90.42;119.24;110.22;95.04;94.05;79.86",
        (
            "36.3982755555555;44.5019555555555;9.49855999999999;136.11856;295.040728888889;"
            "275.006631111111;272.755608888889;162.45552;117.88528;76.35392;66.8996266666667"
        ),
        (
            "52.816;79.3528888888889;54.84;99.0306666666667;102.291555555556;84.5253333333333;"
            "110.162666666667;106.789333333333;90.9346666666667;93.296;72.7186666666667"
        ),
    ),
)


def colour(name: str) -> tuple[int, int, int]:
    """A constant RGB colour per image name."""
    value = sum(map(ord, name))
    return (value * 37 % 256, value * 91 % 256, value * 53 % 256)


def write_image(
    path: Path, size: tuple[int, int], boxes: Sequence[tuple[tuple[int, int, int, int], tuple]] = ()
) -> None:
    """An image of ``size = (W, H)`` in the colour of its name, with filled ``boxes``
    (``((x1, y1, x2, y2), rgb)``, end-exclusive), as a high-quality JPEG or a PNG."""
    pixels = np.empty((size[1], size[0], 3), dtype=np.uint8)
    pixels[:] = colour(path.name)
    for (x1, y1, x2, y2), rgb in boxes:
        pixels[y1:y2, x1:x2] = rgb
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=100)


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(header)] + [",".join(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")


def coords(values) -> str:
    return ";".join(f"{float(v):.10g}" for v in values)


def keypoint_row(source: str, target: str, category: str, src, trg) -> tuple[str, ...]:
    """A test-list row for images ``<IMAGES>/<name>.jpg``; ``src``, ``trg``: ``K x 2``."""
    src, trg = np.asarray(src, dtype=float), np.asarray(trg, dtype=float)
    number = str(VOC_CATEGORIES.index(category) + 1)
    return (
        f"{IMAGES}/{source}.jpg",
        f"{IMAGES}/{target}.jpg",
        number,
        coords(src[:, 0]),
        coords(src[:, 1]),
        coords(trg[:, 0]),
        coords(trg[:, 1]),
    )


def pair_row(source: str, target: str, category: str, flip: int = 0) -> tuple[str, ...]:
    number = str(VOC_CATEGORIES.index(category) + 1)
    return (f"{IMAGES}/{source}.jpg", f"{IMAGES}/{target}.jpg", number, str(flip))


def write_layout(
    root: Path,
    test: Sequence[Sequence[str]] = (),
    train: Sequence[Sequence[str]] = (),
    val: Sequence[Sequence[str]] = (),
    sizes: dict[str, tuple[int, int]] | None = None,
    boxes: dict[str, list] | None = None,
    folder: str = "image_pairs",
    val_header: Sequence[str] = PAIR_HEADER,
) -> None:
    """The PF-PASCAL layout: the lists (in ``folder``) and every image they name, of
    ``sizes[stem]`` (default 300 x 200) with ``boxes[stem]``."""
    sizes, boxes = sizes or {}, boxes or {}
    for name, header, rows in (
        ("test_pairs.csv", TEST_HEADER, test),
        ("train_pairs.csv", PAIR_HEADER, train),
        ("val_pairs.csv", val_header, val),
    ):
        if rows:
            write_csv(root / folder / name, header, rows)
        for row in rows:
            for relative in row[:2]:
                stem = Path(relative).stem
                if not (root / relative).exists():
                    write_image(root / relative, sizes.get(stem, (300, 200)), boxes.get(stem, ()))


def data_module(root: Path, **kwargs) -> PFPascalDataModule:
    return PFPascalDataModule(str(root), image_size=INPUT, batch_size=3, **kwargs)


def evaluate(module, flow_fn: Callable[[dict], torch.Tensor], **options) -> KeypointEvaluator:
    """The real loader and evaluator (the benchmark's bound and alphas) with
    ``flow_fn(batch) -> B x 2 x H x W`` input pixels."""
    module.prepare_data()
    module.setup("test")
    evaluator = KeypointEvaluator(
        pck_bound=module.pck_bound, alphas=module.alphas, categories=module.categories, **options
    )
    for batch in module.test_dataloader():
        evaluator.update(batch, flow_fn(batch))
    return evaluator


def affine_flow(matrix: np.ndarray, source_size: tuple[int, int], target_size: tuple[int, int]):
    """The exact ``flow_s2t`` (``2 x INPUT x INPUT`` input pixels) of the map
    ``q = matrix[:, :2] p + matrix[:, 2]`` between original pixels of a source and a target of
    sizes (W, H), both resized to the square input (pixel centres at integers)."""
    ys, xs = np.mgrid[0:INPUT, 0:INPUT].astype(np.float64)
    grid = np.stack((xs, ys), axis=-1)
    source_scale = INPUT / np.asarray(source_size, dtype=np.float64)
    target_scale = INPUT / np.asarray(target_size, dtype=np.float64)
    original = (grid + 0.5) / source_scale - 0.5
    mapped = original @ matrix[:, :2].T + matrix[:, 2]
    flow = (mapped + 0.5) * target_scale - 0.5 - grid
    return torch.from_numpy(flow).permute(2, 0, 1).float()


def test_real_rows_give_batches_in_the_schema(tmp_path):
    root = tmp_path / "pf-pascal"
    write_layout(root, test=REAL_ROWS)
    module = data_module(root)
    module.prepare_data()
    module.setup("test")
    batch = next(iter(module.test_dataloader()))
    meta = batch["meta"]
    assert batch["source_image"].shape == batch["target_image"].shape == (3, 3, INPUT, INPUT)
    assert batch["source_kps"].shape == (3, 11, 2)  # padded to the list's largest count
    assert batch["kps_valid"].sum(dim=1).tolist() == [11, 9, 11]
    assert batch["category"] == ["aeroplane"] * 3 and meta["category_id"].tolist() == [0, 0, 0]
    assert batch["index"].tolist() == [0, 1, 2]
    assert meta["pair_name"][0] == "000001-2011_001407-2010_004184:aeroplane"
    assert meta["source_file"][1] == f"{IMAGES}/2008_004165.jpg"
    assert meta["target_size"].tolist() == [[200, 300]] * 3
    xs = [float(v) for v in REAL_ROWS[0][5].split(";")]
    ys = [float(v) for v in REAL_ROWS[0][6].split(";")]
    assert torch.allclose(
        meta["target_kps"][0].double(), torch.tensor([xs, ys], dtype=torch.float64).T, atol=1e-4
    )
    assert meta["target_kps"][1, 9:].abs().sum() == 0  # padding
    scale = torch.tensor([INPUT / 300, INPUT / 200])
    expected = (meta["source_kps"][0] + 0.5) * scale - 0.5
    assert torch.allclose(batch["source_kps"][0], expected)
    rgb = denormalise(batch["source_image"][0]).mean(dim=(1, 2)) * 255
    assert torch.allclose(rgb, torch.tensor(colour("2011_001407.jpg"), dtype=torch.float32), atol=2)
    # The benchmark's bound, from the evaluator alone: max(H, W) of the target image.
    bound = KeypointEvaluator(pck_bound=module.pck_bound).transfer(
        batch, torch.zeros(3, 2, INPUT, INPUT)
    )["bound"]
    assert bound.tolist() == [300.0] * 3
    assert "source_mask" not in batch


@pytest.mark.parametrize("folder", ["", "image_pairs"])
@pytest.mark.parametrize("resolution", ["original", "input"])
def test_identity_pairs_score_one(tmp_path, folder, resolution):
    points = [[20, 30], [250, 150], [120.5, 99.25]]
    rows = [
        keypoint_row("2009_000001", "2009_000001", "cat", points, points),
        keypoint_row("2009_000002", "2009_000002", "sofa", points[:2], points[:2]),
    ]
    root = tmp_path / "pf"
    write_layout(root, test=rows, folder=folder, sizes={"2009_000002": (260, 380)})
    result = evaluate(
        data_module(root), lambda b: torch.zeros(2, 2, INPUT, INPUT), eval_resolution=resolution
    ).compute()
    assert result["pairs"] == 2
    assert [result[key] for key in ("pck@0.05", "pck@0.1", "pck@0.15")] == [1.0, 1.0, 1.0]
    assert set(result["per_category"]) == {"cat", "sofa"}


def test_known_affine_pairs_score_one_with_their_exact_flow(tmp_path):
    matrix = np.array([[1.2, -0.1, 10.0], [0.05, 0.9, 5.0]])
    source_size, target_size = (120, 80), (180, 100)
    src = np.array([[10.0, 12.0], [60.0, 40.0], [100.0, 70.0], [33.3, 55.5]])
    trg = src @ matrix[:, :2].T + matrix[:, 2]
    root = tmp_path / "pf"
    write_layout(
        root,
        test=[keypoint_row("2010_000001", "2010_000002", "dog", src, trg)],
        sizes={"2010_000001": source_size, "2010_000002": target_size},
    )
    flow = affine_flow(matrix, source_size, target_size)[None]
    evaluator = evaluate(data_module(root), lambda b: flow)
    records = evaluator.pck.records()
    assert records.distance.max() < 1e-3 and records.bound.tolist() == [180.0]
    assert evaluator.compute()["pck@0.05"] == 1.0
    # no flow at all misses keypoints that moved by more than 0.05 * 180 pixels
    zero = evaluate(data_module(root), lambda b: torch.zeros_like(flow)).compute()
    scale = np.array(target_size) / np.array(source_size)  # source -> target original pixels
    unmoved = (src + 0.5) * scale - 0.5
    hits = np.linalg.norm(trg - unmoved, axis=1) <= 0.05 * 180
    assert zero["pck@0.05"] == pytest.approx(hits.mean())
    assert 0 < hits.mean() < 1


def test_validation_keypoints_come_from_the_annotations_and_follow_the_flip(tmp_path):
    root = tmp_path / "pf"
    half = {"2008_000001": [((0, 0, 50, 60), (255, 0, 0))]}  # a red left part
    rows = [
        pair_row("2008_000001", "2008_000002", "bird"),
        pair_row("2008_000001", "2008_000002", "bird", flip=1),
    ]
    write_layout(
        root, val=rows, sizes={"2008_000001": (100, 60), "2008_000002": (80, 70)}, boxes=half
    )
    nan = float("nan")
    kps = {
        "2008_000001": [[10, 20], [nan, nan], [30, 40], [50, 59]],
        "2008_000002": [[15, 25], [35, 45], [nan, nan], [55, 65]],
    }
    for stem, points in kps.items():
        path = root / "PF-dataset-PASCAL" / "Annotations" / "bird" / f"{stem}.mat"
        path.parent.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(path, {"kps": np.array(points, dtype=float), "class": "bird"})
    module = data_module(root, split="val")
    evaluator = evaluate(module, lambda b: torch.zeros(2, 2, INPUT, INPUT))
    batch = next(iter(module.test_dataloader()))
    meta = batch["meta"]
    assert batch["kps_valid"].tolist() == [[True, False, False, True]] * 2
    assert meta["source_kps"][0].tolist() == [[10, 20], [0, 0], [0, 0], [50, 59]]
    assert meta["flip"].tolist() == [False, True]
    assert meta["source_kps"][1].tolist() == [[89, 20], [0, 0], [0, 0], [49, 59]]  # 99 - x
    assert meta["target_kps"][1].tolist() == [[64, 25], [0, 0], [0, 0], [24, 65]]  # 79 - x
    red = torch.tensor([255.0, 0, 0])
    rgb = denormalise(batch["source_image"]) * 255
    assert torch.allclose(rgb[0, :, 5, 2], red, atol=4)  # red on the left...
    assert torch.allclose(rgb[1, :, 5, -3], red, atol=4)  # ...and on the right once flipped
    assert evaluator.compute()["pairs"] == 2


def write_voc(root: Path, stem: str, folder: str, labels: np.ndarray) -> None:
    path = root / "VOCdevkit" / "VOC2012" / folder / f"{stem}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    image.putpalette([value for index in range(256) for value in (index, index, index)])
    image.save(path)


CAT, DOG = (10, 200, 30), (200, 30, 220)


def training_layout(root: Path) -> None:
    """Three 64 x 64 images: A (a cat box and a dog box, SegmentationClass with void borders),
    B (two objects, SegmentationObject only), C (no mask); pairs (A, B, cat) and (B, C, cat,
    flip)."""
    cat_box, dog_box, object_box = (8, 10, 30, 40), (40, 5, 60, 25), (30, 30, 50, 60)
    write_layout(
        root,
        train=[pair_row("A", "B", "cat"), pair_row("B", "C", "cat", flip=1)],
        val=[keypoint_row("A", "B", "cat", [[10, 12]], [[35, 40]])],
        val_header=TEST_HEADER,
        sizes={name: (INPUT, INPUT) for name in "ABC"},
        boxes={
            "A": [(cat_box, CAT), (dog_box, DOG)],
            "B": [(object_box, CAT), ((2, 2, 12, 12), DOG)],
        },
    )
    labels = np.zeros((INPUT, INPUT), dtype=np.uint8)
    labels[10:40, 8:30] = VOC_CATEGORIES.index("cat") + 1
    labels[5:25, 40:60] = VOC_CATEGORIES.index("dog") + 1
    labels[9, 8:30] = 255  # void border above the cat
    write_voc(root, "A", "SegmentationClass", labels)
    objects = np.zeros((INPUT, INPUT), dtype=np.uint8)
    objects[30:60, 30:50], objects[2:12, 2:12] = 1, 2
    write_voc(root, "B", "SegmentationObject", objects)


def cat_mask() -> torch.Tensor:
    """A's cat in its VOC label map (``H x W`` float), without the dog and the void border."""
    mask = torch.zeros(INPUT, INPUT)
    mask[10:40, 8:30] = 1
    return mask


def colour_mask(image: torch.Tensor, rgb: Sequence[int]) -> torch.Tensor:
    """Where a normalised ``3 x H x W`` image shows ``rgb``: ``H x W`` bool."""
    pixels = denormalise(image) * 255
    return (pixels - torch.tensor(rgb, dtype=torch.float32)[:, None, None]).abs().amax(0) < 40


def train_batch(root: Path, **options) -> dict:
    module = PFPascalDataModule(str(root), image_size=INPUT, **options)
    module.setup("fit")
    return next(iter(torch.utils.data.DataLoader(module.datasets["train"], batch_size=2)))


def test_training_pairs_carry_voc_masks_and_flag_the_missing_ones(tmp_path):
    root = tmp_path / "pf"
    training_layout(root)
    data_module(root).prepare_stage("fit")
    batch = train_batch(root, **NO_AUGMENT)
    meta = batch["meta"]
    assert batch["source_mask"].shape == batch["target_mask"].shape == (2, 1, INPUT, INPUT)
    assert set(batch["source_mask"].unique().tolist()) == {0.0, 1.0}
    assert torch.equal(batch["source_mask"][0, 0], cat_mask())  # the cat only: no dog, no void
    objects = torch.zeros(INPUT, INPUT)
    objects[30:60, 30:50], objects[2:12, 2:12] = 1, 1
    assert torch.equal(batch["target_mask"][0, 0], objects)  # SegmentationObject: any object
    assert torch.equal(batch["source_mask"][1, 0], objects.flip(-1))  # the flip column
    assert batch["target_mask"][1].min() == 1  # no mask: all foreground...
    assert meta["target_has_mask"].tolist() == [True, False]  # ...and flagged
    assert meta["source_has_mask"].tolist() == [True, True]
    assert meta["flip"].tolist() == [False, True] and meta["swap"].tolist() == [False, False]
    assert meta["target_file"][1] == f"{IMAGES}/C.jpg"
    seen = colour_mask(batch["source_image"][1], CAT)[30:60]
    assert (seen != objects.flip(-1)[30:60].bool()).sum() <= 4


def test_augmented_masks_move_with_their_images(tmp_path):
    root = tmp_path / "pf"
    training_layout(root)
    data_module(root).prepare_stage("fit")
    torch.manual_seed(0)
    swapped = train_batch(root, **{**NO_AUGMENT, "swap_p": 1.0, "hflip_p": 1.0})
    meta = swapped["meta"]
    assert meta["swap"].tolist() == [True, True]
    assert meta["flip"].tolist() == [True, False]  # random flip XOR the flip column
    assert meta["source_file"][0] == f"{IMAGES}/B.jpg" and meta["target_has_mask"][0]
    assert not meta["source_has_mask"][1]
    # A's cat, flipped, is now the target: mask and image moved together (JPEG corners aside)
    assert torch.equal(swapped["target_mask"][0, 0], cat_mask().flip(-1))
    seen = colour_mask(swapped["target_image"][0], CAT)
    assert (swapped["target_mask"][0, 0].bool() != seen).sum() <= 4
    torch.manual_seed(0)
    jittered = train_batch(root, jitter_p=1.0, blur_p=1.0, hflip_p=0.0, swap_p=0.0)
    plain = train_batch(root, **NO_AUGMENT)
    assert not torch.allclose(jittered["source_image"], plain["source_image"])
    assert torch.equal(jittered["source_mask"], plain["source_mask"])


def test_train_test_overlap_is_reported(tmp_path):
    root = tmp_path / "pf"
    test_rows = [
        keypoint_row(f"2007_00000{n}", f"2007_00001{n}", "car", [[5, 5]], [[6, 6]])
        for n in range(3)
    ]
    train_rows = [
        pair_row("2007_000000", "2007_000010", "car"),  # test pair 1, same order
        pair_row("2007_000011", "2007_000001", "car", flip=1),  # test pair 2, reversed
        pair_row("2007_000002", "2007_000000", "car"),
    ]
    write_layout(root, test=test_rows, train=train_rows)
    module = data_module(root)
    module.prepare_data()
    with pytest.warns(UserWarning, match=r"1 of the 3 test pairs .* \(2 counting either order\)"):
        module.setup("test")
    assert module.train_test_overlap == {"test_pairs": 3, "ordered": 1, "unordered": 2}


GOOD = keypoint_row("2009_000001", "2009_000002", "cat", [[1, 2], [3, 4]], [[5, 6], [7, 8]])


@pytest.mark.parametrize(
    "name, row, message",
    [
        ("test_pairs.csv", GOOD[:6], "6 columns, expected 7"),
        ("test_pairs.csv", (*GOOD[:3], "1;2;3", *GOOD[4:]), "keypoint count mismatch: XA has 3"),
        ("test_pairs.csv", (*GOOD[:5], "5", "6"), "keypoint count mismatch: the source has 2"),
        ("test_pairs.csv", (*GOOD[:2], "21", *GOOD[3:]), "class '21'"),
        ("test_pairs.csv", (*GOOD[:3], "1;x", *GOOD[4:]), "column XA"),
        ("test_pairs.csv", (GOOD[0], f"{IMAGES}/missing.jpg", *GOOD[2:]), "missing.jpg"),
        ("train_pairs.csv", pair_row("2009_000001", "2009_000002", "cat", flip=2), "flip '2'"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, name, row, message):
    root = tmp_path / "pf"
    write_layout(root, test=[GOOD], train=[pair_row("2009_000001", "2009_000002", "cat")])
    path = root / "image_pairs" / name
    lines = path.read_text().splitlines()
    path.write_text("\n".join([*lines, ",".join(row)]) + "\n")
    with pytest.raises(DataError) as error:
        data_module(root).prepare_stage("fit" if name == "train_pairs.csv" else "test")
    assert f"{path}, line 3: " in str(error.value) and message in str(error.value)


def test_missing_data_says_how_to_download(tmp_path):
    with pytest.raises(DataError, match="guided-flow download pf-pascal --root"):
        data_module(tmp_path / "nowhere").setup("test")
    root = tmp_path / "pf"
    write_layout(root, train=[pair_row("2009_000001", "2009_000002", "cat")])
    with pytest.raises(DataError, match="VOC 2012 .*guided-flow download pf-pascal"):
        data_module(root).setup("fit")


def _run_cli(args: list[str]) -> int:
    fast = [
        "--model.model.weights=none",
        f"--model.model.input_size={INPUT}",
        "--trainer.fast_dev_run=true",
    ]
    return main([*args, *fast, "--data.batch_size=2", "--data.num_workers=0"])


@pytest.fixture()
def training_root(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "pf"
    training_layout(root)
    extra = [pair_row("A", "C", "cat"), pair_row("C", "B", "cat")]
    path = root / "image_pairs" / "train_pairs.csv"
    path.write_text(path.read_text() + "".join(",".join(row) + "\n" for row in extra))
    return root


@pytest.mark.slow
def test_stage_one_fits_without_test_images_and_selects_on_validation_keypoints(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "pf"
    chain = "ABCDEF"
    write_layout(
        root,
        train=[pair_row(a, b, "cat") for a, b in zip(chain[:-1], chain[1:], strict=True)],
        val=[keypoint_row("A", "B", "cat", [[10, 12]], [[35, 40]])],
        test=[keypoint_row("F", "G", "cat", [[10, 12]], [[35, 40]])],
        val_header=TEST_HEADER,
        sizes={name: (INPUT, INPUT) for name in "ABCDEFG"},
    )
    source = pf_pascal_source(root, exclude_test_images=True)
    assert source.excluded == 1 and [Path(name).stem for name in source.names] == list("ABCDE")
    config = str(REPO / "experiments" / "stage1.yaml")
    args = [
        "fit",
        "--config",
        config,
        f"--data.root={root}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.val_images=1",
        "--data.test_images=1",
        "--trainer.logger=false",
        "--trainer.callbacks=[]",
    ]
    with caplog.at_level(logging.INFO):
        assert _run_cli(args) == 0
    assert "1 training images also appear in the test pairs" in caplog.text
    # validation ran on PF-PASCAL's validation keypoints, from their own cache
    assert (tmp_path / "cache" / f"pf-pascal-val-{INPUT}.h5").is_file()


@pytest.mark.slow
def test_stage_two_fits_on_pf_pascal_pairs_with_voc_masks(training_root, tmp_path):
    config = str(REPO / "experiments" / "stage2.yaml")
    args = [
        "fit",
        "--config",
        config,
        f"--data.root={training_root}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--model.init_checkpoint=null",
    ]
    assert _run_cli(args) == 0
    assert (tmp_path / "cache" / f"pf-pascal-train-{INPUT}-masks.h5").is_file()
    assert os.path.isfile(tmp_path / "cache" / f"pf-pascal-val-{INPUT}.h5")


def test_results_files_match_the_spair_outputs(tmp_path):
    points = [[20, 30], [250, 150]]
    root = tmp_path / "pf"
    write_layout(root, test=[keypoint_row("2009_000001", "2009_000001", "cat", points, points)])
    module = data_module(root)
    evaluator = evaluate(module, lambda b: torch.zeros(1, 2, INPUT, INPUT))
    metrics = evaluator.write(tmp_path / "results", module.pair_names("test"))
    assert json.loads((tmp_path / "results" / "metrics.json").read_text()) == metrics
    line = json.loads((tmp_path / "results" / "predictions.jsonl").read_text())
    assert line["pair_id"] == "000001-2009_000001-2009_000001:cat" and line["bound"] == 300


@pytest.mark.slow
def test_the_test_config_writes_the_spair_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    points = [[20, 30], [250, 150]]
    root = tmp_path / "pf"
    write_layout(root, test=[keypoint_row("2009_000001", "2009_000001", "cat", points, points)])
    stage = MatchingStage.from_options(backbone="resnet18", weights="none", input_size=INPUT)
    save_stage_checkpoint(stage, tmp_path / "model.ckpt")
    results = tmp_path / "results"
    args = [
        "test",
        "--config",
        str(REPO / "experiments" / "test_pfpascal.yaml"),
        f"--ckpt_path={tmp_path / 'model.ckpt'}",
        f"--data.root={root}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        f"--results_dir={results}",
        "--data.num_workers=0",
    ]
    assert main(args) == 0
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["pairs"] == 1 and set(metrics["per_category"]) == {"cat"}
    assert {"pck@0.05", "pck@0.1", "pck@0.15"} <= set(metrics)
    line = json.loads((results / "predictions.jsonl").read_text())
    assert line["pair_id"] == "000001-2009_000001-2009_000001:cat" and line["bound"] == 300
