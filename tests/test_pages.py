"""The HTML pages in headless Chromium: the match page's point transfer against the library's,
its markers and toggles, the results page's sorting, filtering, paging and pair view, and that
neither page requests anything outside ``file://``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from guided_flow.api import GuidedSemanticFlow, flow_to_original_pixels, warp_source
from guided_flow.viz.drawing import flow_to_color
from guided_flow.viz.match_page import write_match_page
from guided_flow.viz.results_page import (
    PAGE_SIZE,
    THUMB_DISPLAY,
    write_pair_thumbnails,
    write_results_page,
)

SOURCE_SIZE, TARGET_SIZE, INPUT_SIZE = (150, 200), (120, 90), (64, 64)  # (H, W)


def picture(size: tuple[int, int], seed: int) -> np.ndarray:
    """A smooth colourful ``H x W x 3`` uint8 picture with a few discs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: size[0], : size[1]] / max(size)
    phases = rng.uniform(0, 2 * np.pi, (3, 2))
    image = np.stack([np.sin(6 * x + a) * np.cos(5 * y + b) for a, b in phases], axis=-1)
    for cx, cy, r in rng.uniform(0.1, 0.9, (4, 3)) * [size[1], size[0], 0.15 * min(size)]:
        disc = (np.mgrid[: size[0], : size[1]][1] - cx) ** 2 + (
            np.mgrid[: size[0], : size[1]][0] - cy
        ) ** 2 < r**2
        image[disc] = rng.uniform(-1, 1, 3)
    return ((image + 1) * 127.5).astype(np.uint8)


def smooth_flow(seed: int, amplitude: float = 6.0) -> torch.Tensor:
    """A random smooth ``2 x H x W`` float32 flow on the input grid (input pixels)."""
    coarse = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(seed))
    flow = F.interpolate(coarse, size=INPUT_SIZE, mode="bicubic", align_corners=True)[0]
    return (amplitude * flow).float()


def library_transfer(flow: torch.Tensor, points: np.ndarray) -> np.ndarray:
    """``K x 2`` original source pixels -> original target pixels, by the library's own
    ``GuidedSemanticFlow._transfer`` (it only reads ``input_size`` from the matcher)."""
    matcher = SimpleNamespace(input_size=INPUT_SIZE)
    return GuidedSemanticFlow._transfer(matcher, flow, points, SOURCE_SIZE, TARGET_SIZE)


@pytest.fixture(scope="module")
def match_page(tmp_path_factory):
    """A match page of two synthetic pictures; returns (path, flow, source_kps, matches)."""
    flow_s2t, flow_t2s = smooth_flow(0), smooth_flow(1)
    source, target = picture(SOURCE_SIZE, 2), picture(TARGET_SIZE, 3)
    source_kps = np.array([[20.0, 30.0], [150.5, 40.25], [100.0, 120.0], [60.0, 90.0]])
    grid = np.stack(np.meshgrid(np.arange(10, 200, 25), np.arange(10, 150, 25)), -1)
    match_source = grid.reshape(-1, 2).astype(np.float64)
    matches = (match_source, library_transfer(flow_s2t, match_source))
    path = tmp_path_factory.mktemp("match") / "match.html"
    write_match_page(
        path,
        source,
        target,
        flow_s2t.numpy(),
        tuple(m.astype(np.float32) for m in matches),
        flow_to_color(flow_to_original_pixels(flow_s2t, SOURCE_SIZE, TARGET_SIZE).numpy()),
        warp_source(source, flow_to_original_pixels(flow_t2s, TARGET_SIZE, SOURCE_SIZE).numpy()),
        source_kps,
        library_transfer(flow_s2t, source_kps),
    )
    return SimpleNamespace(path=path, flow=flow_s2t, kps=source_kps, matches=len(match_source))


def style_px(driver, element_id: str) -> np.ndarray:
    """(left, top) of an absolutely positioned element, CSS pixels."""
    values = driver.execute_script(
        "const s = document.getElementById(arguments[0]).style;"
        "return [parseFloat(s.left), parseFloat(s.top)];",
        element_id,
    )
    return np.array(values)


def assert_offline(driver, path: Path) -> None:
    """The page fetched only ``data:`` and ``file:`` URLs and names no web address."""
    names = driver.execute_script(
        "return performance.getEntriesByType('resource').map((e) => e.name);"
    )
    assert all(name.startswith(("data:", "file:")) for name in names), names
    text = path.read_text()
    assert "http://" not in text and "https://" not in text


