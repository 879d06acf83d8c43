"""The held-out mode of ``benchmarks/learning.py``: does fine-tuning help on classes it never saw?

For each leave-one-class-out fold of a PF-WILLOW layout (:mod:`data_modules.heldout`) it runs
``guided-flow fit`` with a fine-tuning config (default ``experiments/finetune_folders.yaml``) from
``--init-checkpoint`` on the other classes' images, saving a checkpoint every ``--eval-every``
steps, then scores the held-out class's keypoint pairs (PCK@0.05 and @0.1 with the benchmark's
bound) at step 0 (the initial checkpoint) and at every saved step, for tau, each ablation (tau
with the matching net off, with the pruning net off), G' and the argmax of C, and the untrained
model (weight-free, the config's model options) once per fold.

Runs are stored by ``--label`` in ``--out`` (other labels are kept), so that each lever is one
labelled run; ``--plot`` draws one run's fold-mean curves.

With ``--unseen`` the folds hold out whole *categories* (the class name before its parenthesis:
the three car classes are one category): train on the car images only and test duck(S), train on
the duck images only and test each car class. Its mean over the held-out classes is the
unseen-category figure: a fold of a car class trains on photographs of other cars, which
overstates what learning transfers to a category it never saw.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import yaml

from data_modules.heldout import HeldOutFold, classes, make_fold
from data_modules.pf_willow import PFWillowDataModule
from guided_flow.cli.main import TEST_TIME_OPTIONS
from guided_flow.cli.main import main as guided_flow
from guided_flow.evaluation.keypoints import KeypointEvaluator
from guided_flow.io.atomic import atomic_open
from guided_flow.model.flow_model import GuidedFlowModel, ModelConfig
from guided_flow.training.predictors import ABLATIONS, UNTRAINED, predictor_flows
from guided_flow.training.stages import MatchingStage

SCORED = ("gsf", *ABLATIONS, "guidance", "argmax")
ALPHAS = ("pck@0.05", "pck@0.1")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def set_option(config: dict, dotted: str, value: object) -> None:
    """Set ``a.b.c`` in a nested config dict (``model.`` options live under ``init_args``)."""
    keys = dotted.split(".")
    if keys[0] in ("model", "data") and keys[1] != "init_args":
        keys.insert(1, "init_args")
    node = config
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def apply_test_time_overrides(model: GuidedFlowModel, overrides: Mapping[str, object]) -> None:
    """Set on ``model`` the overridden model options that no weight depends on
    (``model.model.<option>`` for an option of ``TEST_TIME_OPTIONS``), so that step 0 is scored
    with them as the fine-tuned checkpoints are."""
    for dotted, value in overrides.items():
        keys = dotted.split(".")
        if keys[0] == "model" and keys[-2] == "model" and keys[-1] in TEST_TIME_OPTIONS:
            setattr(model, keys[-1], value)


def fit_config(
    base: Path,
    fold: HeldOutFold,
    init_checkpoint: str,
    steps: int,
    every: int,
    work: Path,
    overrides: Mapping[str, object],
    cache_dir: str,
) -> dict:
    """The fine-tuning config of one fold: ``base`` with its data root on the fold's training
    tree, no logger, and a checkpoint every ``every`` steps under ``work/checkpoints``."""
    config = yaml.safe_load(base.read_text())
    config["model"]["init_args"]["init_checkpoint"] = init_checkpoint
    config["data"]["init_args"].update(root=str(fold.train_root), cache_dir=cache_dir)
    config["trainer"].update(
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=str(work),
        callbacks=[
            {
                "class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                "init_args": {
                    "dirpath": str(work / "checkpoints"),
                    "filename": "step{step}",
                    "auto_insert_metric_name": False,
                    "every_n_train_steps": every,
                    "save_top_k": -1,
                },
            }
        ],
    )
    for dotted, value in overrides.items():
        set_option(config, dotted, value)
    return config


@torch.no_grad()
def score(
    model: GuidedFlowModel, datamodule: PFWillowDataModule, untrained: GuidedFlowModel | None
) -> dict[str, dict[str, float]]:
    """PCK of each predictor of :data:`SCORED` (and of the untrained model, when given) over
    the data module's test pairs."""
    model.eval()
    evaluators: dict[str, KeypointEvaluator] = {}
    for batch in datamodule.test_dataloader():
        out = model(batch["source_image"], batch["target_image"])
        flows = predictor_flows(model, batch, out, untrained, compare=True)
        for name in (*SCORED, UNTRAINED):
            if name not in flows:
                continue
            if name not in evaluators:
                evaluators[name] = KeypointEvaluator(
                    pck_bound=datamodule.pck_bound,
                    alphas=datamodule.alphas,
                    categories=datamodule.categories,
                )
            evaluators[name].update(batch, flows[name])
    results = {}
    for name, evaluator in evaluators.items():
        summary = evaluator.compute()
        results[name] = {alpha: round(float(summary[alpha]), 4) for alpha in ALPHAS}
        results[name]["per_category"] = {
            category: {alpha: round(float(row[alpha]), 4) for alpha in ALPHAS}
            for category, row in summary["per_category"].items()
            if row["pairs"]
        }
    return results


