"""SPair-71k data module on tiny datasets in the exact on-disk layout, through the real loader
and the evaluator."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_modules.spair import CATEGORIES, DIFFICULTY_NAMES, SPairDataModule
from guided_flow.errors import ConfigError, DataError
from guided_flow.evaluation.keypoints import KeypointEvaluator
from guided_flow.io.images import denormalise
from tests.helpers import save_stage_checkpoint

# The real annotation of SPair-71k test pair 1 (PairAnnotation/test/<name>.json).
REAL_PAIR = json.loads(
    '{"pair_id": 1, "filename": "000001-2008_002719-2008_004100:aeroplane", '
    '"src_imname": "2008_002719.jpg", "trg_imname": "2008_004100.jpg", '
    '"src_imsize": [500, 333, 3], "trg_imsize": [500, 332, 3], '
    '"src_bndbox": [210, 34, 475, 250], "trg_bndbox": [36, 92, 500, 200], '
    '"category": "aeroplane", "src_pose": "Left", "trg_pose": "Left", '
    '"src_kps": [[212, 153], [300, 130], [330, 127]], "trg_kps": [[39, 145], [364, 171], '
    '[416, 173]], "kps_ids": ["0", "7", "11"], "mirror": 0, "viewpoint_variation": 0, '
    '"scale_variation": 0, "truncation": 2, "occlusion": 2}'
)
INPUT = 64


def colour(name: str) -> tuple[int, int, int]:
    """A constant RGB colour per image name."""
    value = sum(map(ord, name))
    return (value * 37 % 256, value * 91 % 256, value * 53 % 256)


def write_spair(root: Path, records: list[dict], masks: bool = False, split: str = "test") -> None:
    """Write ``records`` (annotation dicts, ``filename`` = pair name) in the SPair-71k layout, with
    constant-colour JPEGs of the stated sizes (and box-shaped PNG masks when ``masks``)."""
    (root / "Layout" / "large").mkdir(parents=True, exist_ok=True)
    (root / "Layout" / "large" / f"{split}.txt").write_text(
        "".join(f"{record['filename']}\n" for record in records)
    )
    for record in records:
        annotation = root / "PairAnnotation" / split / f"{record['filename']}.json"
        annotation.parent.mkdir(parents=True, exist_ok=True)
        annotation.write_text(json.dumps(record))
        for side in ("src", "trg"):
            width, height = record[f"{side}_imsize"][:2]
            image = root / "JPEGImages" / record["category"] / record[f"{side}_imname"]
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (width, height), colour(image.name)).save(image, quality=95)
            if masks:
                mask = np.zeros((height, width), dtype=np.uint8)
                x1, y1, x2, y2 = record[f"{side}_bndbox"]
                mask[y1:y2, x1:x2] = 15  # a label value, not 255
                path = root / "Segmentation" / record["category"] / f"{image.stem}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(path)


def variant(number: int, category: str, src: str, trg: str, **changes) -> dict:
    """A copy of :data:`REAL_PAIR` renamed ``<number>-<src>-<trg>:<category>`` with ``changes``."""
    record = copy.deepcopy(REAL_PAIR)
    record.update(
        pair_id=number,
        filename=f"{number:06d}-{src}-{trg}:{category}",
        category=category,
        src_imname=f"{src}.jpg",
        trg_imname=f"{trg}.jpg",
        **changes,
    )
    return record


def mixed_records() -> list[dict]:
    """The real pair plus variants with other categories, flags, sizes and keypoint counts (every
    keypoint inside its image)."""
    five = {"src_kps": [[10, 20], [100, 50], [200, 80], [50, 150], [150, 100]]}
    five["trg_kps"] = [[x + 20, y + 10] for x, y in five["src_kps"]]
    return [
        REAL_PAIR,
        variant(
            2,
            "aeroplane",
            "2008_002719",
            "2009_000001",
            trg_imsize=[300, 400, 3],
            trg_kps=[[39, 145], [264, 171], [296, 173]],
            truncation=0,
        ),
        variant(3, "cat", "2010_000001", "2010_000002", **five, viewpoint_variation=2, occlusion=1),
        variant(
            4,
            "dog",
            "2011_000001",
            "2011_000001",
            src_imsize=[500, 240, 3],
            trg_imsize=[500, 240, 3],
            src_bndbox=[5, 5, 300, 200],
            trg_bndbox=[0, 0, 250, 230],
            scale_variation=1,
        ),
    ]


def data_module(root: Path, **kwargs) -> SPairDataModule:
    return SPairDataModule(str(root), image_size=INPUT, batch_size=3, **kwargs)


def evaluate(module: SPairDataModule, flow_fn, **options) -> KeypointEvaluator:
    """Run the real loader and the evaluator with ``flow_fn(batch) -> B x 2 x H x W`` pixels."""
    module.prepare_data()
    module.setup("test")
    evaluator = KeypointEvaluator(
        categories=module.categories, difficulty_names=module.difficulty_names, **options
    )
    for batch in module.test_dataloader():
        evaluator.update(batch, flow_fn(batch))
    return evaluator


def test_batches_follow_the_schema(tmp_path):
    write_spair(tmp_path / "spair", mixed_records())
    module = data_module(tmp_path / "spair")
    module.prepare_data()
    module.setup("test")
    batch = next(iter(module.test_dataloader()))
    meta = batch["meta"]
    assert batch["source_image"].shape == batch["target_image"].shape == (3, 3, INPUT, INPUT)
    assert batch["source_kps"].shape == (3, 5, 2)  # padded to the split's largest count
    assert batch["kps_valid"].sum(dim=1).tolist() == [3, 3, 5]
    assert batch["index"].tolist() == [0, 1, 2]
    assert batch["category"] == ["aeroplane", "aeroplane", "cat"]
    assert "source_mask" not in batch
    assert meta["pair_name"][0] == REAL_PAIR["filename"]
    assert meta["source_file"][0] == "aeroplane/2008_002719.jpg"
    assert meta["category_id"].tolist() == [0, 0, CATEGORIES.index("cat")]
    assert meta["source_size"][0].tolist() == [333, 500] and meta["target_size"][1].tolist() == [
        400,
        300,
    ]
    assert meta["source_kps"][0, :3].tolist() == REAL_PAIR["src_kps"]
    assert meta["target_bbox"][0].tolist() == REAL_PAIR["trg_bndbox"]
    assert meta["difficulty"][0].tolist() == [REAL_PAIR[name] for name in DIFFICULTY_NAMES]
    # Input pixels: (x + 0.5) * 64 / W - 0.5 per axis, padding zero.
    scale = torch.tensor([INPUT / 500, INPUT / 332])
    expected = (torch.tensor(REAL_PAIR["trg_kps"], dtype=torch.float32) + 0.5) * scale - 0.5
    assert torch.allclose(batch["target_kps"][0, :3], expected)
    assert batch["target_kps"][0, 3:].abs().sum() == 0
    # Normalised RGB: de-normalising gives back the file's colour.
    rgb = denormalise(batch["source_image"][0]).mean(dim=(1, 2)) * 255
    assert torch.allclose(rgb, torch.tensor(colour("2008_002719.jpg"), dtype=torch.float32), atol=2)
    # The benchmark's bound, computed by the evaluator alone: max(500 - 36, 200 - 92).
    default = KeypointEvaluator().transfer(batch, torch.zeros(3, 2, INPUT, INPUT))["bound"]
    assert default[0].item() == 464


def test_masks_are_used_when_present(tmp_path):
    write_spair(tmp_path / "spair", mixed_records()[:2], masks=True)
    module = data_module(tmp_path / "spair")
    module.prepare_data()
    module.setup("test")
    batch = next(iter(module.test_dataloader()))
    mask = batch["source_mask"]
    assert mask.shape == batch["target_mask"].shape == (2, 1, INPUT, INPUT)
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    x1, y1, x2, y2 = REAL_PAIR["src_bndbox"]
    assert mask[0].mean().item() == pytest.approx((x2 - x1) * (y2 - y1) / (500 * 333), abs=0.03)
    ignored = data_module(tmp_path / "spair", masks=False, cache_dir=str(tmp_path / "c"))
    ignored.prepare_data()
    ignored.setup("test")
    assert "source_mask" not in next(iter(ignored.test_dataloader()))


def test_cache_is_built_once_and_rebuilt_when_annotations_change(tmp_path):
    root = tmp_path / "spair"
    write_spair(root, mixed_records())
    data_module(root).prepare_data()
    (cache,) = (root / "cache").iterdir()
    built = cache.stat().st_mtime_ns
    data_module(root).prepare_data()
    assert cache.stat().st_mtime_ns == built
    annotation = root / "PairAnnotation" / "test" / f"{REAL_PAIR['filename']}.json"
    annotation.write_text(json.dumps({**REAL_PAIR, "occlusion": 0}))
    module = data_module(root)
    module.prepare_data()
    assert cache.stat().st_mtime_ns != built
    module.setup("test")
    assert module.pair_lists["test"].difficulty[0, 3] == 0


def test_identity_flow_on_identical_pairs_scores_one(tmp_path):
    records = [
        variant(
            1,
            "cat",
            "2010_000001",
            "2010_000001",
            trg_kps=REAL_PAIR["src_kps"],
            trg_imsize=REAL_PAIR["src_imsize"],
            trg_bndbox=REAL_PAIR["src_bndbox"],
        ),
        variant(
            2,
            "bus",
            "2010_000003",
            "2010_000003",
            src_imsize=[90, 200, 3],
            trg_imsize=[90, 200, 3],
            src_kps=[[5, 7], [80, 190]],
            trg_kps=[[5, 7], [80, 190]],
            trg_bndbox=[0, 0, 90, 200],
        ),
    ]
    write_spair(tmp_path / "spair", records)
    module = data_module(tmp_path / "spair")
    for resolution in ("original", "input"):
        evaluator = evaluate(
            module,
            lambda b: torch.zeros(len(b["index"]), 2, INPUT, INPUT),
            eval_resolution=resolution,
        )
        result = evaluator.compute()
        assert result["pairs"] == 2
        assert [result[key] for key in ("pck@0.01", "pck@0.05", "pck@0.1")] == [1.0, 1.0, 1.0]


def test_predictions_file_matches_an_independent_numpy_pck(tmp_path):
    records = mixed_records()
    write_spair(tmp_path / "spair", records)
    module = data_module(tmp_path / "spair")
    generator = torch.Generator().manual_seed(0)
    evaluator = evaluate(
        module, lambda b: torch.randn(len(b["index"]), 2, INPUT, INPUT, generator=generator) * 2
    )
    results = tmp_path / "results"
    metrics = evaluator.write(results, module.pair_names("test"))
    assert json.loads((results / "metrics.json").read_text()) == metrics
    lines = [json.loads(line) for line in (results / "predictions.jsonl").read_text().splitlines()]
    assert [line["pair_id"] for line in lines] == [record["filename"] for record in records]
    assert (
        lines[0]["src_kps"] == REAL_PAIR["src_kps"] and lines[0]["trg_kps"] == REAL_PAIR["trg_kps"]
    )
    assert lines[0]["bound"] == 464
    per_pair = []
    for line in lines:
        error = np.linalg.norm(np.array(line["pred_kps"]) - np.array(line["trg_kps"]), axis=1)
        assert line["hits"] == (error <= 0.1 * line["bound"]).tolist()
        per_pair.append([np.mean(error <= alpha * line["bound"]) for alpha in (0.01, 0.05, 0.1)])
    per_pair = np.array(per_pair)
    assert 0 < per_pair.mean() < 1
    assert metrics["pairs"] == 4
    for column, key in enumerate(("pck@0.01", "pck@0.05", "pck@0.1")):
        assert metrics[key] == pytest.approx(per_pair[:, column].mean(), rel=1e-12, abs=0)
        for name in ("aeroplane", "cat", "dog"):
            rows = [record["category"] == name for record in records]
            expected = per_pair[rows, column].mean()
            assert metrics["per_category"][name][key] == pytest.approx(expected, rel=1e-12, abs=0)
        for flag in DIFFICULTY_NAMES:
            values = np.array([record[flag] for record in records])
            for value in np.unique(values):
                expected = per_pair[values == value, column].mean()
                assert metrics["per_difficulty"][flag][str(value)][key] == pytest.approx(
                    expected, rel=1e-12, abs=0
                )


@pytest.mark.parametrize("problem", ["missing key", "count mismatch", "image missing"])
def test_malformed_annotations_fail_before_any_model_work(tmp_path, problem):
    root = tmp_path / "spair"
    records = mixed_records()
    write_spair(root, records)
    broken = records[2]
    annotation = root / "PairAnnotation" / "test" / f"{broken['filename']}.json"
    record = copy.deepcopy(broken)
    if problem == "missing key":
        del record["trg_kps"]
        expected = "trg_kps"
    elif problem == "count mismatch":
        record["trg_kps"] = record["trg_kps"][:-1]
        expected = "count mismatch"
    else:
        image = root / "JPEGImages" / "cat" / broken["trg_imname"]
        image.unlink()
        expected = str(image)
    annotation.write_text(json.dumps(record))
    for step in ("prepare_data", "setup"):
        with pytest.raises(DataError) as error:
            getattr(data_module(root), step)()
        assert str(annotation) in str(error.value) and expected in str(error.value)


def test_image_of_the_wrong_size_is_named(tmp_path):
    root = tmp_path / "spair"
    write_spair(root, mixed_records()[:1])
    image = root / "JPEGImages" / "aeroplane" / REAL_PAIR["trg_imname"]
    Image.new("RGB", (400, 332)).save(image)
    with pytest.raises(DataError, match=str(image)):
        data_module(root).prepare_data()


def test_missing_root_says_how_to_download(tmp_path):
    with pytest.raises(DataError, match="guided-flow download spair --root") as error:
        data_module(tmp_path / "nowhere").prepare_data()
    assert str(tmp_path / "nowhere") in str(error.value)
    with pytest.raises(ConfigError, match="trn, val, test"):
        data_module(tmp_path, split="train")


@pytest.mark.slow
def test_guided_flow_test_on_spair_writes_the_tables(tmp_path, capsys):

    from guided_flow.cli.main import main
    from guided_flow.training.stages import MatchingStage

    root = tmp_path / "SPair-71k"
    write_spair(root, mixed_records())
    stage = MatchingStage.from_options(input_size=160, compare_untrained=True)
    save_stage_checkpoint(stage, tmp_path / "model.ckpt")
    config = Path(__file__).resolve().parents[1] / "experiments" / "test_spair.yaml"
    args = ["test", "--config", str(config), f"--ckpt_path={tmp_path / 'model.ckpt'}"]
    args += [f"--data.root={root}", f"--data.cache_dir={tmp_path / 'cache'}"]
    args += [f"--results_dir={tmp_path / 'results'}", "--data.num_workers=0"]
    assert main(args) == 0
    metrics = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert metrics["pairs"] == len(mixed_records())
    assert {"pck@0.01", "pck@0.05", "pck@0.1", "per_category", "per_difficulty"} <= set(metrics)
    predictors = metrics["predictors"]
    assert list(predictors) == [
        "identity", "argmax", "guidance", "gsf", "gsf_untrained", "gsf_no_matching",
        "gsf_no_pruning",
    ]  # fmt: skip
    keys = {"pairs", "pck@0.01", "pck@0.05", "pck@0.1"}
    assert all(set(row) == keys for row in predictors.values())
    assert all(predictors["gsf"][key] == metrics[key] for key in keys)
    # an untrained checkpoint: tau is G', and the freshly built untrained model agrees
    assert predictors["gsf_untrained"] == predictors["guidance"] == predictors["gsf"]
    assert predictors["gsf_no_matching"] == predictors["gsf"]  # M outputs 0 before training
    zero_flow = evaluate(
        data_module(root, cache_dir=str(tmp_path / "cache64")),
        lambda b: torch.zeros(len(b["index"]), 2, INPUT, INPUT),
    ).compute()
    assert predictors["identity"] == {key: zero_flow[key] for key in keys}
    lines = (tmp_path / "results" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == metrics["pairs"]
    assert "occlusion" in capsys.readouterr().out  # the per-difficulty table is printed
    # the page: one record per pair with the benchmark's difficulty flags, a filter per flag
    first = json.loads(lines[0])
    assert set(first["difficulty"]) == set(DIFFICULTY_NAMES)
    page = (tmp_path / "results" / "index.html").read_text()
    assert all(f'id="filter-{flag}"' in page for flag in DIFFICULTY_NAMES)
    pairs_js = (tmp_path / "results" / "pairs.js").read_text()
    assert pairs_js.count('"difficulty"') == metrics["pairs"]