@pytest.mark.browser
def test_match_page_transfer_equals_library(driver, match_page):
    driver.get(match_page.path.as_uri())
    points = np.array(
        [[0.0, 0.0], [199.0, 149.0], [-0.4, 3.3], [199.45, 149.49], [12.3, 77.7]]
        + [[100.5, 0.2], [0.1, 148.9], [57.25, 140.75], [133.33, 66.6], [198.9, 0.6]]
    )
    expected = library_transfer(match_page.flow, points)
    got = np.array(
        driver.execute_script(
            "return arguments[0].map(([x, y]) => window.guidedFlow.transfer(x, y));",
            points.tolist(),
        )
    )
    np.testing.assert_allclose(got, expected, atol=0.01)
    assert np.abs(expected - points).max() > 5  # the flow is far from the identity
    assert_offline(driver, match_page.path)


@pytest.mark.browser
def test_match_page_click_moves_target_marker(driver, match_page):
    driver.get(match_page.path.as_uri())
    source = driver.find_element(By.ID, "source-img")
    width, height = source.size["width"], source.size["height"]
    target = driver.find_element(By.ID, "target-box").size
    assert (height, width) == (360, 480) and (target["height"], target["width"]) == (480, 360)
    for dx, dy in ((-200, -150), (37, 21), (230, 170), (0, 0)):
        ActionChains(driver).move_to_element_with_offset(source, dx, dy).click().perform()
        shown = style_px(driver, "source-marker")
        np.testing.assert_allclose(shown, [width / 2 + dx, height / 2 + dy], atol=1.0)
        point = shown * [SOURCE_SIZE[1] / width, SOURCE_SIZE[0] / height] - 0.5
        match = library_transfer(match_page.flow, point[None])[0]
        scale = [target["width"] / TARGET_SIZE[1], target["height"] / TARGET_SIZE[0]]
        np.testing.assert_allclose(style_px(driver, "target-marker"), (match + 0.5) * scale, atol=1)
    assert driver.find_element(By.ID, "target-marker").is_displayed()


@pytest.mark.browser
def test_match_page_toggles(driver, match_page):
    driver.get(match_page.path.as_uri())
    count = lambda selector: len(driver.find_elements(By.CSS_SELECTOR, selector))
    assert count("#match-lines line") == 0 and count("#source-kps circle") == 0
    assert not driver.find_element(By.ID, "flow-img").is_displayed()
    for toggle in ("toggle-matches", "toggle-flow", "toggle-keypoints"):
        driver.find_element(By.ID, toggle).click()
    assert count("#match-lines line") == match_page.matches
    assert count("#source-kps circle") == count("#target-kps circle") == len(match_page.kps)
    assert driver.find_element(By.ID, "flow-img").is_displayed()
    driver.execute_script(
        "const s = document.getElementById('blend'); s.value = 60;"
        "s.dispatchEvent(new Event('input'));"
    )
    opacity = driver.find_element(By.ID, "warped-img").value_of_css_property("opacity")
    assert float(opacity) == pytest.approx(0.6)


def fake_pairs(count: int, thumbs: list[tuple[str, str]], seed: int = 0) -> list[dict]:
    """``count`` evaluated pairs of two categories, cycling through ``thumbs``."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(count):
        kps = 3 + i % 4
        source_size, target_size = [(150, 200), (120, 90)][i % 2], [(120, 90), (200, 160)][i % 2]
        trg = rng.uniform(0, 1, (kps, 2)) * target_size[::-1]
        hits = [bool(h) for h in rng.uniform(size=kps) < 0.6]
        pairs.append(
            {
                "pair_id": f"pair-{i}",
                "category": ["cat", "dog"][i % 2],
                "pck": float(np.mean(hits)),
                "bound": 20.0,
                "src_kps": (rng.uniform(0, 1, (kps, 2)) * source_size[::-1]).tolist(),
                "pred_kps": (trg + rng.normal(0, 10, (kps, 2))).tolist(),
                "trg_kps": trg.tolist(),
                "hits": hits,
                "source_size": list(source_size),
                "target_size": list(target_size),
                "source_thumb": thumbs[i % len(thumbs)][0],
                "target_thumb": thumbs[i % len(thumbs)][1],
                "difficulty": {"occlusion": i % 3 == 0, "truncation": i % 2},
            }
        )
    return pairs


def fake_metrics(pairs: list[dict]) -> dict:
    """A ``metrics.json`` dict of ``pairs`` (mean PCK overall and per category)."""
    table = {
        name: {"pairs": len(group), "pck@0.1": float(np.mean([p["pck"] for p in group]))}
        for name in ("cat", "dog")
        for group in [[p for p in pairs if p["category"] == name]]
    }
    return {
        "pairs": len(pairs),
        "pck@0.1": float(np.mean([p["pck"] for p in pairs])),
        "per_category": table,
        "per_difficulty": {"occlusion": {"0": table["cat"], "1": table["dog"]}},
    }


def rows(driver) -> list[int]:
    """The pair indices of the table's rows, top to bottom."""
    elements = driver.find_elements(By.CSS_SELECTOR, "tr.pair-row")
    return [int(row.get_attribute("data-index")) for row in elements]


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    """A results folder of five pairs with thumbnails."""
    root = tmp_path_factory.mktemp("results")
    sizes = [((150, 200), (120, 90)), ((120, 90), (200, 160))]
    thumbs = [
        write_pair_thumbnails(root, i, picture(s, 2 * i), picture(t, 2 * i + 1))
        for i, (s, t) in enumerate(sizes)
    ]
    pairs = fake_pairs(5, thumbs)
    write_results_page(root, fake_metrics(pairs), pairs, 0.1, ("occlusion",))
    return SimpleNamespace(root=root, pairs=pairs, thumbs=thumbs)