def category_folds(root: str) -> dict[str, tuple[str, ...]]:
    """The classes of each category of ``root``, by the class name before its parenthesis:
    ``{"car": ("car(G)", "car(M)", "car(S)"), "duck": ("duck(S)",)}``."""
    groups: dict[str, list[str]] = {}
    for name in classes(root):
        groups.setdefault(name.split("(")[0], []).append(name)
    return {category: tuple(names) for category, names in groups.items()}


def run_fold(
    root: str,
    held_out: tuple[str, ...],
    args: object,
    overrides: Mapping[str, object],
    work: Path,
) -> dict:
    """Fine-tune on the fold that holds out the classes ``held_out`` and score every saved
    step."""
    fold = make_fold(root, held_out, work / "fold")
    log(f"fold {held_out}: {len(fold.train_images)} training images, {fold.test_pairs} pairs")
    datamodule = PFWillowDataModule(
        root=str(fold.test_root), cache_dir=args.cache_dir, batch_size=8, num_workers=0
    )
    datamodule.prepare_data()
    datamodule.setup("test")
    config = fit_config(
        Path(args.config),
        fold,
        args.init_checkpoint,
        args.steps,
        args.eval_every,
        work,
        overrides,
        args.cache_dir,
    )
    model_options = config["model"]["init_args"]["model"]
    untrained = GuidedFlowModel.from_config(ModelConfig(**model_options)).eval()
    initial = MatchingStage.load_from_checkpoint(args.init_checkpoint, map_location="cpu").model
    apply_test_time_overrides(initial, overrides)
    records = [{"step": 0, **score(initial, datamodule, untrained)}]
    untrained_scores = records[0].pop(UNTRAINED)
    log(f"fold {held_out} step 0: {records[0]}")
    if args.steps:
        fit_path = work / "fit.yaml"
        fit_path.write_text(yaml.safe_dump(config))
        if guided_flow(["fit", "--config", str(fit_path)]) != 0:
            raise RuntimeError(f"fine-tuning failed on fold {held_out}")
    for step in range(args.eval_every, args.steps + 1, args.eval_every):
        path = work / "checkpoints" / f"step{step}.ckpt"
        model = MatchingStage.load_from_checkpoint(path, map_location="cpu").model
        records.append({"step": step, **score(model, datamodule, None)})
        log(f"fold {held_out} step {step}: {records[-1]}")
    return {
        "train_images": list(fold.train_images),
        "test_pairs": fold.test_pairs,
        "records": records,
        "untrained": untrained_scores,
    }


def class_mean(folds: Mapping[str, dict]) -> list[dict]:
    """The mean over held-out classes (each class of each fold once) of each predictor's PCK at
    each step: with ``--unseen``, the unseen-category figure."""
    first = next(iter(folds.values()))["records"]
    means = []
    for index, record in enumerate(first):
        mean: dict = {"step": record["step"]}
        for name in SCORED:
            rows = [
                row
                for fold in folds.values()
                for row in fold["records"][index][name]["per_category"].values()
            ]
            mean[name] = {
                alpha: round(sum(row[alpha] for row in rows) / len(rows), 4) for alpha in ALPHAS
            }
        means.append(mean)
    rows = [row for fold in folds.values() for row in fold["untrained"]["per_category"].values()]
    untrained = {alpha: round(sum(r[alpha] for r in rows) / len(rows), 4) for alpha in ALPHAS}
    return [{**mean, UNTRAINED: untrained} for mean in means]


