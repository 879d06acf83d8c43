"""ImageFoldersDataModule: ordered pairs per category folder, masks, errors and cache reuse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import data_modules.cache
from data_modules.folders import ImageFoldersDataModule
from guided_flow.errors import ConfigError, DataError

SIZE = 64
# category -> {file relative to the category folder: scikit-image photograph}; "c" is skipped
TREE = {
    "a": {"astronaut.png": "astronaut", "chelsea.jpg": "chelsea"},
    "b": {"coffee.png": "coffee", "rocket.png": "rocket", "sub/chelsea.png": "chelsea"},
    "c": {"rocket.png": "rocket"},
}
IMAGE_SHAPE = (40, 56)  # (H, W) of the files on disk


def _write_tree(root: Path) -> None:
    for category, files in TREE.items():
        for name, photo in files.items():
            path = root / category / name
            path.parent.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(getattr(skimage.data, photo)())
            image.resize(IMAGE_SHAPE[::-1]).save(path)
    (root / "a" / "notes.txt").write_text("not an image")


def _write_masks(mask_dir: Path) -> None:
    """``a/astronaut``: greyscale, left half foreground; ``b/sub/chelsea``: palette, top half.
    The other images have no mask file."""
    height, width = IMAGE_SHAPE
    left = np.zeros(IMAGE_SHAPE, dtype=np.uint8)
    left[:, : width // 2] = 255
    top = np.zeros(IMAGE_SHAPE, dtype=np.uint8)
    top[: height // 2] = 3
    (mask_dir / "a").mkdir(parents=True)
    (mask_dir / "b" / "sub").mkdir(parents=True)
    Image.fromarray(left, mode="L").save(mask_dir / "a" / "astronaut.png")
    palette = Image.fromarray(top, mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    palette.save(mask_dir / "b" / "sub" / "chelsea.png")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "root"
    _write_tree(folder)
    return folder


def _module(root: Path, tmp_path: Path, **options) -> ImageFoldersDataModule:
    options = {"image_size": SIZE, "batch_size": 3, "hflip_p": 0.0, "swap_p": 0.0, **options}
    module = ImageFoldersDataModule(str(root), cache_dir=str(tmp_path / "cache"), **options)
    with pytest.warns(UserWarning, match=str(root / "c")):
        module.prepare_data()
    module.setup("fit")
    return module


def test_all_ordered_pairs_within_each_category(root, tmp_path):
    module = _module(root, tmp_path)
    assert module.evaluation == "none"
    assert module.folders.categories == ("a", "b")
    dataset = module.dataset
    assert len(dataset) == 2 + 6
    pairs = []
    for index in range(len(dataset)):
        item = dataset[index]
        meta = item["meta"]
        source, target = meta["source_name"], meta["target_name"]
        assert source != target
        assert source.split("/")[0] == target.split("/")[0] == item["category"]
        assert item["index"] == index
        pairs.append((source, target))
    assert len(set(pairs)) == len(pairs)
    assert {pair[::-1] for pair in pairs} == set(pairs)
    assert ("b/sub/chelsea.png", "b/coffee.png") in pairs


def test_batches_follow_the_schema(root, tmp_path):
    module = _module(root, tmp_path, hflip_p=0.5, swap_p=0.5)
    batch = next(iter(module.train_dataloader()))
    assert batch["source_image"].shape == batch["target_image"].shape == (3, 3, SIZE, SIZE)
    assert batch["source_image"].dtype == torch.float32
    assert batch["source_image"].min() < 0  # ImageNet-normalised
    assert batch["index"].dtype == torch.int64 and batch["index"].shape == (3,)
    assert len(batch["category"]) == 3
    assert "source_mask" not in batch and "target_mask" not in batch
    meta = batch["meta"]
    assert len(meta["source_name"]) == len(meta["target_name"]) == 3
    assert meta["source_size"].tolist() == [list(IMAGE_SHAPE)] * 3
    assert meta["flip"].dtype == meta["swap"].dtype == torch.bool


def test_masks_from_mask_dir_and_all_ones_without_a_file(root, tmp_path):
    mask_dir = tmp_path / "masks"
    _write_masks(mask_dir)
    module = _module(root, tmp_path, mask_dir=str(mask_dir))
    items = [module.dataset[index] for index in range(len(module.dataset))]
    by_source = {item["meta"]["source_name"]: item for item in items}
    half = SIZE // 2
    astronaut = by_source["a/astronaut.png"]
    assert astronaut["source_mask"].shape == (1, SIZE, SIZE)
    assert astronaut["source_mask"][0, :, :half].eq(1).all()
    assert astronaut["source_mask"][0, :, half:].eq(0).all()
    assert astronaut["meta"]["source_has_mask"] and not astronaut["meta"]["target_has_mask"]
    assert astronaut["target_mask"].eq(1).all()  # a/chelsea.jpg has no mask file
    chelsea = by_source["b/sub/chelsea.png"]["source_mask"][0]
    assert chelsea[:half].eq(1).all() and chelsea[half:].eq(0).all()
    batch = next(iter(module.train_dataloader()))
    assert batch["source_mask"].shape == batch["target_mask"].shape == (3, 1, SIZE, SIZE)
    assert set(batch["source_mask"].unique().tolist()) <= {0.0, 1.0}


def test_flip_and_swap_move_images_and_masks_together(root, tmp_path):
    mask_dir = tmp_path / "masks"
    _write_masks(mask_dir)
    module = _module(root, tmp_path, mask_dir=str(mask_dir))
    plain_item = module.dataset[0]
    changed = _module(root, tmp_path, mask_dir=str(mask_dir), hflip_p=1.0, swap_p=1.0)
    item = changed.dataset[0]
    assert item["meta"]["flip"] and item["meta"]["swap"]
    assert item["meta"]["source_name"] == plain_item["meta"]["target_name"]
    for side, other in (("source", "target"), ("target", "source")):
        for key in ("image", "mask"):
            expected = plain_item[f"{other}_{key}"].flip(-1)
            assert torch.equal(item[f"{side}_{key}"], expected)


def test_cache_is_reused_and_rebuilt_when_a_mask_changes(root, tmp_path, monkeypatch):
    mask_dir = tmp_path / "masks"
    _write_masks(mask_dir)
    first = _module(root, tmp_path, mask_dir=str(mask_dir))
    path = first.cache_file()
    assert path.parent == tmp_path / "cache" and path.name.startswith("folders-")
    assert path.name.endswith(f"-{SIZE}px.h5")
    stamp = path.stat().st_mtime_ns
    built = []
    real_build = data_modules.cache.build_cache
    monkeypatch.setattr(
        data_modules.cache, "build_cache", lambda *args: built.append(args) or real_build(*args)
    )
    _module(root, tmp_path, mask_dir=str(mask_dir))
    assert not built and path.stat().st_mtime_ns == stamp
    (mask_dir / "b" / "coffee.png").write_bytes((mask_dir / "a" / "astronaut.png").read_bytes())
    _module(root, tmp_path, mask_dir=str(mask_dir))
    assert len(built) == 1


def test_missing_root_raises_data_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere"
    module = ImageFoldersDataModule(str(missing), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=str(missing)):
        module.prepare_data()


def test_root_without_category_folders_raises(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    Image.fromarray(skimage.data.rocket()).save(empty / "loose.png")
    with pytest.raises(DataError, match=str(empty)):
        ImageFoldersDataModule(str(empty), cache_dir=str(tmp_path / "cache")).prepare_data()


def test_root_without_a_two_image_category_raises(root, tmp_path):
    for name in ("a/chelsea.jpg", "b/rocket.png", "b/sub/chelsea.png"):
        (root / name).unlink()
    module = ImageFoldersDataModule(str(root), cache_dir=str(tmp_path / "cache"))
    with pytest.warns(UserWarning), pytest.raises(DataError, match=str(root)):
        module.prepare_data()


@pytest.mark.parametrize(
    ("option", "value"),
    [("image_size", 0), ("batch_size", 0), ("num_workers", -1), ("hflip_p", 1.5), ("swap_p", -1)],
)
def test_bad_options_raise_config_error_naming_them(tmp_path, option, value):
    with pytest.raises(ConfigError, match=option):
        ImageFoldersDataModule(str(tmp_path), **{option: value})


@pytest.mark.slow
def test_finetune_config_trains_stage_two_from_a_checkpoint(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """experiments/finetune_folders.yaml through the CLI: a few steps on the folders, starting
    from --model.init_checkpoint, write the fine-tuned checkpoint with changed networks."""
    from guided_flow.cli.main import main
    from guided_flow.training.stages import MatchingStage
    from tests.helpers import save_stage_checkpoint

    start = save_stage_checkpoint(
        MatchingStage.from_options(input_size=64), tmp_path / "start.ckpt"
    )
    monkeypatch.chdir(tmp_path)  # the config writes under outputs/finetune
    out = tmp_path / "outputs" / "finetune"
    config = Path(__file__).resolve().parents[1] / "experiments" / "finetune_folders.yaml"
    args = ["fit", "--config", str(config), f"--model.init_checkpoint={start}"]
    args += ["--model.model.input_size=64", f"--data.root={root}", "--data.image_size=64"]
    args += [f"--data.cache_dir={tmp_path / 'cache'}", "--data.batch_size=2"]
    args += ["--trainer.max_steps=2", "--trainer.logger=false"]
    assert main(args) == 0
    saved = torch.load(out / "finetuned.ckpt", weights_only=True)
    before = torch.load(start, weights_only=True)["state_dict"]
    assert saved["global_step"] == 2
    changed = [k for k, v in saved["state_dict"].items() if not torch.equal(v, before[k])]
    assert any(k.startswith("model.matching_net.") for k in changed)
    # trainable_blocks: 1, the backbone's last block and nothing before it
    trained_backbone = {k for k in changed if k.startswith("model.backbone.")}
    assert trained_backbone and len(trained_backbone) < len(
        [k for k in saved["state_dict"] if k.startswith("model.backbone.")]
    )
