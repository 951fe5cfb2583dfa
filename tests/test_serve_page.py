"""The page at / as a person uses it: headless Chromium types a sentence, clicks Translate and
reads the translation nmt translate gives. Skips (saying why) where no Chromium can be had.

``NMT_SCREENSHOTS=DIR`` keeps the screenshots there."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")

from conftest import make_pairs  # noqa: E402
from serving import Served  # noqa: E402

from nmt.rundir import load_run  # noqa: E402
from nmt.translate import translate  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)


def _first(names) -> str | None:
    return next((found for found in map(shutil.which, names) if found), None)


@pytest.fixture(scope="module")
def browser():
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service

    binary, driver = _first(BROWSERS), _first(DRIVERS)
    if binary is None or driver is None:
        pytest.skip("no Chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1000,800"):
        options.add_argument(flag)
    try:
        chrome = webdriver.Chrome(options=options, service=Service(driver))
    except WebDriverException as e:
        pytest.skip(f"Chromium does not start here: {e.msg}")
    yield chrome
    chrome.quit()


@pytest.fixture(scope="module")
def server(trained_run: Path, tmp_path_factory):
    served = Served(tmp_path_factory.mktemp("page"), "-m", str(trained_run))
    yield served
    served.stop()


def _screenshot(browser, tmp_path: Path, name: str) -> None:
    where = Path(os.environ.get("NMT_SCREENSHOTS") or tmp_path)
    where.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(where / f"{name}.png"))


def test_page_translates_what_is_typed_as_nmt_translate_does(browser, server, trained_run, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    sentence = make_pairs(1, seed=41)[0][0]
    cfg, tokenizer, model = load_run(trained_run, int8=False)
    search = dataclasses.replace(cfg.search, sampling="none", n_best=3)
    want = translate(model, tokenizer, [sentence], search)[0].texts

    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 20)
    wait.until(lambda b: Select(b.find_element(By.ID, "pair")).options)
    pair = Select(browser.find_element(By.ID, "pair"))
    assert [o.text for o in pair.options] == ["English \u2192 German"]
    browser.find_element(By.ID, "source").send_keys(sentence)
    Select(browser.find_element(By.ID, "alternatives")).select_by_value("2")
    browser.find_element(By.ID, "translate").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "translation"), want[0]))
    assert browser.find_element(By.ID, "translation").text == want[0]
    alternatives = [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#alternatives-list li")]
    assert alternatives == want[1:3]
    _screenshot(browser, tmp_path, "translated")


def test_page_shows_the_servers_error(browser, server, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#pair option"))
    browser.find_element(By.ID, "source").clear()
    browser.find_element(By.ID, "translate").click()  # nothing typed: the server's 400 is shown
    WebDriverWait(browser, 20).until(ec.text_to_be_present_in_element((By.ID, "error"), "missing q"))
    assert browser.find_element(By.ID, "translation").text == ""
    _screenshot(browser, tmp_path, "error")
