"""Screenshots of the two interactive pages for the README, in headless Chromium.

    python benchmarks/gallery.py --match-dir outputs/gallery/match --test-dir outputs/demo

``--match-dir`` is a folder written by ``guided-flow match`` (its ``index.html``),
``--test-dir`` one written by ``guided-flow test`` (``make demo`` writes ``outputs/demo``).
Writes ``docs/gallery/match_page.png`` (a point of the source and its match on the target) and
``docs/gallery/test_page.png`` (the results table with the first pair opened).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By

GALLERY = Path(__file__).resolve().parents[1] / "docs" / "gallery"


def browser() -> webdriver.Chrome:
    """Headless Chromium (Debian's ``chromium`` and ``chromium-driver``)."""
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.add_argument("--window-size=1100,820")
    options.binary_location = "/usr/bin/chromium"
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--match-dir", type=Path, required=True)
    parser.add_argument("--test-dir", type=Path, required=True)
    args = parser.parse_args()
    GALLERY.mkdir(parents=True, exist_ok=True)
    driver = browser()
    try:
        driver.get((args.match_dir / "index.html").resolve().as_uri())
        driver.find_element(By.ID, "toggle-matches").click()
        source = driver.find_element(By.ID, "source-img")
        ActionChains(driver).move_to_element_with_offset(source, 30, -60).click().perform()
        driver.save_screenshot(str(GALLERY / "match_page.png"))
        driver.get((args.test_dir / "index.html").resolve().as_uri())
        driver.find_element(By.ID, "sort-pck").click()
        driver.find_elements(By.CSS_SELECTOR, "tr.pair-row")[0].click()
        driver.save_screenshot(str(GALLERY / "test_page.png"))
    finally:
        driver.quit()
    print(f"wrote {GALLERY / 'match_page.png'} and {GALLERY / 'test_page.png'}")


if __name__ == "__main__":
    main()
