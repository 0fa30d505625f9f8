"""The reader study page in a real browser (headless Chromium driven by selenium): a reader answers
every image by keyboard and mouse, reloads halfway without losing anything, exports, and the export
is scored. Skips, saying why, where Debian's chromium and chromium-driver are not installed (.ci/run
installs them). READER_SCREENS=<folder> keeps the screenshots."""

from __future__ import annotations

import csv
import os
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.reader_study_inputs import make_study_inputs, study_config
from workflow_scripts.reader_study import score as score_stage
from workflow_scripts.reader_study.build import build

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--window-size=1280,860"]
FINDING_KEYS = "abcdfghijklmopqtuvwxyz"  # as in page.html

pytestmark = pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
                                reason="Chromium not installed: apt-get install chromium chromium-driver (.ci/run does)")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed: pip install -r envs/requirements-test.txt")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402


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


def shown_id(driver) -> str:
    return driver.find_element(By.ID, "image").get_attribute("data-id")


def answer_by_keyboard(driver, row, vocabulary: list[str]) -> None:
    body = driver.find_element(By.TAG_NAME, "body")
    body.send_keys("s" if row.source == "synthetic" else "r")
    body.send_keys(str(row.confidence))
    for label in row.labels.split("|"):
        body.send_keys(FINDING_KEYS[vocabulary.index(label)])
    body.send_keys(Keys.ENTER)


def answer_by_mouse(driver, row) -> None:
    driver.find_element(By.ID, f"answer-{row.source}").click()
    driver.find_element(By.CSS_SELECTOR, f"#confidence button[data-value='{row.confidence}']").click()
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


def test_a_reader_answers_every_image_reloads_exports_and_is_scored(browser, tmp_path: Path, capsys) -> None:
    data, synthetic = make_study_inputs(tmp_path)
    study = tmp_path / "study"
    build(study_config(), data, synthetic, study)
    key = pd.read_csv(study / "key.csv", dtype=str, keep_default_na=False).set_index("image_id")
    key["confidence"] = [1 + index % 5 for index in range(len(key))]
    vocabulary = score_stage.read_study(study / "key.csv")[1]["findings"]

    browser.get((study / "index.html").as_uri())
    name = browser.find_element(By.ID, "reader-name")
    assert name.is_displayed(), "the page asks for the reader's name first"
    name.send_keys('Dr "A", Reader' + Keys.ENTER)
    screenshot(browser, tmp_path, "reader-study-first-image")

    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys(Keys.ENTER)  # nothing answered: the page says what is missing and stays
    assert "real or synthetic" in browser.find_element(By.ID, "hint").text and shown_id(browser) == key.index[0]
    body.send_keys("+")
    assert "scale(1.5)" in browser.find_element(By.ID, "image").get_attribute("style")
    browser.find_element(By.ID, "zoom-reset").click()

    half = len(key) // 2
    for position in range(len(key)):
        if position == half:
            saved = browser.execute_script("return localStorage.getItem(arguments[0])", "cxr-reader-study:" + key.index[0][:8])
            screenshot(browser, tmp_path, "reader-study-halfway")
            browser.refresh()
            assert not browser.find_element(By.ID, "reader-name").is_displayed(), "the name is asked once"
            assert browser.execute_script("return localStorage.getItem(arguments[0])",
                                          "cxr-reader-study:" + key.index[0][:8]) == saved
            assert f"{half} answered" in browser.find_element(By.ID, "count").text
            assert shown_id(browser) == key.index[half], "the reload resumes where the reader was"
        row = key.loc[shown_id(browser)]
        assert shown_id(browser) == key.index[position]
        if position % 2:
            answer_by_mouse(browser, row)
        else:
            answer_by_keyboard(browser, row, vocabulary)

    assert browser.find_element(By.ID, "done").is_displayed()
    assert f"{len(key)} answered" in browser.find_element(By.ID, "count").text
    assert browser.find_element(By.ID, "progress").get_attribute("style").replace(" ", "").startswith("width:100%")
    assert "correct" not in browser.find_element(By.TAG_NAME, "body").text.lower(), "no feedback on correctness"
    screenshot(browser, tmp_path, "reader-study-done")
    browser.find_element(By.ID, "export").click()
    export = wait_for_download(tmp_path / "downloads")
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == [], errors
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0, "the page fetched something"

    with open(export, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["reader", "image_id", "answer", "confidence", "findings"]
    assert len(rows) == len(key) + 1 and {row[0] for row in rows[1:]} == {'Dr "A", Reader'}
    answers = tmp_path / "answers"
    answers.mkdir()
    shutil.copy(export, answers / export.name)
    assert score_stage.main(["--key", str(study / "key.csv"), "--answers-dir", str(answers), "--out-dir", str(study),
                             "--bootstrap-samples", "200"]) == 0
    scores = pd.read_csv(study / "scores.csv").set_index("reader")
    reader = scores.loc['Dr "A", Reader']
    assert reader["accuracy"] == 1.0 and reader["n"] == (key["repeat_of"] == "").sum() and reader["consistency"] == 1.0
    assert reader["real_marked_nodule"] == 1.0 and reader["synthetic_marked_no_finding"] == 1.0
