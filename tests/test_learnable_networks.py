"""Networks that can learn: the local cost volume the matching network may read, the relative
pruning mask whose gradient is alive at initialisation, and the negative-pair loss."""

from __future__ import annotations

import warnings
from dataclasses import asdict

import numpy as np
import onnxruntime
import pytest
import torch

from guided_flow.cli.export import FlowPredictor, example_inputs
from guided_flow.cli.main import main as cli_main
from guided_flow.errors import ConfigError
from guided_flow.model import volumes
from guided_flow.model.flow_model import GuidedFlowModel, ModelConfig
from guided_flow.model.local_cost import local_correlation, window_offsets
from guided_flow.model.losses import negative_pair_loss
from guided_flow.model.networks import PruningNet
from guided_flow.training.stages import MatchingStage, PruningStage
from tests.helpers import random_unit_features, save_stage_checkpoint, shifted_pair


def test_the_local_volume_reads_c_at_the_base_plus_each_displacement():
    source = random_unit_features(2, 8, 5, 6, seed=1)
    target = random_unit_features(2, 8, 5, 6, seed=2)
    volume = volumes.correlation(source, target)
    base = torch.zeros(2, 2, 5, 6)
    base[:, 0] = 1.0  # one cell to the right
    base[1, 1] = -0.5  # and, in the second pair, half a cell up
    local = local_correlation(volume, base, radius=1)
    assert local.shape == (2, 9, 5, 6)
    offsets = window_offsets(1)
    # first pair, source cell (x=2, y=2): displacement d reads target cell (3 + dx, 2 + dy)
    for k, (dx, dy) in enumerate(offsets.long().tolist()):
        j = (2 + dy) * 6 + (3 + dx)
        assert local[0, k, 2, 2] == pytest.approx(volume[0, j, 2, 2].item(), abs=1e-6)
    # second pair: half-way between two rows, so the mean of both (bilinear)
    upper, lower = volume[1, 1 * 6 + 3, 2, 2], volume[1, 2 * 6 + 3, 2, 2]
    assert local[1, 4, 2, 2] == pytest.approx(((upper + lower) / 2).item(), abs=1e-6)
    # outside the target grid the volume reads zero
    assert (local[0, :, 0, 5] == 0).sum() >= 3


def test_the_local_volume_peaks_at_the_centre_on_a_known_shift():
    source, target = shifted_pair(1, 32, 8, 8, (2, 1))
    volume = volumes.correlation(source, target)
    on_truth = torch.zeros(1, 2, 8, 8)
    on_truth[:, 0], on_truth[:, 1] = 2.0, 1.0
    local = local_correlation(volume, on_truth, radius=2)
    inner = (slice(0, 7), slice(0, 6))  # source cells whose shifted match lies on the grid
    assert (local[0, :, inner[0], inner[1]].argmax(dim=0) == 12).all()  # 12: d = (0, 0)
    # read around a base one cell off, the peak sits one displacement away
    off = local_correlation(volume, on_truth - torch.tensor([1.0, 0.0]).view(1, 2, 1, 1), 2)
    assert (off[0, :, inner[0], inner[1]].argmax(dim=0) == 13).all()  # d = (1, 0)


@pytest.mark.parametrize("grid", [(6, 6), (40, 40)])
def test_the_local_input_width_does_not_depend_on_the_grid(grid):
    model = GuidedFlowModel(None, grid, flow_base="soft_argmax", matching_input="local").eval()
    first = model.matching_net.body.layers[0][0]
    assert first.in_channels == 9 * 9 + 2
    source, target = shifted_pair(1, 16, *grid, (1, 0))
    out = model.forward_features(source, target)
    assert out.flow.shape == (1, 2, *grid)
    base = model.forward_features(source, target, use_matching_net=False).flow
    torch.testing.assert_close(out.flow, base)  # zero residual at initialisation


def test_local_source_features_widen_the_input_by_the_feature_channels():
    model = GuidedFlowModel(
        None, (6, 6), matching_input="local", local_radius=2, local_base_flow=False,
        local_source_features=True, feature_channels=16,
    )  # fmt: skip
    assert model.matching_net.body.layers[0][0].in_channels == 25 + 16
    source, target = shifted_pair(1, 16, 6, 6, (1, 0))
    x = model.matching_net_input(
        volumes.correlation(source, target), torch.zeros(1, 2, 6, 6), torch.zeros(1, 2, 6, 6),
        source,
    )  # fmt: skip
    torch.testing.assert_close(x[:, 25:], source)


