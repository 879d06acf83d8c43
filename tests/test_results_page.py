"""The page `guided-flow test` writes: files next to the results, rows per pair, thumbnails,
and, in headless Chromium, sorting and the pair view; its rows as a W&B table."""

from __future__ import annotations

import json
import re

import pytest
from pytorch_lightning.loggers import WandbLogger
from selenium.webdriver.common.by import By

from guided_flow.cli.main import main
from guided_flow.training.stages import MatchingStage
from guided_flow.viz.results_recorder import log_pairs_table, pair_panel_image
from tests.helpers import save_stage_checkpoint
from tests.test_pf_pascal import INPUT, REPO
from tests.test_pf_willow import image, willow_row, write_willow

SRC = [(10, 20), (60, 80), (150, 140), (30, 100)]
TRG = [(20, 30), (70, 60), (120, 140), (40, 90)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """`guided-flow test` of a three-pair PF-WILLOW layout."""
    tmp = tmp_path_factory.mktemp("page")
    rows = [
        willow_row(image("car(S)", 1), image("car(S)", 2), SRC, TRG),
        willow_row(image("car(S)", 2), image("car(S)", 3), SRC[:3], TRG[:3]),
        willow_row(image("duck(S)", 1), image("duck(S)", 2), SRC, SRC),
    ]
    write_willow(tmp / "willow", rows)
    stage = MatchingStage.from_options(backbone="resnet18", weights="none", input_size=INPUT)
    checkpoint = save_stage_checkpoint(stage, tmp / "model.ckpt")
    args = [
        "test",
        "--config",
        str(REPO / "experiments" / "test_pfwillow.yaml"),
        f"--ckpt_path={checkpoint}",
        f"--data.root={tmp / 'willow'}",
        f"--data.cache_dir={tmp / 'cache'}",
        "--data.num_workers=0",
        f"--results_dir={tmp / 'results'}",
    ]
    assert main(args) == 0
    return tmp / "results"


def page_pairs(results_dir) -> list[dict]:
    text = (results_dir / "pairs.js").read_text()
    return json.loads(re.search(r"=\s*(\[.*\])\s*;?\s*$", text, re.S).group(1))


@pytest.mark.slow
def test_test_writes_a_page_with_one_row_and_two_thumbnails_per_pair(results):
    pairs = page_pairs(results)
    predictions = [json.loads(line) for line in (results / "predictions.jsonl").open()]
    assert [p["pair_id"] for p in pairs] == [p["pair_id"] for p in predictions]
    for pair, line in zip(pairs, predictions, strict=True):
        assert pair["pck"] == pytest.approx(sum(line["hits"]) / len(line["hits"]))
        assert pair["source_size"] == [150, 200]  # write_willow's images: (H, W)
        for key in ("source_thumb", "target_thumb"):
            assert (results / pair[key]).is_file()
    assert [len(p["hits"]) for p in pairs] == [4, 3, 4]


@pytest.mark.slow
@pytest.mark.browser
def test_the_test_page_sorts_and_opens_a_pair(results, driver):
    driver.get((results / "index.html").as_uri())
    pairs = page_pairs(results)
    driver.find_element(By.ID, "sort-pck").click()
    rows = driver.find_elements(By.CSS_SELECTOR, "tr.pair-row")
    shown = [int(row.get_attribute("data-index")) for row in rows]
    scores = [pairs[i]["pck"] for i in shown]
    assert sorted(shown) == [0, 1, 2] and scores == sorted(scores)  # the first click: ascending
    driver.find_elements(By.CSS_SELECTOR, "tr.pair-row")[0].click()
    view = driver.find_element(By.ID, "pair-view")
    assert len(view.find_elements(By.TAG_NAME, "img")) == 2
    marks = len(view.find_elements(By.CSS_SELECTOR, ".hit")) + len(
        view.find_elements(By.CSS_SELECTOR, ".miss")
    )
    assert marks == len(pairs[shown[0]]["hits"])


@pytest.mark.slow
def test_the_rows_go_to_wandb_as_a_table_of_pair_panels(results, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    pairs = page_pairs(results)
    panel = pair_panel_image(str(results), pairs[0])
    assert panel.ndim == 3 and panel.shape[2] == 3 and panel.shape[1] > panel.shape[0]
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), id="tablerun")
    log_pairs_table([logger], str(results), pairs)
    logger.experiment.finish()
    # the table as the run stores it (its panel images go into the table's artifact)
    table = json.loads(next(tmp_path.rglob("pairs_*.table.json")).read_text())
    assert table["columns"] == ["pair_id", "category", "pck", "panel"]
    assert [row[:3] for row in table["data"]] == [
        [pair["pair_id"], pair["category"], pair["pck"]] for pair in pairs
    ]
    assert all(row[3] is not None for row in table["data"])  # every pair has its panel
