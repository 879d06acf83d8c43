"""The two stages: what each trains, that its loss goes down, options are checked."""

import pytest
import pytorch_lightning as pl
import torch
from skimage import data as skdata
from torch.utils.data import DataLoader

from data_modules.warps import sample_warp_params, synthesize_pairs
from guided_flow.api import GuidedSemanticFlow
from guided_flow.errors import ConfigError
from guided_flow.io.images import normalise, resize_image
from guided_flow.model import ModelConfig
from guided_flow.training.initial_weights import load_stage_weights
from guided_flow.training.options import LossConfig, OptimConfig
from guided_flow.training.stages import MatchingStage, PruningStage
from tests.helpers import save_stage_checkpoint

SIZE = 160


def _fixed_batch(batch: int = 2) -> dict:
    photos = [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()][:batch]
    images = (
        torch.stack(
            [torch.from_numpy(resize_image(p, (SIZE, SIZE))).permute(2, 0, 1) for p in photos]
        ).float()
        / 255
    )
    pairs = synthesize_pairs(images, sample_warp_params(0, torch.arange(batch)))
    return {
        "source_image": normalise(pairs.source),
        "target_image": normalise(pairs.target),
        "flow_s2t": pairs.flow_s2t,
        "flow_valid": pairs.flow_valid,
        "index": torch.arange(batch),
    }


def _total_loss(stage, batch) -> torch.Tensor:
    out = stage(batch["source_image"], batch["target_image"])
    return stage.total_loss(stage.loss_terms(out, batch))


# Stage 1's loss moves only as far as pruning moves G' (little on one batch of self-warps);
# tests/test_learning.py shows W_P pruning what L_geo rejects under the shipped settings.
@pytest.mark.parametrize("stage_class, lr", [(MatchingStage, 1e-3)])
def test_loss_on_a_fixed_batch_drops_within_50_adam_steps(stage_class, lr):
    torch.manual_seed(0)
    stage = stage_class.from_options(input_size=SIZE, temperature=0.1).train()
    batch = _fixed_batch()
    optimiser = torch.optim.Adam([p for p in stage.parameters() if p.requires_grad], lr=lr)
    first = None
    for _ in range(50):
        loss = _total_loss(stage, batch)
        first = loss.item() if first is None else first
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        last = _total_loss(stage, batch).item()
    assert last <= 0.9 * first, (first, last)


def test_checkpoints_record_the_feature_layers_used():
    assert MatchingStage.from_options(input_size=SIZE).hparams.model["feature_layers"] == [
        10,
        12,
        14,
    ]
    assert MatchingStage.from_options(input_size=SIZE, feature_layers=[10]).hparams.model[
        "feature_layers"
    ] == [10]


def test_flow_base_reaches_the_model_and_the_checkpoint_hparams():
    stage = MatchingStage.from_options(
        input_size=SIZE, flow_base="soft_argmax", soft_argmax_beta=20.0
    )
    assert (stage.model.flow_base, stage.model.soft_argmax_beta) == ("soft_argmax", 20.0)
    assert (
        stage.hparams.model["flow_base"] == "soft_argmax"
        and stage.hparams.model["soft_argmax_beta"] == 20.0
    )
    assert MatchingStage.from_options(input_size=SIZE).model.flow_base == "guidance"


def test_stage_one_trains_the_pruning_net_only():
    stage = PruningStage.from_options(input_size=SIZE)
    trained = {n for n, p in stage.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("model.pruning_net.") for n in trained)
    assert stage.hparams.model["trainable_blocks"] == 0