@pytest.mark.parametrize("head", ["conv", "encoder_decoder"])
def test_the_local_matching_net_learns_a_known_shift(head):
    """Supervised steps on the local input move tau towards the truth on a known shift."""
    torch.manual_seed(0)
    model = GuidedFlowModel(
        None, (8, 8), flow_base="soft_argmax", matching_input="local", local_head=head
    )
    source, target = shifted_pair(4, 32, 8, 8, (1, 0))
    truth = torch.zeros(4, 2, 8, 8)
    truth[:, 0] = 1.0
    optimizer = torch.optim.Adam(model.matching_net.parameters(), lr=1e-3)
    model.train()
    errors = []
    for _ in range(30):
        out = model.forward_features(source, target + 0.3 * random_unit_features(4, 32, 8, 8))
        error = (out.flow - truth).norm(dim=1).mean()
        optimizer.zero_grad()
        error.backward()
        optimizer.step()
        errors.append(error.item())
    assert errors[-1] < 0.7 * errors[0]


def test_bad_network_options_are_refused_with_the_option_named():
    for options, name in (
        ({"matching_input": "absolute"}, "matching_input"),
        ({"local_radius": 0}, "local_radius"),
        ({"pruning_mask": "tanh"}, "pruning_mask"),
        ({"local_head": "mlp"}, "local_head"),
    ):
        with pytest.raises(ConfigError, match=name):
            ModelConfig(**options).check()


def test_checkpoints_without_the_new_options_load_as_the_papers():
    config = ModelConfig.from_hparams({"model": {"rho": 0.8}})
    assert (config.matching_input, config.pruning_mask, config.pruning_init_logit) == (
        "global", "sigmoid", 10.0,
    )  # fmt: skip


def test_the_relative_mask_starts_at_q_with_a_live_gradient():
    confidence = volumes.soft_mutual_confidence(
        volumes.correlation(*shifted_pair(1, 16, 6, 6, (1, 0)))
    )
    gradients = {}
    for relative, logit in ((False, 10.0), (True, 0.0)):
        torch.manual_seed(0)
        net = PruningNet(36, logit, relative).eval()
        refined = net.refine(confidence)
        if relative:
            torch.testing.assert_close(refined, confidence, rtol=0, atol=1e-6)
        confident = confidence > 0.9
        refined[confident].sum().backward()
        gradients[relative] = net.body.conv8.bias.grad.abs().max().item()
    # sigmoid'(10) / sigmoid(10) = 4.5e-5 against 1 - sigmoid(0) = 0.5
    assert gradients[True] > 1000 * gradients[False]


def test_the_relative_mask_is_clipped_at_one():
    net = PruningNet(4, 0.0, relative=True).eval()
    with torch.no_grad():
        net.body.conv8.bias.fill_(5.0)  # mask sigmoid(5) / sigmoid(0) = 1.99
    refined = net.refine(torch.full((1, 4, 2, 2), 0.8))
    assert refined.max() == 1.0


def test_the_negative_pair_loss_pushes_confident_matches_below_rho():
    confidence = torch.tensor([0.95, 0.92, 0.5, 0.3]).view(1, 4, 1, 1)
    # Q' already below rho - margin for the two confident ones: nothing left to push
    assert negative_pair_loss(confidence, confidence * 0.5, 0.9, 0.1).item() == 0.0
    refined = confidence.clone().requires_grad_(True)
    loss = negative_pair_loss(confidence, refined, 0.9, 0.1)
    # mean over the two confident matches of Q' - 0.8
    assert loss.item() == pytest.approx(((0.95 - 0.8) + (0.92 - 0.8)) / 2, abs=1e-6)
    loss.backward()
    assert refined.grad.view(-1).tolist() == pytest.approx([0.5, 0.5, 0.0, 0.0])
    empty = negative_pair_loss(torch.zeros(1, 4, 1, 1), torch.zeros(1, 4, 1, 1), 0.9)
    assert empty.item() == 0.0


class _Labelled:
    """The part of a data module the negative-pair loss asks: which pictures differ."""

    def __init__(self, labels):
        self.labels = labels

    def negative_labels(self, batch):
        return self.labels


def _stage_with(stage_class, labels, **options):
    stage = stage_class.from_options(input_size=96, weights="none", lambda_neg=1.0, **options)
    trainer = type("T", (), {"datamodule": _Labelled(labels) if labels else object()})()
    stage._trainer = trainer  # what Lightning attaches during fit
    return stage


@pytest.mark.parametrize("stage_class", [PruningStage, MatchingStage])
def test_negative_pairs_are_the_batch_rolled_where_labels_differ(stage_class):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        stage = _stage_with(stage_class, ["duck", "duck", "car"], pruning_mask="relative",
                            pruning_init_logit=0.0)  # fmt: skip
    features = random_unit_features(3, 16, 6, 6, seed=3)
    out = stage.model.forward_features(features, features, refine=False)
    term = stage.negative_pair_term(out, {})
    # the negatives are (0, target of 2) and (2, target of 1): duck/car and car/duck; at
    # initialisation Q' = Q, so the term is the mean of Q - 0.8 over their Q > 0.9
    negative = volumes.soft_mutual_confidence(
        volumes.correlation(features[[0, 2]], features[[2, 1]])
    )
    expected = (negative[negative > 0.9] - 0.8).mean()
    assert term.item() == pytest.approx(expected.item(), abs=1e-5)
    term.backward()
    assert stage.model.pruning_net.body.conv8.bias.grad.abs().max() > 0
    stage._trainer.datamodule = _Labelled(["duck"] * 3)
    assert stage.negative_pair_term(out, {}).item() == 0.0  # one category: no negative pair