def fold_mean(folds: Mapping[str, dict]) -> list[dict]:
    """The fold-mean PCK of each predictor at each step (each fold is one class)."""
    first = next(iter(folds.values()))["records"]
    means = []
    for index, record in enumerate(first):
        mean: dict = {"step": record["step"]}
        for name in SCORED:
            mean[name] = {
                alpha: round(
                    sum(f["records"][index][name][alpha] for f in folds.values()) / len(folds), 4
                )
                for alpha in ALPHAS
            }
        means.append(mean)
    untrained = {
        alpha: round(sum(f["untrained"][alpha] for f in folds.values()) / len(folds), 4)
        for alpha in ALPHAS
    }
    return [{**mean, UNTRAINED: untrained} for mean in means]


def plot(run: Mapping, label: str, path: str) -> None:
    """Held-out PCK@0.05 and @0.1 (fold means) against fine-tuning steps, per predictor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = run["mean"]
    steps = [record["step"] for record in mean]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    names = {
        "gsf": "tau (full model)",
        "gsf_no_matching": "matching net off",
        "gsf_no_pruning": "pruning net off",
        "guidance": "G'",
        "argmax": "argmax of C",
    }
    for axis, alpha in zip(axes, ALPHAS, strict=True):
        for name, text in names.items():
            axis.plot(steps, [r[name][alpha] for r in mean], marker="o", label=text)
        axis.axhline(mean[0][UNTRAINED][alpha], color="grey", linestyle="--", label="untrained")
        axis.set_title(f"held-out {alpha.upper()} (mean of {len(run['folds'])} folds)")
        axis.set_xlabel("fine-tuning step (0: the initial checkpoint)")
        axis.legend(fontsize=8)
    figure.suptitle(f"run {label!r}")
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)


def run(args: object, overrides: Mapping[str, object], folds: Sequence[str] | None) -> dict:
    """Every fold of ``args.heldout``; stores the labelled run in ``args.out``."""
    started = time.perf_counter()
    if getattr(args, "unseen", False):
        held_out = category_folds(args.heldout)
    else:
        held_out = {name: (name,) for name in classes(args.heldout)}
    names = list(folds or held_out)
    results = {}
    with tempfile.TemporaryDirectory(prefix="heldout-") as scratch:
        for name in names:
            work = Path(scratch) / name.replace("(", "_").replace(")", "")
            results[name] = run_fold(args.heldout, held_out[name], args, overrides, work)
    labelled = {
        "settings": {
            "config": args.config,
            "init_checkpoint": args.init_checkpoint,
            "steps": args.steps,
            "eval_every": args.eval_every,
            "overrides": dict(overrides),
        },
        "protocol": "unseen_category" if getattr(args, "unseen", False) else "leave_one_class_out",
        "folds": results,
        "mean": fold_mean(results),
        "class_mean": class_mean(results),
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out)
    stored = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    stored["runs"][args.label] = labelled
    with atomic_open(out) as handle:
        handle.write((json.dumps(stored, indent=1) + "\n").encode())
    if args.plot:
        plot(labelled, args.label, args.plot)
    return labelled


def markdown_table(stored: Mapping) -> str:
    """Each labelled run's fold-mean PCK@0.05 / @0.1 at its last step (for ``--unseen`` runs, the
    mean over held-out classes, marked "unseen"), beside the initial checkpoint (step 0), the
    untrained model and the argmax of C, as a markdown table."""
    rows = [
        "| run (steps) | tau | matching net off | pruning net off | G' | step 0 tau | untrained "
        "| argmax of C |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, labelled in stored["runs"].items():
        unseen = labelled.get("protocol") == "unseen_category"
        curve = labelled["class_mean"] if unseen else labelled["mean"]
        first, last = curve[0], curve[-1]

        def cell(scores: Mapping | None) -> str:
            return "" if scores is None else " / ".join(f"{scores[a]:.3f}" for a in ALPHAS)

        cells = [last["gsf"], last["gsf_no_matching"], last["gsf_no_pruning"], last["guidance"]]
        untrained = next((scores[UNTRAINED] for scores in curve if UNTRAINED in scores), None)
        cells += [first["gsf"], untrained, last["argmax"]]
        name = f"{label} ({last['step']}{', unseen' if unseen else ''})"
        rows.append(f"| {name} | " + " | ".join(map(cell, cells)) + " |")
    return "\n".join(rows)
