"""What the learning levers do: the ablation switches, the warp-consistency objective and the
held-out folds that never train on an evaluated class."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from data_modules.heldout import make_fold
from guided_flow.cli.main import main
from guided_flow.errors import DataError
from guided_flow.model.flow_model import GuidedFlowModel
from guided_flow.model.losses import compose_flows, inside_grid, warp_consistency_loss
from guided_flow.training.stages import MatchingStage
from tests.helpers import load_benchmark, save_stage_checkpoint, shifted_pair

GRID = 6
ROOT = Path(__file__).resolve().parents[1]


def trained_looking_model(flow_base: str = "soft_argmax") -> GuidedFlowModel:
    """A features-only model whose networks are no longer at their initialisation: the pruning
    net passes 0.73 of Q (so no match stays above rho) and the matching net adds (0.3, -0.2)."""
    model = GuidedFlowModel(None, (GRID, GRID), rho=0.85, flow_base=flow_base).eval()
    with torch.no_grad():
        model.pruning_net.body.conv8.bias.fill_(1.0)  # sigmoid(1) = 0.73
        model.matching_net.body.conv8.bias.copy_(torch.tensor([0.3, -0.2]))
    return model


@pytest.mark.parametrize("flow_base", ["guidance", "soft_argmax"])
def test_each_switch_changes_the_flow(flow_base):
    source, target = shifted_pair(2, 16, GRID, GRID, (1, 0))
    model = trained_looking_model(flow_base)
    full = model.forward_features(source, target)
    no_matching = model.forward_features(source, target, use_matching_net=False)
    no_pruning = model.forward_features(source, target, use_pruning_net=False)
    # matching net off: tau is the flow base alone, 0.3 / -0.2 cells from the full model's
    assert torch.allclose(full.flow - no_matching.flow, torch.tensor([0.3, -0.2]).view(1, 2, 1, 1))
    if flow_base == "guidance":
        assert torch.equal(no_matching.flow, no_matching.guidance)
    # pruning net off: Q' = Q, and the confident set (so G') changes
    assert torch.equal(no_pruning.refined_confidence, no_pruning.confidence)
    assert not torch.equal(full.refined_confidence, full.confidence)
    assert full.confident_density.max() == 0 < no_pruning.confident_density.min()
    assert not torch.allclose(no_pruning.guidance, full.guidance)
    # the model's own switches do the same
    model.use_matching_net = False
    assert torch.equal(model.forward_features(source, target).flow, no_matching.flow)


@pytest.mark.slow
def test_guided_flow_test_applies_and_records_the_switches(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        # S unrefined: the refinement's maximum is piecewise constant in S, so a small change of
        # S may leave tau as it is
        stage = MatchingStage.from_options(
            input_size=160, flow_base="soft_argmax", soft_argmax_refine=False
        )
    with torch.no_grad():
        stage.model.pruning_net.body.conv8.bias.fill_(1.0)  # Q' = 0.73 Q: nothing confident
        stage.model.matching_net.body.conv8.bias.copy_(torch.tensor([1.5, -1.0]))
    checkpoint = save_stage_checkpoint(stage, tmp_path / "model.ckpt")
    args = [
        "test",
        "--config=experiments/demo_stage2.yaml",
        f"--ckpt_path={checkpoint}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.test_pairs=2",
        "--data.batch_size=2",
        "--trainer.logger=false",
    ]
    scores = {}
    for switch in (None, "use_matching_net", "use_pruning_net"):
        results = tmp_path / str(switch)
        extra = [f"--model.model.{switch}=false"] if switch else []
        assert main([*args, f"--results_dir={results}", *extra]) == 0
        run = json.loads((results / "run.json").read_text())
        assert run["test_time_overrides"] == ({switch: False} if switch else {})
        assert run["checkpoint_hparams"]["model"].get(switch, False) is False
        scores[switch] = json.loads((results / "metrics.json").read_text())["gsf"]["epe_px"]
    # the matching net's residual of 1.5 / -1 cells is gone with it switched off, and with the
    # pruning net off the confident set (so G' and S) comes back
    assert scores["use_matching_net"] != scores[None]
    assert scores["use_pruning_net"] != scores[None]
    # the weight-free test-time options are switched and recorded the same way
    results = tmp_path / "views"
    extra = ["--model.model.cycle_consistency=true", "--model.model.feature_views=scale"]
    assert main([*args, f"--results_dir={results}", *extra]) == 0
    run = json.loads((results / "run.json").read_text())
    assert run["test_time_overrides"] == {"cycle_consistency": True, "feature_views": "scale"}
    assert json.loads((results / "metrics.json").read_text())["gsf"]["epe_px"] != scores[None]


def test_warp_consistency_is_zero_for_exact_flows_and_positive_otherwise():
    generator = torch.Generator().manual_seed(0)
    # W (s' -> s): a smooth non-constant field; F(t -> s) a constant a; F(s' -> t) = W - a, so
    # following F(s' -> t) then F(t -> s) gives W exactly wherever the match in t is on the grid
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    warp = torch.stack((0.1 * xs - 0.2 * ys + 0.5, 0.05 * ys + 0.1 * xs - 0.3)).unsqueeze(0)
    back = torch.tensor([0.7, -0.4]).view(1, 2, 1, 1).expand(1, 2, 8, 8).clone()
    cross = warp - back
    valid = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    inside = inside_grid(cross).expand(1, 2, 8, 8)
    assert inside.sum() > 60
    assert torch.allclose(compose_flows(cross, back)[inside], warp[inside], atol=1e-6)
    self_term, cross_term = warp_consistency_loss(warp, cross, back, warp, valid)
    assert self_term.item() == 0.0 and cross_term.item() < 1e-6
    noise = 0.3 * torch.randn(1, 2, 8, 8, generator=generator)
    self_term, cross_term = warp_consistency_loss(warp + noise, cross + noise, back, warp, valid)
    assert self_term.item() > 0.1 and cross_term.item() > 0.1
    # a composed error beyond the visibility bound is not counted (no counterpart in t)
    far = cross.clone()
    far[..., 3, 3] += torch.tensor([0.0, 3.0])
    _, masked = warp_consistency_loss(warp, far, back, warp, valid, visibility=2.0)
    assert masked.item() < 1e-6


def test_warp_consistency_trains_the_matching_net():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        stage = MatchingStage.from_options(
            weights="none", input_size=64, flow_base="soft_argmax", lambda_wc_self=1.0,
            lambda_wc_cross=0.5,
        )  # fmt: skip
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    batch = {"source_image": images, "target_image": images.flip(-1)}
    out = stage.model(batch["source_image"], batch["target_image"])
    terms = stage.loss_terms(out, batch)
    assert {"wc_self", "wc_cross"} <= set(terms)
    assert all(torch.isfinite(value) for value in terms.values())
    assert terms["wc_self"] > 0
    stage.total_loss(terms).backward()
    assert stage.model.matching_net.body.conv8.weight.grad.abs().sum() > 0
    # without the weights the terms are not computed: the paper's losses alone
    plain = MatchingStage.from_options(weights="none", input_size=64)
    assert "wc_self" not in plain.loss_terms(plain.model(images, images), batch)


def write_layout(root, images: dict[str, dict[str, bytes]]) -> None:
    """A PF-WILLOW layout: ``images[class][name] = bytes``, and the ordered pairs within each
    class in the 42-column list (keypoints arbitrary)."""
    rows = ["imageA,imageB," + ",".join(f"k{i}" for i in range(40))]
    for name, files in images.items():
        folder = root / "PF-dataset" / name
        folder.mkdir(parents=True)
        for file, content in files.items():
            (folder / file).write_bytes(content)
        for a in files:
            for b in files:
                if a != b:
                    coords = ",".join(str(10 + i) for i in range(40))
                    rows.append(f"PF-dataset/{name}/{a},PF-dataset/{name}/{b},{coords}")
    (root / "test_pairs.csv").write_text("\n".join(rows) + "\n")


def test_a_fold_never_trains_on_an_image_of_an_evaluated_class(tmp_path):
    root = tmp_path / "willow"
    write_layout(
        root,
        {
            "car(G)": {"a.png": b"car a", "b.png": b"car b", "c.png": b"car c"},
            # b.png under another name (same photograph), c.png's name with other bytes
            "car(M)": {"copy_of_b.png": b"car b", "c.png": b"other c", "d.png": b"car d"},
            "duck(S)": {"x.png": b"duck x", "y.png": b"duck y"},
        },
    )
    fold = make_fold(root, ("car(G)",), tmp_path / "fold")
    assert fold.train_images == ("car(M)/d.png", "duck(S)/x.png", "duck(S)/y.png")
    evaluated = {(root / "PF-dataset" / name).read_bytes() for name in fold.test_images}
    trained = [p for p in fold.train_root.rglob("*") if p.is_file()]
    assert len(trained) == 3 and not {p.read_bytes() for p in trained} & evaluated
    pairs = (fold.test_root / "test_pairs.csv").read_text().splitlines()[1:]
    assert fold.test_pairs == len(pairs) == 6
    assert all(row.count("PF-dataset/car(G)/") == 2 for row in pairs)
    with pytest.raises(DataError, match="no class 'bike'"):
        make_fold(root, ("bike",), tmp_path / "other")


def test_the_held_out_fit_trains_on_the_fold_tree_only(tmp_path):
    heldout = load_benchmark("heldout")
    root = tmp_path / "willow"
    write_layout(root, {"a": {"1.png": b"1", "2.png": b"2"}, "b": {"3.png": b"3", "4.png": b"4"}})
    fold = make_fold(root, ("a",), tmp_path / "fold")
    config = heldout.fit_config(
        ROOT / "experiments" / "finetune_folders.yaml",
        fold,
        "init.ckpt",
        20,
        10,
        tmp_path / "work",
        {"model.loss.lambda_wc_cross": 2.0, "model.model.trainable_blocks": 1},
        str(tmp_path / "cache"),
    )
    assert config["data"]["init_args"]["root"] == str(fold.train_root)
    assert sorted(p.parent.name for p in fold.train_root.rglob("*.png")) == ["b", "b"]
    assert config["model"]["init_args"]["init_checkpoint"] == "init.ckpt"
    assert config["model"]["init_args"]["loss"]["lambda_wc_cross"] == 2.0
    assert config["model"]["init_args"]["model"]["trainable_blocks"] == 1
    assert config["trainer"]["max_steps"] == 20 and config["trainer"]["logger"] is False
    (checkpoints,) = config["trainer"]["callbacks"]
    assert checkpoints["init_args"]["every_n_train_steps"] == 10


def test_step_0_is_scored_with_the_overridden_test_time_options():
    from guided_flow.model.flow_model import GuidedFlowModel

    model = GuidedFlowModel(None, grid=(6, 6))
    assert model.soft_argmax_refine and model.use_matching_net
    overrides = {
        "model.model.soft_argmax_refine": False,
        "model.init_args.model.use_matching_net": False,
        "model.model.trainable_blocks": 1,  # the weights depend on it: not a test-time option
        "model.loss.lambda_m": 2.0,
    }
    _benchmark_heldout().apply_test_time_overrides(model, overrides)
    assert not model.soft_argmax_refine and not model.use_matching_net
    assert not hasattr(model, "trainable_blocks") and not hasattr(model, "lambda_m")


def _benchmark_heldout():
    return load_benchmark("heldout")


def test_unseen_category_folds_hold_out_whole_categories_and_average_classes(tmp_path):
    heldout = _benchmark_heldout()
    root = tmp_path / "willow"
    write_layout(root, {"car(G)": {"1.png": b"1"}, "car(M)": {"2.png": b"2"},
                        "duck(S)": {"3.png": b"3"}})  # fmt: skip
    assert heldout.category_folds(root) == {"car": ("car(G)", "car(M)"), "duck": ("duck(S)",)}

    def scores(per_category):  # one record of every predictor with these per-class PCKs
        pck = {c: {"pck@0.05": v / 2, "pck@0.1": v} for c, v in per_category.items()}
        return {"step": 0, **{name: {"per_category": pck} for name in heldout.SCORED}}

    folds = {
        "car": {"records": [scores({"car(G)": 0.2, "car(M)": 0.4})],
                "untrained": {"per_category": {"car(G)": {"pck@0.05": 0.0, "pck@0.1": 0.1},
                                               "car(M)": {"pck@0.05": 0.0, "pck@0.1": 0.1}}}},
        "duck": {"records": [scores({"duck(S)": 0.9})],
                 "untrained": {"per_category": {"duck(S)": {"pck@0.05": 0.0, "pck@0.1": 0.4}}}},
    }  # fmt: skip
    (mean,) = heldout.class_mean(folds)
    # each held-out class once: (0.2 + 0.4 + 0.9) / 3, not the fold mean (0.3 + 0.9) / 2
    assert mean["gsf"]["pck@0.1"] == pytest.approx(0.5)
    assert mean["gsf_untrained"]["pck@0.1"] == pytest.approx(0.2)


def test_the_background_is_outside_the_source_keypoints_box_grown_by_one_cell():
    confident_set = load_benchmark("confident_set")
    batch = {
        "source_image": torch.zeros(1, 3, 96, 96),  # a 6 x 6 grid of 16-pixel cells
        "source_kps": torch.tensor([[[40.0, 40.0], [56.0, 40.0], [0.0, 0.0]]]),
        "kps_valid": torch.tensor([[True, True, False]]),  # the padded (0, 0) does not count
    }
    background = confident_set.keypoint_box_background(batch, (6, 6))
    # keypoints in cells x 2..3, y 2: the box grown by one cell is x 1..4, y 1..3
    expected = torch.ones(6, 6, dtype=torch.bool)
    expected[1:4, 1:5] = False
    assert torch.equal(background[0, 0], expected)


def test_the_confident_set_benchmark_scores_the_set_that_enters_the_guidance() -> None:
    """A 2 x 3 grid, one keypoint at source cell (0, 0) whose truth is target cell (2, 1). Q > rho
    holds its right match, a wrong one, and a match of background cell (2, 1); the set entering
    G (the cycle test applied) keeps the right match alone."""
    confident_set = load_benchmark("confident_set")
    confidence = torch.zeros(1, 6, 2, 3)
    confidence[0, 5, 0, 0] = 1.0  # source (0, 0) -> target (2, 1): right
    confidence[0, 0, 0, 0] = 0.95  # source (0, 0) -> target (0, 0): wrong
    confidence[0, 0, 1, 2] = 1.0  # source (2, 1), outside the keypoint's box grown by one cell
    guided = confidence.clone()
    guided[0, 0] = 0.0

    class Fixed:
        grid, rho = (2, 3), 0.9

        def __call__(self, *images, refine: bool = True) -> SimpleNamespace:
            return SimpleNamespace(
                confidence=confidence, refined_confidence=confidence, guided_confidence=guided
            )

    batch = {
        "source_image": torch.zeros(1, 3, 32, 48),
        "target_image": torch.zeros(1, 3, 32, 48),
        "source_kps": torch.tensor([[[7.5, 7.5]]]),
        "target_kps": torch.tensor([[[39.5, 23.5]]]),
        "kps_valid": torch.tensor([[True]]),
        "category": ["duck"],
    }
    result = confident_set.compare(Fixed(), [batch], confident_set.keypoint_truth, True)["duck"]
    assert (result["untrained"], result["matches"]) == (0.5, 2)
    assert (result["guided"], result["guided_matches"], result["guided_density"]) == (1.0, 1, 1.0)
    assert result["background_share"]["untrained"] == round(1 / 3, 4)
    assert result["background_share"]["guided"] == 0.0
