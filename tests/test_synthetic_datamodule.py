"""SyntheticPairsDataModule end to end at 64 px: batches, determinism, sources, errors."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from data_modules.synthetic import SKIMAGE_PHOTOS, SyntheticPairsDataModule
from data_modules.warps import warp_key
from guided_flow.errors import ConfigError, DataError
from guided_flow.io.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    denormalise,
    load_image,
    normalise,
    resize_image,
)
from guided_flow.model.geometry import warp_by_flow

SIZE = 64


def make_datamodule(cache_dir: Path, **kwargs: Any) -> SyntheticPairsDataModule:
    options = {
        "image_size": SIZE, "batch_size": 4, "val_pairs": 6, "test_pairs": 5,
        "val_images": 1, "test_images": 1,
    }  # fmt: skip
    datamodule = SyntheticPairsDataModule(cache_dir=str(cache_dir), **(options | kwargs))
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def first_batch(datamodule: SyntheticPairsDataModule, split: str) -> dict[str, Any]:
    loader = getattr(datamodule, f"{split}_dataloader")()
    return datamodule.on_after_batch_transfer(next(iter(loader)), 0)


def write_photo(path: Path, height: int, width: int, mode: str = "RGB") -> None:
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.stack((xs * 255 // width, ys * 255 // height, (xs + ys) % 256), axis=-1)
    Image.fromarray(rgb.astype(np.uint8)).convert(mode).save(path)


@pytest.fixture(scope="module")
def skimage_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_batches_follow_the_pair_schema(skimage_cache: Path) -> None:
    datamodule = make_datamodule(skimage_cache)
    batch = first_batch(datamodule, "val")
    assert set(batch) == {
        "source_image",
        "target_image",
        "flow_s2t",
        "flow_valid",
        "index",
        "category",
        "meta",
    }
    assert batch["source_image"].shape == batch["target_image"].shape == (4, 3, SIZE, SIZE)
    assert batch["flow_s2t"].shape == (4, 2, SIZE, SIZE)
    assert batch["flow_s2t"].dtype == torch.float32
    assert batch["flow_valid"].shape == (4, 1, SIZE, SIZE)
    assert batch["flow_valid"].dtype == torch.bool
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["index"].dtype == torch.int64
    assert batch["category"] == ["synthetic"] * 4
    assert batch["meta"]["warp_key"].tolist() == [0, 1, 2, 3]
    assert batch["meta"]["original_size"].tolist() == [[SIZE, SIZE]] * 4
    # normalised images (not in [0, 1]) and a source that is the target seen through the flow
    assert batch["target_image"].min() < -0.5 and batch["target_image"].max() > 1.2
    expected = warp_by_flow(batch["target_image"], batch["flow_s2t"])
    assert torch.allclose(batch["source_image"], expected, atol=1e-5)
    assert batch["flow_s2t"].abs().max() > 1.0 and batch["flow_valid"].float().mean() > 0.5


def test_splits_hold_out_whole_images(skimage_cache: Path) -> None:
    datamodule = make_datamodule(skimage_cache, val_images=2, test_images=2)
    assert datamodule.cache.names == list(SKIMAGE_PHOTOS)
    names = {
        split: {datamodule.cache.names[i] for i in dataset.image_ids}
        for split, dataset in datamodule.datasets.items()
    }
    assert names["val"] == {"chelsea", "camera"} and names["test"] == {"astronaut", "coffee"}
    assert {"motorcycle_left", "motorcycle_right"} <= names["train"]
    assert not names["train"] & (names["val"] | names["test"])
    assert [len(datamodule.datasets[s]) for s in ("train", "val", "test")] == [1000, 6, 5]
    assert first_batch(datamodule, "test")["meta"]["image_name"] == ["astronaut", "coffee"] * 2


def test_validation_pairs_are_identical_across_instances(tmp_path: Path) -> None:
    first = first_batch(make_datamodule(tmp_path / "a", val_images=2, test_images=2), "val")
    second = first_batch(make_datamodule(tmp_path / "b", val_images=2, test_images=2), "val")
    for key in ("source_image", "target_image", "flow_s2t", "flow_valid"):
        assert torch.equal(first[key], second[key]), key
    assert first["meta"]["image_name"] == ["chelsea", "camera", "chelsea", "camera"]
    other_seed = first_batch(
        make_datamodule(tmp_path / "a", val_images=2, test_images=2, seed=1), "val"
    )
    assert not torch.allclose(other_seed["flow_s2t"], first["flow_s2t"])


def test_training_warps_change_with_the_epoch(skimage_cache: Path) -> None:
    datamodule = make_datamodule(skimage_cache)
    batch = next(iter(datamodule.train_dataloader()))
    flows = {}
    for epoch in (0, 1):
        datamodule.trainer = SimpleNamespace(training=True, current_epoch=epoch)
        out = datamodule.on_after_batch_transfer(dict(batch), 0)
        assert torch.equal(out["meta"]["warp_key"], warp_key(epoch, batch["index"]))
        flows[epoch] = out["flow_s2t"]
    assert not torch.allclose(flows[0], flows[1])
    datamodule.trainer = SimpleNamespace(training=False, current_epoch=1)
    assert torch.equal(
        datamodule.on_after_batch_transfer(dict(batch), 0)["meta"]["warp_key"], batch["index"]
    )


class Recorder(pl.LightningModule):
    """A one-parameter module that records the batches the trainer hands it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[str, int, list[int], list[int]]] = []

    def _record(self, stage: str, batch: dict[str, Any]) -> torch.Tensor:
        assert batch["source_image"].shape[1:] == (3, SIZE, SIZE)
        keys = batch["meta"]["warp_key"].tolist()
        self.seen.append((stage, self.current_epoch, batch["index"].tolist(), keys))
        return self.weight * batch["flow_s2t"].mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._record("train", batch)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._record("val", batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_runs_the_device_warp_with_epoch_keys(skimage_cache: Path) -> None:
    datamodule = SyntheticPairsDataModule(
        cache_dir=str(skimage_cache),
        image_size=SIZE,
        batch_size=2,
        train_pairs_per_epoch=4,
        val_pairs=2,
    )
    module = Recorder()
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule)
    stages = [(stage, epoch) for stage, epoch, _, _ in module.seen]
    assert stages == [("train", 0), ("val", 0), ("train", 1), ("val", 1)]
    for stage, epoch, index, keys in module.seen:
        expected = [warp_key(epoch, i) for i in index] if stage == "train" else index
        assert keys == expected