def test_stage_two_trains_pruning_matching_and_the_last_backbone_block():
    stage = MatchingStage.from_options(input_size=SIZE)
    trained = {n for n, p in stage.named_parameters() if p.requires_grad}
    assert any(n.startswith("model.pruning_net.") for n in trained)
    assert any(n.startswith("model.matching_net.") for n in trained)
    backbone = {n for n in trained if n.startswith("model.backbone.")}
    expected = {id(p) for p in stage.model.backbone.trainable_parameters()}
    assert backbone and {id(p) for n, p in stage.named_parameters() if n in backbone} == expected
    loss = _total_loss(stage.train(), _fixed_batch(1))
    loss.backward()
    grads = [p.grad for p in stage.model.backbone.trainable_parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_stage_two_starts_from_a_stage_one_checkpoint(tmp_path):

    first = PruningStage.from_options(input_size=SIZE)
    with torch.no_grad():
        first.model.pruning_net.body.conv8.bias.fill_(3.0)
    path = save_stage_checkpoint(first, tmp_path / "stage1.ckpt")
    second = MatchingStage.from_options(input_size=SIZE, init_checkpoint=str(path))
    second.setup("fit")
    assert (second.model.pruning_net.body.conv8.bias == 3.0).all()
    smaller = MatchingStage.from_options(input_size=128, init_checkpoint=str(path))
    with pytest.raises(ConfigError, match="input_size"):
        load_stage_weights(smaller, str(path))


@pytest.mark.parametrize(
    "kwargs, option",
    [
        ({"input_size": 100}, "input_size"),
        ({"window_m": 6}, "window_m"),
        ({"temperature": 0.0}, "temperature"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"rho": 1.5}, "rho"),
        ({"c_m": 0.0}, "c_m"),
        ({"flow_base": "argmax"}, "flow_base"),
        ({"soft_argmax_beta": -1.0}, "soft_argmax_beta"),
    ],
)
def test_bad_stage_options_name_the_option(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        PruningStage.from_options(**kwargs)


def test_a_checkpoint_written_before_the_flow_base_option_loads_as_tau_equals_g(tmp_path):
    stage = MatchingStage.from_options(input_size=SIZE, flow_base="soft_argmax")
    path = save_stage_checkpoint(stage, tmp_path / "new.ckpt")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for name in ("flow_base", "soft_argmax_beta"):
        del checkpoint["hyper_parameters"]["model"][name]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    loaded = MatchingStage.load_from_checkpoint(tmp_path / "old.ckpt", map_location="cpu")
    assert loaded.model.flow_base == "guidance"
    restored = MatchingStage.load_from_checkpoint(path, map_location="cpu")
    assert (restored.model.flow_base, restored.model.soft_argmax_beta) == ("soft_argmax", 50.0)


def test_a_checkpoint_written_before_the_refinement_option_keeps_its_unrefined_flow(tmp_path):
    stage = MatchingStage.from_options(input_size=SIZE, flow_base="soft_argmax")
    assert stage.model.soft_argmax_refine
    path = save_stage_checkpoint(stage, tmp_path / "new.ckpt")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    del checkpoint["hyper_parameters"]["model"]["soft_argmax_refine"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    assert not MatchingStage.load_from_checkpoint(tmp_path / "old.ckpt").model.soft_argmax_refine
    assert not GuidedSemanticFlow.from_checkpoint(tmp_path / "old.ckpt").model.soft_argmax_refine
    assert MatchingStage.load_from_checkpoint(path, map_location="cpu").model.soft_argmax_refine


class _PairsOf(pl.LightningDataModule):
    """A data module serving one fixed synthetic batch, declaring ``evaluation``."""

    def __init__(self, evaluation: str) -> None:
        super().__init__()
        self.evaluation = evaluation

    def val_dataloader(self):
        return DataLoader([_fixed_batch()], batch_size=None)


def _validate(evaluation: str) -> dict:
    stage = MatchingStage.from_options(input_size=SIZE)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    return trainer.validate(stage, datamodule=_PairsOf(evaluation), verbose=False)[0]


def test_the_data_module_says_how_its_pairs_are_scored():
    """The stage scores what the data module declares, whatever the batch carries: a dense
    batch under ``dense_flow`` gives EPE; under ``none`` it is refused, naming the module."""
    assert "val/epe_px" in _validate("dense_flow")
    with pytest.raises(ConfigError, match="_PairsOf.*evaluation"):
        _validate("none")


def test_option_groups_are_saved_as_plain_dicts_and_rebuild_the_stage(tmp_path):
    stage = MatchingStage(
        model=ModelConfig(input_size=SIZE, rho=0.7), loss=LossConfig(lambda_m=2.0)
    )
    assert stage.hparams["model"]["rho"] == 0.7 and stage.hparams["loss"]["lambda_m"] == 2.0
    assert stage.model_config.trainable_blocks == 1  # the stage's default, recorded
    path = save_stage_checkpoint(stage, tmp_path / "groups.ckpt")
    loaded = MatchingStage.load_from_checkpoint(path, map_location="cpu")
    assert loaded.model_config == stage.model_config
    assert loaded.loss_config == stage.loss_config and loaded.optim_config == OptimConfig()
