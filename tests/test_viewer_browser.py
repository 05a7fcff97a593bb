"""The viewer in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by Selenium;
nothing downloads a browser) opens generated pages for small Sudoku, maze and ARC datasets with
predictions and checks the DOM: puzzle count, the wrong cell of a known-wrong prediction, the filter
counts, the segment slider, keyboard navigation, search, the ARC task view, no console errors, and a
non-blank screenshot. Skipped, with the reason, where Chromium or its driver is not installed."""
from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

from viewer_helpers import N_SEGMENTS, build_datasets, fake_predictions, split_arrays

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -r requirements-dev.txt)")
pytestmark = pytest.mark.skipif(CHROMIUM is None or DRIVER is None,
                                reason="browser test needs Chromium and its driver: apt-get install chromium chromium-driver")

# Known-wrong predictions per dataset: {row: [cells]} and the (lowest, highest+1) valid token for a wrong value.
WRONG = {"sudoku": ({1: [0], 4: [3, 5]}, (2, 6)), "maze": ({0: [10]}, (1, 6)), "arc": ({0: [0], 2: [1]}, (2, 12))}


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    opts = Options()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900",
                "--allow-file-access-from-files"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, request):
    shared = request.getfixturevalue("shared_data") if (request.config.rootpath.parent / "shared" / "data").is_dir() else None
    return build_datasets(tmp_path_factory.mktemp("browser_data"), shared)


def open_page(driver, path):
    driver.get(path.as_uri())
    deadline = time.time() + 30
    while time.time() < deadline:
        state = driver.execute_script("return document.body.dataset.ready || ''")
        if state:
            assert state == "1", driver.find_element("tag name", "body").text
            return
        time.sleep(0.05)
    raise AssertionError("the viewer did not finish rendering in 30 s")


def shown(driver) -> int:
    return int(driver.find_element("id", "shown-count").get_attribute("data-count"))


def wrong_cells(driver) -> list[int]:
    """Indices (in display order) of the framed cells of the prediction grid."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#grid-pred .cell')).flatMap((c, k) => c.classList.contains('wrong') ? [k] : [])")


def pred_grid_colors(driver) -> list[str]:
    return driver.execute_script("return Array.from(document.querySelectorAll('#grid-pred .cell')).map(c => c.style.background + c.textContent)")


def severe_logs(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


@pytest.mark.parametrize("kind", ["sudoku", "maze", "arc"])
def test_viewer_in_chromium(browser, datasets, tmp_path, kind):
    if kind not in datasets:
        pytest.skip("ARC needs ../shared/data/arc-agi-1")
    import visualize
    data = datasets[kind]
    wrong, vocab = WRONG[kind]
    fake_predictions(data, tmp_path / "predictions.npz", wrong, vocab)
    page = tmp_path / f"{kind}.html"
    visualize.main([f"data_path={data}", f"predictions={tmp_path}", f"out={page}"])
    n = len(split_arrays(data)[0])
    browser.get_log("browser")  # drop earlier pages' messages
    open_page(browser, page)

    assert shown(browser) == n
    assert len(browser.find_elements("css selector", "#cards .card")) == min(n, 60)
    assert browser.find_element("id", "title").text == f"{data.name} / test"

    # A known-wrong prediction: its wrong cell is framed (ARC: cell 0 is the top-left of the cropped grid).
    row, cells = next(iter(wrong.items()))
    browser.find_element("css selector", f'.card[data-item="{row}"]').click()
    assert browser.find_element("id", "detail").get_attribute("data-item") == str(row)
    assert wrong_cells(browser) == cells
    assert f"{len(cells)} wrong" in browser.find_element("css selector", "#detail h2").text

    # The filter changes the count.
    browser.find_element("css selector", '#filters [data-filter="wrong"]').click()
    assert shown(browser) == len(wrong)
    browser.find_element("css selector", '#filters [data-filter="right"]').click()
    assert shown(browser) == n - len(wrong)
    browser.find_element("css selector", '#filters [data-filter="all"]').click()
    assert shown(browser) == n

    # The step slider changes the displayed grid: segment 1 has N_SEGMENTS - 1 more wrong cells.
    browser.find_element("css selector", f'.card[data-item="{row}"]').click()
    slider = browser.find_element("id", "step-slider")
    assert slider.get_attribute("max") == str(N_SEGMENTS) and slider.get_attribute("value") == str(N_SEGMENTS)
    before = pred_grid_colors(browser)
    browser.execute_script("const s = document.getElementById('step-slider'); s.value = 1;"
                           "s.dispatchEvent(new Event('input'))")
    assert pred_grid_colors(browser) != before
    assert len(wrong_cells(browser)) > len(cells)
    assert "segment 1 of 3" in browser.find_element("id", "seg-label").text
    browser.find_element("tag name", "body").send_keys("]")  # keyboard: next segment
    assert "segment 2 of 3" in browser.find_element("id", "seg-label").text

    # Keyboard navigation and search.
    browser.find_element("tag name", "body").send_keys("j")
    assert browser.find_element("id", "detail").get_attribute("data-item") == str(row + 1)
    search = browser.find_element("id", "search")
    search.send_keys(f"#{row}")
    time.sleep(0.4)  # the search box waits 120 ms for typing to pause
    assert shown(browser) >= 1 and browser.find_element("id", "detail").get_attribute("data-item") == str(row)
    search.clear()
    browser.execute_script("document.getElementById('search').dispatchEvent(new Event('input'))")
    time.sleep(0.4)
    assert shown(browser) == n

    if kind == "arc":
        assert len(browser.find_elements("css selector", ".demos .demo")) >= 2
        browser.find_element("css selector", '#views [data-view="tasks"]').click()
        tasks = browser.find_elements("css selector", "#tasks-pane .task")
        assert len(tasks) == 3 and all("pass@1" in t.text for t in tasks)
        browser.find_element("css selector", '#views [data-view="puzzles"]').click()

    shot = tmp_path / f"{kind}.png"
    browser.save_screenshot(str(shot))
    from PIL import Image
    pixels = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 50 and (pixels != 255).any(axis=1).mean() > 0.2  # not blank
    assert severe_logs(browser) == []
