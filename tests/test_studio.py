"""`pti studio` in a real browser: Debian's Chromium, headless, driven through its chromedriver by Selenium.

The studio runs as the installed console script on a tiny identity the test makes. Moving a slider with
the keyboard must change the edited image, and the image must equal, pixel for pixel, what `pti render`
writes for the edit string the page shows (both render the same batch through the same backend).
Skips, with the reason, where Chromium, chromedriver, Selenium or the studio extra is missing
(install: apt-get install chromium chromium-driver; pip install -e '.[test]').
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import urllib.request

import numpy as np
import pytest
import torch
from PIL import Image

from clirun import env_with, run_pti, start_pti, wait_until
from helpers import tuned_tiny
from pti.engine.checkpoint import generator_hash
from pti.engine.identity import Identity

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
    HAVE_SERVER = True
except ImportError:
    HAVE_SERVER = False
try:
    import selenium  # noqa: F401
    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

needs_server = pytest.mark.skipif(not HAVE_SERVER, reason="the studio extra is not installed (pip install 'pti[studio]')")
needs_browser = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER and HAVE_SELENIUM),
                                   reason="no Chromium + chromedriver + selenium (apt-get install chromium chromium-driver)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    """A tuned tiny identity with its aligned photo beside it, and `pti studio` serving it."""
    if not HAVE_SERVER:
        pytest.skip("the studio extra is not installed (pip install 'pti[studio]')")
    tmp = tmp_path_factory.mktemp("studio")
    base, G, pivot = tuned_tiny()
    ident = Identity.from_tuning(base, G, pivot, generator_hash(base), "builtin:tiny").save(tmp / "person.pti")
    (tmp / "person").mkdir()
    with torch.no_grad():
        photo = base.synthesis(pivot, noise_mode="const", force_fp32=True)[0]
    Image.fromarray(((photo.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()).save(tmp / "person" / "aligned.png")
    port = _free_port()
    env = env_with(PTI_HOME=str(tmp / "home"))
    proc = start_pti("studio", ident, "--port", port, "--backend", "torch", "--components", "4", "--device", "cpu", env=env)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    wait_until(up, proc, timeout=120, what="the studio to listen")
    yield dict(url=url, ident=ident, tmp=tmp, env=env, proc=proc)
    proc.terminate()
    proc.communicate(timeout=60)


def _post(url: str, payload) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@needs_server
def test_bad_requests_get_one_line_and_the_server_keeps_running(studio):
    url = studio["url"] + "/api/render"
    for payload, message in (({"identity": 7}, "no identity number 7"),
                             ({"identity": 0, "moves": [{"id": "../../etc/passwd", "value": 1}]}, "no direction"),
                             ({"identity": 0, "moves": [{"id": "pc0", "value": 1, "layers": [0, 99]}]}, "outside 0-9"),
                             ("not a dict", "")):
        status, data = _post(url, payload)
        assert status >= 400 and message in data["error"] and "\n" not in data["error"]
    status, data = _post(url, {"identity": 0, "moves": [{"id": "pc1", "value": 1.5}]})
    assert status == 200 and data["edits"][0].endswith("ganspace.pt:1=+1.50@0-9")
    assert studio["proc"].poll() is None


@needs_server
def test_studio_only_serves_what_it_was_given(studio):
    with urllib.request.urlopen(studio["url"] + "/api/identities", timeout=30) as r:
        assert [i["name"] for i in json.loads(r.read())["identities"]] == ["person"]
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(studio["url"] + "/api/identity/0/..%2F..%2Fperson.pti.png", timeout=30)


@needs_server
@needs_browser
def test_moving_a_slider_renders_what_pti_render_renders(studio, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(studio["url"])
        wait = WebDriverWait(driver, 120)
        edited = driver.find_element(By.ID, "edited")
        wait.until(lambda d: int(edited.get_attribute("data-version")) >= 1)
        first = edited.get_attribute("src")
        assert driver.find_element(By.ID, "input").get_attribute("src").endswith("/api/identity/0/input.png")
        slider = driver.find_element(By.ID, "slider-pc0")
        slider.click()
        for _ in range(12):
            slider.send_keys(Keys.ARROW_RIGHT)  # a person at the keyboard: +0.05 per key
        value = float(slider.get_attribute("value"))
        expected = f"={value:+.2f}@0-9"
        wait.until(lambda d: (edited.get_attribute("data-edits") or "").endswith(expected))
        wait.until(lambda d: edited.get_attribute("src") != first)
        shown = base64.b64decode(edited.get_attribute("src").split(",", 1)[1])
        edit = edited.get_attribute("data-edits")
        assert "ganspace.pt:0=" in edit and driver.find_element(By.ID, "command").text.endswith(edit)
        driver.save_screenshot(str(tmp_path / "studio.png"))
        # the page's edit string through the command line: the same pixels
        p = run_pti("render", studio["ident"], "--edit", edit, "-o", tmp_path / "render", "--device", "cpu", env=studio["env"])
        assert p.returncode == 0, p.stderr
        (png,) = [f for f in (tmp_path / "render").glob("*.png")]
        assert np.array_equal(_png(shown), np.asarray(Image.open(png).convert("RGB")))
        with urllib.request.urlopen(studio["url"] + "/api/identity/0/reconstruction.png", timeout=30) as r:
            assert np.abs(_png(shown).astype(int) - _png(r.read()).astype(int)).max() > 10  # the edit changed it
        # a bad layer range: a message on the page, and the page keeps working
        last = driver.find_elements(By.CSS_SELECTOR, "#sliders input[type=number]")[1]
        last.clear()
        last.send_keys("99", Keys.TAB)
        wait.until(lambda d: "outside 0-9" in d.find_element(By.ID, "message").text)
        last.clear()
        last.send_keys("9", Keys.TAB)
        wait.until(lambda d: d.find_element(By.ID, "message").text == "")
        # save and sweep
        driver.find_element(By.ID, "save").click()
        wait.until(lambda d: "saved" in d.find_element(By.ID, "status").text)
        saved = sorted((studio["tmp"] / "person" / "studio").iterdir())
        assert [p.suffix for p in saved] == [".png", ".txt"] and edit in saved[1].read_text()
        driver.find_element(By.ID, "sweep").click()
        wait.until(lambda d: d.find_element(By.ID, "download").get_attribute("href"))
        assert driver.find_element(By.ID, "sweep-figure").is_displayed()
        driver.save_screenshot(str(tmp_path / "studio.png"))
    finally:
        driver.quit()
    assert studio["proc"].poll() is None


def test_without_the_extra_it_says_how_to_get_it(tmp_path):
    if HAVE_SERVER:
        pytest.skip("the studio extra is installed here; this checks the message where it is not")
    p = run_pti("studio", tmp_path)
    assert p.returncode == 1 and "pip install 'pti[studio]'" in p.stderr
