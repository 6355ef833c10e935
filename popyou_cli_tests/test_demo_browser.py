"""`popyou demo` in a real headless Chromium (the system's chromium + chromedriver, driven by Selenium; nothing is
downloaded): type a prompt, move the beta slider, generate, see the images; then the beta video. Screenshots go to
$POPYOU_DEMO_SCREENSHOTS (e.g. docs/, for the README) or to the test's temporary folder.

Without a system Chromium the test skips and says how to enable it; where $POPYOU_REQUIRE_BROWSER is set (.ci/run
sets it after installing Chromium) a missing browser fails the run instead."""
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

WAIT_S = 120


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        why = ("the browser test needs Chromium and its driver from the system's packages: "
               "apt-get install -y chromium chromium-driver (.ci/run does this)")
        if os.environ.get("POPYOU_REQUIRE_BROWSER"):
            pytest.fail(f"$POPYOU_REQUIRE_BROWSER is set but {why}")
        pytest.skip(why)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100",
                "--hide-scrollbars"):
        options.add_argument(arg)
    drv = webdriver.Chrome(service=Service(driver), options=options)  # a chromedriver path: no Selenium Manager
    try:
        yield drv
    finally:
        drv.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("POPYOU_DEMO_SCREENSHOTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _find(drv, css):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, WAIT_S).until(ec.visibility_of_element_located((By.CSS_SELECTOR, css)))


def _wait(drv, script, *args, what=""):
    """Waits until the JavaScript `script` returns something truthy; returns it."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, WAIT_S, poll_frequency=0.1).until(lambda d: d.execute_script(script, *args),
                                                                message=f"waiting for {what}")


def _set_number(drv, css, value):
    """Types a value into one of Gradio's number boxes (slider boxes included) and leaves the field."""
    from selenium.webdriver.common.keys import Keys

    box = _find(drv, css)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def _screenshot(drv, path: Path) -> None:
    """The whole page, not just the window: the viewport is set to the page's height for the shot."""
    height = drv.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]["height"]
    drv.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {"width": 1280, "height": min(int(height) + 16, 2400),
                                                               "deviceScaleFactor": 1, "mobile": False})
    try:
        drv.execute_script("window.scrollTo(0, 0)")
        drv.save_screenshot(str(path))
    finally:
        drv.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape[0] > 500 and pixels.std() > 10, "the screenshot is blank: the page did not render"


IMAGES_READY = """
const imgs = [...document.querySelectorAll('#gallery img')];
return imgs.length >= arguments[0] && imgs.every(i => i.complete && i.naturalWidth > 0) && imgs.length;"""


def test_image_then_video_in_chromium(demo_server, browser, shots):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, _ = demo_server
    drv = browser
    drv.get(url)
    assert "text-to-image pipeline" in _find(drv, "#header").text  # the pipeline's description is in the header

    # empty prompt: a message in the page, and the page keeps working afterwards
    _find(drv, "#generate").click()
    _wait(drv, "return document.body.innerText.includes('type a prompt first')", what="the empty-prompt message")
    _find(drv, "[data-testid=toast-close]").click()

    prompt = _find(drv, "#prompt textarea")
    prompt.send_keys("a wizard funko pop")
    beta = _find(drv, "#beta input[type=range]")  # the slider itself, moved with the keyboard: Home, then 30 steps
    beta.click()
    beta.send_keys(Keys.HOME, *[Keys.ARROW_RIGHT] * 30)
    assert float(_find(drv, "#beta input[type=number]").get_attribute("value")) == pytest.approx(1.5)
    _find(drv, "#seed input, #seed textarea").send_keys("7")
    _set_number(drv, "#n input[type=number]", 2)
    _find(drv, "#generate").click()
    assert _wait(drv, IMAGES_READY, 2, what="two rendered images in the gallery") == 2
    command = _wait(drv, "const c = document.querySelector('#command'); return c && c.innerText.includes('--seed') "
                         "&& c.innerText", what="the reproduce command")
    assert "--beta 1.5" in command and "--seed 7" in command and "--n 2" in command
    _screenshot(drv, shots / "demo-image.png")

    drv.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Beta video')]").click()
    _find(drv, "#v-prompt textarea").send_keys("a wizard funko pop")
    _set_number(drv, "#fps input[type=number]", 2)
    _set_number(drv, "#seconds input[type=number]", 2)
    # the seed box stays empty: a random seed, shown with the result
    _find(drv, "#generate-video").click()
    # the browser decoded the MP4 (readyState >= 2: it has a frame to show) and drew the labelled strip
    _wait(drv, "const v = document.querySelector('#video video'); return v && v.readyState >= 2",
          what="the MP4 playing in the page")
    _wait(drv, "const i = document.querySelector('#strip img'); return i && i.complete && i.naturalWidth > 0",
          what="the labelled strip")
    duration = drv.execute_script("return document.querySelector('#video video').duration")
    assert duration == pytest.approx(2.0, abs=0.6)  # 4 frames at 2 fps
    status = _find(drv, "#video-status").text
    assert "4 frames" in status and re.search(r"seed \d+", status), status
    _screenshot(drv, shots / "demo-video.png")