def test_user_image_folder(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    write_photo(folder / "a.png", 50, 70)
    write_photo(folder / "b.jpg", 90, 60)
    write_photo(folder / "nested" / "c.png", 40, 40, mode="L")
    write_photo(folder / "d.png", 30, 80, mode="RGBA")
    (folder / "notes.txt").write_text("not an image")
    datamodule = make_datamodule(tmp_path / "cache", image_dir=str(folder))
    assert datamodule.cache.names == ["a.png", "b.jpg", "d.png", "nested/c.png"]
    assert datamodule.cache.original_sizes.tolist() == [[50, 70], [90, 60], [30, 80], [40, 40]]
    batch = first_batch(datamodule, "train")
    assert batch["source_image"].shape == (4, 3, SIZE, SIZE)
    assert set(batch["meta"]["image_name"]) == {"a.png", "b.jpg"}
    # an added image makes the cache stale: it is rebuilt with the new list
    write_photo(folder / "e.png", 40, 40)
    assert len(make_datamodule(tmp_path / "cache", image_dir=str(folder)).cache) == 5


def test_unreadable_user_image_names_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        write_photo(folder / name, 40, 40)
    (folder / "broken.png").write_bytes((folder / "a.png").read_bytes()[:60])
    with pytest.raises(DataError, match="broken.png"):
        make_datamodule(tmp_path / "cache", image_dir=str(folder))
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_sources_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"guided-flow download pf-pascal --root"):
        make_datamodule(tmp_path / "cache", root=str(tmp_path / "PF-PASCAL"))
    (tmp_path / "PF-PASCAL").mkdir()
    with pytest.raises(DataError, match=r"train_pairs\.csv.*guided-flow download pf-pascal"):
        make_datamodule(tmp_path / "cache", root=str(tmp_path / "PF-PASCAL"))
    with pytest.raises(DataError, match="no image files"):
        make_datamodule(tmp_path / "cache", image_dir=str(tmp_path / "PF-PASCAL"))
    with pytest.raises(DataError, match="does not exist"):
        make_datamodule(tmp_path / "cache", image_dir=str(tmp_path / "nowhere"))


def test_pf_pascal_training_images(tmp_path: Path) -> None:
    root = tmp_path / "PF-PASCAL"
    images = root / "PF-dataset-PASCAL" / "JPEGImages"
    images.mkdir(parents=True)
    for index in range(4):
        write_photo(images / f"{index}.jpg", 40 + 10 * index, 60)
    (root / "image_pairs").mkdir()
    prefix = "PF-dataset-PASCAL/JPEGImages"
    rows = [f"{prefix}/{a}.jpg,{prefix}/{b}.jpg,1" for a, b in ((0, 1), (1, 2), (3, 0))]
    csv = "source_image,target_image,class\n" + "\n".join(rows) + "\n"
    (root / "image_pairs" / "train_pairs.csv").write_text(csv)
    datamodule = make_datamodule(tmp_path / "cache", root=str(root))
    assert datamodule.cache.names == [f"{prefix}/{i}.jpg" for i in range(4)]
    assert first_batch(datamodule, "val")["source_image"].shape == (4, 3, SIZE, SIZE)
    (images / "2.jpg").unlink()
    with pytest.raises(DataError, match="2.jpg"):
        make_datamodule(tmp_path / "cache", root=str(root))


def test_bad_options_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not both"):
        SyntheticPairsDataModule(image_dir="a", root="b")
    with pytest.raises(ConfigError, match="val_pairs"):
        SyntheticPairsDataModule(val_pairs=0)
    with pytest.raises(ConfigError, match="min_scale"):
        SyntheticPairsDataModule(min_scale=1.5)
    with pytest.raises(ConfigError, match="keep one for training"):
        make_datamodule(tmp_path / "cache", val_images=5, test_images=5)


def test_image_files_and_normalisation(tmp_path: Path) -> None:
    write_photo(tmp_path / "grey.png", 20, 30, mode="L")
    write_photo(tmp_path / "alpha.png", 20, 30, mode="RGBA")
    for name in ("grey.png", "alpha.png"):
        image = load_image(tmp_path / name)
        assert image.shape == (20, 30, 3) and image.dtype == np.uint8
    assert resize_image(image, (8, 12)).shape == (8, 12, 3)
    assert resize_image(image[..., 0], (8, 12), interpolation="nearest").shape == (8, 12)
    noise = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    data = (tmp_path / "noise.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for name in ("cut.png", "absent.png"):
        with pytest.raises(DataError, match=name):
            load_image(tmp_path / name)
    images = torch.rand(2, 3, 5, 7, dtype=torch.float64)
    normalised = normalise(images)
    assert torch.allclose(normalised[:, 1], (images[:, 1] - IMAGENET_MEAN[1]) / IMAGENET_STD[1])
    assert torch.allclose(denormalise(normalised), images)