def test_thumbnails(results_dir):
    assert results_dir.thumbs[0] == ("thumbs/000000_s.jpg", "thumbs/000000_t.jpg")
    with Image.open(results_dir.root / results_dir.thumbs[1][1]) as thumb:
        assert thumb.size == (128, 160)  # 160 x 200 (W x H) -> longest side 160


@pytest.mark.browser
def test_results_page_sort_filter_and_view(driver, results_dir):
    path = results_dir.root / "index.html"
    driver.get(path.as_uri())
    pcks = [pair["pck"] for pair in results_dir.pairs]
    assert rows(driver) == list(range(5))
    assert "dog" in driver.find_element(By.ID, "metrics").text
    driver.find_element(By.ID, "sort-pck").click()
    assert [pcks[i] for i in rows(driver)] == sorted(pcks)
    driver.find_element(By.ID, "sort-pck").click()
    assert [pcks[i] for i in rows(driver)] == sorted(pcks, reverse=True)
    Select(driver.find_element(By.ID, "filter-category")).select_by_value("dog")
    assert sorted(rows(driver)) == [1, 3]
    Select(driver.find_element(By.ID, "filter-category")).select_by_value("")
    Select(driver.find_element(By.ID, "filter-occlusion")).select_by_value("1")
    assert sorted(rows(driver)) == [0, 3]
    Select(driver.find_element(By.ID, "filter-truncation")).select_by_value("0")
    assert rows(driver) == [0]
    driver.find_element(By.CSS_SELECTOR, 'tr.pair-row[data-index="0"]').click()
    pair = results_dir.pairs[0]
    view = driver.find_element(By.ID, "pair-view")
    images = view.find_elements(By.TAG_NAME, "img")
    assert len(images) == 2
    assert all(driver.execute_script("return arguments[0].naturalWidth", i) > 0 for i in images)
    hits = sum(pair["hits"])
    assert len(view.find_elements(By.CSS_SELECTOR, ".hit")) == hits
    assert len(view.find_elements(By.CSS_SELECTOR, ".miss")) == len(pair["hits"]) - hits
    (h, w), shown = pair["target_size"], images[1].size
    scale = THUMB_DISPLAY / max(h, w)
    assert (shown["height"], shown["width"]) == (round(h * scale), round(w * scale))
    rings = view.find_elements(By.CSS_SELECTOR, "circle.gt")
    drawn = [[float(c.get_attribute(k)) for k in ("cx", "cy")] for c in rings]
    size = [shown["width"] / w, shown["height"] / h]
    np.testing.assert_allclose(drawn, (np.array(pair["trg_kps"]) + 0.5) * size, atol=0.05)
    assert_offline(driver, path)


@pytest.mark.browser
def test_results_page_builds_one_page_of_many_pairs(driver, results_dir, tmp_path):
    pairs = fake_pairs(12_234, results_dir.thumbs)
    write_results_page(tmp_path, fake_metrics(pairs), pairs, 0.1)
    driver.get((tmp_path / "index.html").as_uri())
    assert rows(driver) == list(range(PAGE_SIZE))
    assert driver.execute_script("return window.GF_PAIRS.length") == 12_234
    driver.find_element(By.ID, "next-page").click()
    assert rows(driver) == list(range(PAGE_SIZE, 2 * PAGE_SIZE))
    driver.find_element(By.ID, "sort-pck").click()
    assert len(rows(driver)) == PAGE_SIZE
    assert "of 123" in driver.find_element(By.ID, "page-info").text


def test_results_data_are_escaped_for_scripts(results_dir, tmp_path):
    pair = {**results_dir.pairs[0], "pair_id": "</script><!--\u2028", "category": "<b>&"}
    metrics = {"pairs": 1, "pck@0.1": 0.5, "per_category": {"<b>&": {"pairs": 1, "pck@0.1": 0.5}}}
    write_results_page(tmp_path, metrics, [pair], 0.1)
    script = (tmp_path / "pairs.js").read_text()
    assert "<" not in script and "\u2028" not in script
    prefix = "window.GF_PAIRS = "
    assert script.startswith(prefix) and script.endswith(";\n")
    (record,) = json.loads(script[len(prefix) : -2])
    assert (record["pair_id"], record["category"]) == (pair["pair_id"], pair["category"])
    page = (tmp_path / "index.html").read_text()
    assert "<b>&" not in page and "&lt;b&gt;&amp;" in page
