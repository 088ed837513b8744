"""The review page in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium):
load it with the token in the URL fragment, navigate with the keyboard, mark images, check review.json,
filter by class, and save a screenshot that must not be blank.

`make test` installs Chromium first where it is missing (the Makefile's `browser` target); without a
browser this test FAILS rather than skips, so CI cannot pass without running it. Set
WSCLIP_REVIEW_SCREENSHOT=path to keep a copy of the screenshot.
"""

import json
import os
import shutil
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from review_helpers import REVIEW_TOKEN, start_review


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail("the review page's browser test needs Chromium and chromedriver: `make browser` installs them "
                    "(apt-get install chromium chromium-driver)", pytrace=False)
    return chromium, driver


@pytest.fixture()
def browser():
    from selenium import webdriver  # the dev extra; a missing one fails the test like a missing browser
    from selenium.webdriver.chrome.service import Service

    chromium, driver = _browser_paths()
    os.environ.setdefault("SE_AVOID_STATS", "true")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,900", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    d.set_page_load_timeout(60)
    try:
        yield d
    finally:
        d.quit()


def _wait(pred, timeout=60.0, what="condition"):
    """pred() once true; an element the page re-rendered meanwhile (stale) counts as not yet."""
    from selenium.common.exceptions import StaleElementReferenceException

    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        try:
            v = pred()
        except StaleElementReferenceException:
            v = None
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_review_page_in_headless_chromium(labelled_synth, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    out = labelled_synth["out"]
    marks_file = out / "review.json"
    marks_file.unlink(missing_ok=True)
    proc, url = start_review(out, "--gt", str(labelled_synth["world"] / "SegmentationClass"))
    try:
        api = httpx.get(f"{url}/review/api/images", headers={"Authorization": f"Bearer {REVIEW_TOKEN}"}, timeout=60)
        worst_first = [im["id"] for im in sorted(api.json()["images"], key=lambda im: (im["score"], im["id"]))]
        browser.get(f"{url}/review/#token={REVIEW_TOKEN}")
        _wait(lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1", what="page ready")
        assert "token" not in browser.current_url  # the fragment is dropped once read

        def current():
            return browser.execute_script("return document.getElementById('image-id').textContent")

        def rows():  # read in one script call: the list re-renders between separate element reads
            return browser.execute_script(
                "return [...document.querySelectorAll('#list div')].map(d => d.getAttribute('data-id'))")

        def images_loaded():
            return browser.execute_script(
                "return [...document.querySelectorAll('#view img')].every(i => i.complete && i.naturalWidth > 0)"
                " && document.querySelectorAll('#cams img').length > 0")

        assert current() == worst_first[0]  # sorted by score, worst first
        assert rows() == worst_first
        _wait(images_loaded, what="photo, overlay and CAM heatmaps")
        body = browser.find_element(By.TAG_NAME, "body")
        body.send_keys(Keys.ARROW_RIGHT)
        _wait(lambda: current() == worst_first[1], what="next image")
        body.send_keys("k")
        _wait(lambda: current() == worst_first[0], what="previous image")
        body.send_keys("r")  # reject the worst; the page moves on to the next
        _wait(lambda: current() == worst_first[1], what="move after marking")
        body.send_keys("a")
        _wait(lambda: marks_file.is_file() and len(json.loads(marks_file.read_text())["marks"]) == 2, what="marks file")
        marks = {k: v["status"] for k, v in json.loads(marks_file.read_text())["marks"].items()}
        assert marks == {worst_first[0]: "rejected", worst_first[1]: "accepted"}
        _wait(lambda: "rejected" in browser.execute_script(
            "return document.querySelector(`#list div[data-id='${arguments[0]}']`).className", worst_first[0]),
            what="rejected row marked")
        # filter by a class present in some images: only those are listed
        meta = httpx.get(f"{url}/review/api/images", headers={"Authorization": f"Bearer {REVIEW_TOKEN}"}, timeout=60)
        per_class = {}
        for im in meta.json()["images"]:
            for k in im["classes"]:
                per_class.setdefault(k, set()).add(im["id"])
        k, ids = min(per_class.items(), key=lambda kv: (len(kv[1]), kv[0]))
        Select(browser.find_element(By.ID, "class-filter")).select_by_value(str(k))
        _wait(lambda: set(rows()) == ids, what="class filter")
        Select(browser.find_element(By.ID, "class-filter")).select_by_value("")
        _wait(lambda: len(rows()) == len(worst_first), what="filter off")
        here = worst_first.index(current())  # the filter kept the image it showed, or went to its top
        nxt = here + 1 if here + 1 < len(worst_first) else here - 1
        browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT if nxt > here else Keys.ARROW_LEFT)
        _wait(lambda: current() == worst_first[nxt], what="navigate after filtering")
        _wait(images_loaded, what="images of the shown mask")
        shot = tmp_path / "review.png"
        assert browser.save_screenshot(str(shot))
    finally:
        proc.terminate()
        proc.wait(30)
        marks_file.unlink(missing_ok=True)
    check_screenshot(shot)
    if os.environ.get("WSCLIP_REVIEW_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["WSCLIP_REVIEW_SCREENSHOT"])


def check_screenshot(path) -> None:
    """A real page, not a blank or single-colour one: spread of pixel values and many distinct colours."""
    px = np.asarray(Image.open(path).convert("RGB"))
    assert px.shape[0] >= 600 and px.shape[1] >= 1000
    assert px.std() > 20, f"screenshot looks blank (pixel std {px.std():.1f})"
    colours = np.unique(px.reshape(-1, 3), axis=0)
    assert len(colours) > 200, f"only {len(colours)} colours in the screenshot"


def test_make_test_installs_the_browser_first():
    """`make test` depends on the target that installs Chromium where it is missing (so CI runs the test above)."""
    from pathlib import Path

    make = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    test_line = next(ln for ln in make.splitlines() if ln.startswith("test:"))
    assert "browser" in test_line.split(":", 1)[1].split()
    recipe = make.split("\nbrowser:", 1)[1].split("\n\n", 1)[0]
    assert "apt-get install" in recipe and "chromium-driver" in recipe and "command -v chromedriver" in recipe
