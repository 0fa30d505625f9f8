"""The reader study page in a real browser (headless Chromium driven by selenium), at 1024 x 768: a
reader uses the viewer (window/level by keys and by drag, invert, presets, 1:1, loupe, zoom at the
cursor, full screen), answers every image by keyboard and mouse with reasons, locations and quality,
reloads halfway, uses the overview grid and flags, switches reader, exports (with reading times),
and the export is scored. Skips, saying why, where Debian's chromium and chromium-driver are not
installed (.ci/run installs them). READER_SCREENS=<folder> keeps the screenshots."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.reader_study_inputs import build_study, make_study_inputs, study_config
from workflow_scripts.reader_study import score as score_stage

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--window-size=1024,768", "--force-device-scale-factor=1"]
FINDING_KEYS = "abcdhjkmoqtuvxy"  # as in page.html

pytestmark = pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
                                reason="Chromium not installed: apt-get install chromium chromium-driver (.ci/run does)")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed: pip install -r envs/requirements-test.txt")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture
def browser(tmp_path: Path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(tmp_path / "downloads"),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path / "downloads")})
    yield driver
    driver.quit()


def screenshot(driver, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    driver.save_screenshot(str(path))
    if os.environ.get("READER_SCREENS"):
        Path(os.environ["READER_SCREENS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(os.environ["READER_SCREENS"]) / path.name)


def shown_id(driver, expected: str | None = None) -> str:
    """The id of the image drawn on the canvas (waiting for `expected` to be drawn, when given)."""
    if expected is not None:
        WebDriverWait(driver, 5).until(lambda d: d.find_element(By.ID, "image").get_attribute("data-id") == expected)
    return driver.find_element(By.ID, "image").get_attribute("data-id")


def drawn(driver) -> tuple[int, int]:
    """The sum of the gray values drawn on the film, and its number of pixels."""
    return tuple(driver.execute_script(
        "const c = document.getElementById('image'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let sum = 0; for (let i = 0; i < d.length; i += 4) sum += d[i]; return [sum, c.width * c.height];"))


def readout(driver) -> tuple[int, int]:
    text = driver.find_element(By.ID, "wl-readout").text
    width, level = text.split("W ")[1].split(" L ")
    return int(width), int(level.split()[0])


def rect(driver, element_id: str) -> dict:
    return driver.execute_script("return document.getElementById(arguments[0]).getBoundingClientRect().toJSON()", element_id)


def answer_by_keyboard(driver, row, vocabulary: list[str]) -> None:
    body = driver.find_element(By.TAG_NAME, "body")
    body.send_keys("s" if row.source == "synthetic" else "r")
    body.send_keys(str(row.confidence))
    for label in row.labels.split("|"):
        body.send_keys(FINDING_KEYS[vocabulary.index(label)])
    body.send_keys(Keys.ENTER)


def answer_by_mouse(driver, row) -> None:
    """With the mouse, and the optional parts too: on a synthetic image a reason and a double-click
    where the reader sees it; a quality rating (non-diagnostic on real films)."""
    driver.find_element(By.ID, f"answer-{row.source}").click()
    driver.find_element(By.CSS_SELECTOR, f"#confidence button[data-value='{row.confidence}']").click()
    if row.source == "synthetic":
        driver.find_element(By.CSS_SELECTOR, "#reasons button[data-value='texture or noise']").click()
        ActionChains(driver).move_to_element_with_offset(driver.find_element(By.ID, "image"), 40, -60).double_click().perform()
    driver.find_element(By.CSS_SELECTOR, f"#quality button[data-value='{'good' if row.source == 'synthetic' else 'non-diagnostic'}']").click()
    for label in row.labels.split("|"):
        driver.find_element(By.CSS_SELECTOR, f"#findings input[value='{label}']").click()
    driver.find_element(By.ID, "next").click()


def wait_for_download(folder: Path, timeout: float = 20) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [path for path in folder.glob("*.csv")] if folder.is_dir() else []
        if done and not list(folder.glob("*.crdownload")):
            return done[0]
        time.sleep(0.2)
    raise AssertionError(f"no export arrived in {folder}")




@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, list[str]]:
    root = tmp_path_factory.mktemp("browser")
    data, synthetic = make_study_inputs(root)
    build_study(study_config(), data, synthetic, root / "study")
    key = pd.read_csv(root / "study" / "key" / "key.csv", dtype=str, keep_default_na=False).set_index("image_id")
    key["confidence"] = [1 + index % 5 for index in range(len(key))]
    vocabulary = score_stage.read_study(root / "study" / "key" / "key.csv")[1]["findings"]
    return root / "study", key, vocabulary


def start(browser, study: Path, name: str) -> None:
    browser.get((study / "page" / "index.html").as_uri())
    field = browser.find_element(By.ID, "reader-name")
    assert field.is_displayed(), "the page asks for the reader's name first"
    field.send_keys(name + Keys.ENTER)


@pytest.mark.slow  # the full suite's (the quick tier stays under 3 minutes)
def test_the_viewer_has_what_a_radiologist_expects(browser, study, tmp_path: Path) -> None:
    folder, key, _ = study
    start(browser, folder, "viewer")
    body = browser.find_element(By.TAG_NAME, "body")
    shown_id(browser, key.index[0])
    film = rect(browser, "image")
    # item 20: at 1024 x 768 no control covers the film
    for element in browser.find_elements(By.CSS_SELECTOR, "button, select"):
        if element.is_displayed():
            box = element.rect
            apart = (box["x"] + box["width"] <= film["left"] or box["x"] >= film["right"]
                     or box["y"] + box["height"] <= film["top"] or box["y"] >= film["bottom"])
            assert apart, f"{element.get_attribute('id') or element.text} covers the film"
    screenshot(browser, tmp_path, "reader-study-1024x768")

    original, count = drawn(browser)
    body.send_keys("i")  # invert: every value v becomes 255 - v
    assert drawn(browser) == (255 * count - original, count)
    body.send_keys("i" + "[[")  # window narrower by key: more contrast
    assert readout(browser) == (163, 128) and drawn(browser)[0] != original
    body.send_keys("w")
    assert readout(browser) == (255, 128) and drawn(browser)[0] == original
    ActionChains(browser).key_down(Keys.SHIFT).move_to_element(browser.find_element(By.ID, "image")).click_and_hold() \
        .move_by_offset(-100, 30).release().key_up(Keys.SHIFT).perform()  # window by drag: narrower, darker
    assert readout(browser) == (155, 158)
    body.send_keys("p")  # presets cycle
    assert readout(browser) == (160, 100)
    browser.find_element(By.ID, "loupe-toggle").click()
    ActionChains(browser).move_to_element_with_offset(browser.find_element(By.ID, "image"), 30, 30).perform()
    assert browser.find_element(By.ID, "loupe").is_displayed()
    screenshot(browser, tmp_path, "reader-study-window-loupe")
    body.send_keys("lw")
    assert not browser.find_element(By.ID, "loupe").is_displayed()

    # wheel zoom keeps the point under the cursor where it is
    at = (film["left"] + film["width"] * 0.8, film["top"] + film["height"] * 0.3)
    under = ("const r = document.getElementById('image').getBoundingClientRect();"
             "return [(arguments[0] - r.left) / r.width, (arguments[1] - r.top) / r.height];")
    before = browser.execute_script(under, *at)
    browser.execute_script("document.getElementById('viewer').dispatchEvent(new WheelEvent('wheel', {deltaY: -100, clientX: arguments[0], "
                           "clientY: arguments[1], bubbles: true, cancelable: true}))", *at)
    assert rect(browser, "image")["width"] == pytest.approx(film["width"] * 1.2, rel=1e-3)
    assert browser.execute_script(under, *at) == pytest.approx(before, abs=1e-3)
    body.send_keys("z")  # 1:1: one image pixel per screen pixel
    assert rect(browser, "image")["width"] == pytest.approx(32, abs=0.5)
    body.send_keys("0f")  # full screen: the sidebar and header go, the film grows
    assert not browser.find_element(By.TAG_NAME, "aside").is_displayed()
    time.sleep(0.3)  # the browser's own full screen too (headless: its 800 x 600 screen): the film takes the window's width
    width = browser.execute_script("return window.innerWidth")
    assert rect(browser, "viewer")["width"] == width and not browser.find_element(By.TAG_NAME, "header").is_displayed()
    screenshot(browser, tmp_path, "reader-study-full-screen")
    body.send_keys(Keys.ESCAPE)
    assert browser.find_element(By.TAG_NAME, "aside").is_displayed()
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == [], errors


@pytest.mark.slow  # the page driven end to end in Chromium; the quick tier keeps the viewer's check
def test_a_reader_answers_every_image_reloads_switches_exports_and_is_scored(browser, study, tmp_path: Path, capsys) -> None:
    folder, key, vocabulary = study
    name = 'Dr "A", Reader'
    start(browser, folder, name)
    body = browser.find_element(By.TAG_NAME, "body")
    shown_id(browser, key.index[0])
    body.send_keys(Keys.ENTER)  # nothing answered: the page says what is missing and stays
    assert "real or synthetic" in browser.find_element(By.ID, "hint").text and shown_id(browser) == key.index[0]
    storage = "return localStorage.getItem(arguments[0])"
    half = len(key) // 2
    for position in range(len(key)):
        if position == half:
            saved = browser.execute_script(storage, "cxr-reader-study:" + key.index[0][:8])
            browser.refresh()
            body = browser.find_element(By.TAG_NAME, "body")
            assert not browser.find_element(By.ID, "reader-name").is_displayed(), "the name is asked once"
            before, after = (json.loads(text)["readers"][name]["answers"] for text in
                             (saved, browser.execute_script(storage, "cxr-reader-study:" + key.index[0][:8])))
            assert {image: answer for image, answer in after.items() if answer["answer"]} == \
                {image: answer for image, answer in before.items() if answer["answer"]}, "the reload lost answers"
            assert f"{half} answered" in browser.find_element(By.ID, "count").text
        row = key.loc[shown_id(browser, key.index[position])]
        if position % 2:
            answer_by_mouse(browser, row)
        else:
            answer_by_keyboard(browser, row, vocabulary)
        if position == 3:
            body.send_keys(Keys.ARROW_LEFT)
            shown_id(browser, key.index[3])
            body.send_keys("n" + Keys.ARROW_RIGHT)  # flag image 4 for review

    assert browser.find_element(By.ID, "done").is_displayed()
    assert "correct" not in body.text.lower(), "no feedback on correctness"
    body.send_keys("g")  # the overview: every image, answered and flagged marked; a click jumps
    cells = browser.find_elements(By.CSS_SELECTOR, "#grid-cells .cell")
    assert len(cells) == len(key) and all("answered" in cell.get_attribute("class") for cell in cells)
    assert [index for index, cell in enumerate(cells) if "flagged" in cell.get_attribute("class")] == [3]
    screenshot(browser, tmp_path, "reader-study-overview")
    cells[5].click()
    shown_id(browser, key.index[5])
    assert not browser.find_element(By.ID, "grid").is_displayed() and "Image 6 of" in browser.find_element(By.ID, "count").text
    screenshot(browser, tmp_path, "reader-study-done")  # image 6: a synthetic answer with its reason and mark

    browser.find_element(By.ID, "export").click()
    export = wait_for_download(tmp_path / "downloads")
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0, "the page fetched something"
    answers = pd.read_csv(export, dtype=str, keep_default_na=False)
    assert list(answers.columns) == ["reader", "image_id", "answer", "confidence", "findings", "quality", "reason", "x", "y", "seconds"]
    assert len(answers) == len(key) and set(answers["reader"]) == {name}
    assert (answers["seconds"].astype(float) > 0).all(), "reading time per image"
    marked = answers[answers["reason"] != ""]
    assert len(marked) and set(marked["reason"]) == {"texture or noise"} and (marked["x"].astype(float).between(0, 1)).all()
    assert set(answers.loc[answers["answer"] == "real", "reason"]) == {""}

    # another reader on this computer starts empty; the first one comes back by name, in any case
    browser.find_element(By.ID, "switch-reader").click()
    field = browser.find_element(By.ID, "reader-name")
    field.clear()
    field.send_keys("Dr B" + Keys.ENTER)
    assert "0 answered" in browser.find_element(By.ID, "count").text and "Dr B" in browser.find_element(By.ID, "reader-label").text
    browser.find_element(By.ID, "switch-reader").click()
    field.clear()
    field.send_keys("Dr B")
    browser.find_element(By.ID, "reader-reset").click()
    browser.find_element(By.ID, "reader-reset").click()  # the second click deletes
    assert [button.text for button in browser.find_elements(By.CSS_SELECTOR, "#known-readers button")] == [name]
    field.clear()
    field.send_keys('dr "a",   reader' + Keys.ENTER)
    assert f"{len(key)} answered" in browser.find_element(By.ID, "count").text and name in browser.find_element(By.ID, "reader-label").text
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == [], errors

    scored = tmp_path / "answers"
    scored.mkdir()
    shutil.copy(export, scored / export.name)
    assert score_stage.main(["--key", str(folder / "key" / "key.csv"), "--answers-dir", str(scored), "--out-dir", str(tmp_path),
                             "--bootstrap-samples", "100"]) == 0
    reader = pd.read_csv(tmp_path / "scores.csv").set_index("reader").loc[name]
    assert reader["accuracy"] == 1.0 and reader["n"] == (key["repeat_of"] == "").sum() and reader["consistency"] == 1.0
    assert reader["real_marked_nodule"] == 1.0 and reader["synthetic_marked_no_finding"] == 1.0
    assert reader["median_seconds"] > 0 and 0 < reader["real_non_diagnostic"] <= 1 and reader["synthetic_non_diagnostic"] == 0