def test_the_negative_pair_loss_needs_a_data_module_that_names_what_differs():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        stage = _stage_with(PruningStage, None)
    features = random_unit_features(2, 16, 6, 6)
    out = stage.model.forward_features(features, features, refine=False)
    with pytest.raises(ConfigError, match="negative_labels"):
        stage.negative_pair_term(out, {})


@pytest.fixture(scope="module")
def local_checkpoint(tmp_path_factory):
    """A checkpoint of the proposed networks (local input, relative mask) with non-trivial last
    layers, as a stage would save it."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        config = ModelConfig(
            weights="none", input_size=64, flow_base="soft_argmax", matching_input="local",
            local_radius=2, pruning_mask="relative", pruning_init_logit=0.0,
        )  # fmt: skip
        model = GuidedFlowModel.from_config(config).eval()
    with torch.no_grad():
        for net in (model.pruning_net, model.matching_net):
            net.body.output_layer.weight.normal_(0.0, 0.05)
    path = tmp_path_factory.mktemp("ckpt") / "local.ckpt"
    torch.save(
        {
            "state_dict": {f"model.{key}": value for key, value in model.state_dict().items()},
            "hyper_parameters": {"model": asdict(config)},
        },
        path,
    )
    return path, model


@pytest.mark.parametrize("kind", ["torchscript", "onnx"])
def test_the_local_model_exports_and_matches_eager(local_checkpoint, tmp_path, kind):
    path, model = local_checkpoint
    out = tmp_path / f"model.{'pt' if kind == 'torchscript' else 'onnx'}"
    assert cli_main(["export", "--ckpt", str(path), "--format", kind, "--out", str(out)]) == 0
    inputs = example_inputs(model, batch=2)
    with torch.inference_mode():
        expected = FlowPredictor(model)(*inputs).numpy()
    assert np.abs(expected).max() > 0.1
    if kind == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            exported = torch.jit.load(str(out))
        with torch.inference_mode():
            flow = exported(*inputs).numpy()
    else:
        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        (flow,) = session.run(
            None, {"source_image": inputs[0].numpy(), "target_image": inputs[1].numpy()}
        )
    np.testing.assert_allclose(flow, expected, rtol=0, atol=1e-3)


def test_a_local_stage_round_trips_through_its_checkpoint(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        stage = MatchingStage.from_options(
            input_size=64, weights="none", flow_base="soft_argmax", matching_input="local",
            pruning_mask="relative", pruning_init_logit=0.0, lambda_neg=0.5,
        )  # fmt: skip
        path = save_stage_checkpoint(stage, tmp_path / "local.ckpt")
        loaded = MatchingStage.load_from_checkpoint(path, map_location="cpu")
    assert loaded.model.matching_input == "local" and loaded.model.pruning_net.relative
    assert loaded.loss_config.lambda_neg == 0.5
    source = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(
        loaded.eval()(source, source.flip(-1)).flow, stage.eval()(source, source.flip(-1)).flow
    )


def test_training_data_modules_say_which_pictures_must_not_correspond():
    from data_modules.folders import ImageFoldersDataModule
    from data_modules.pf_pascal import PFPascalDataModule
    from data_modules.synthetic import SyntheticPairsDataModule

    batch = {"category": ["car", "duck"], "meta": {"image_name": ["astronaut", "coffee"]}}
    assert ImageFoldersDataModule.negative_labels(batch) == ["car", "duck"]
    assert PFPascalDataModule.negative_labels(batch) == ["car", "duck"]
    # every synthetic pair is of category "synthetic": the photographs tell them apart
    assert SyntheticPairsDataModule.negative_labels(batch) == ["astronaut", "coffee"]


def test_a_run_of_other_networks_starts_them_afresh_from_a_papers_checkpoint(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        paper = MatchingStage.from_options(input_size=64, weights="none")
        with torch.no_grad():
            paper.model.matching_net.body.conv8.bias.fill_(0.5)
            paper.model.pruning_net.body.conv8.bias.fill_(3.0)
        path = save_stage_checkpoint(paper, tmp_path / "paper.ckpt")
        local = MatchingStage.from_options(
            input_size=64, weights="none", matching_input="local", init_checkpoint=str(path)
        )
    with pytest.warns(UserWarning, match="matching_net built with other options"):
        local.initialise_from_checkpoint()
    assert (local.model.matching_net.body.output_layer.bias == 0).all()  # fresh
    assert (local.model.pruning_net.body.conv8.bias == 3.0).all()  # loaded
    torch.testing.assert_close(local.model.backbone.state_dict(), paper.model.backbone.state_dict())
