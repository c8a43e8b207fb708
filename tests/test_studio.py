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
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from clirun import env_with, run_pti
from helpers import tuned_tiny
from pti.engine.checkpoint import generator_hash
from pti.engine.identity import Identity
from studiorun import start_studio

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

needs_server = pytest.mark.skipif(
    not HAVE_SERVER, reason="the studio extra is not installed (pip install 'pti[studio]')"
)
needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER and HAVE_SELENIUM),
    reason="no Chromium + chromedriver + selenium (apt-get install chromium chromium-driver)",
)


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
    Image.fromarray(((photo.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()).save(
        tmp / "person" / "aligned.png"
    )
    server = start_studio(ident, "--backend", "torch", "--components", "4", "--device", "cpu", cwd=tmp)
    # the address it printed, token and all: what a person opens
    url = f"http://127.0.0.1:{server.port}/" + (f"?token={server.token}" if server.token else "")
    try:
        yield dict(url=url, ident=ident, tmp=tmp, server=server, proc=server.proc)
    finally:
        server.stop()


@needs_server
def test_bad_requests_get_one_line_and_the_server_keeps_running(studio):
    server = studio["server"]
    for payload, message in (
        ({"identity": 7, "moves": []}, "no identity number 7"),
        ({"identity": 0, "moves": [{"id": "../../etc/passwd", "value": 1}]}, "no direction"),
        ({"identity": 0, "moves": [{"id": "pc0", "value": 1, "layers": [0, 99]}]}, "outside 0-9"),
        ("not a dict", ""),
    ):
        r = server.post("/api/render", payload)
        assert r.status == 400 and message in r.message()
    r = server.post("/api/render", {"identity": 0, "moves": [{"id": "pc1", "value": 1.5}]})
    assert r.status == 200 and r.json()["edits"][0] == "person/ganspace.pt:1=+1.50@0-9"
    assert studio["proc"].poll() is None


@needs_server
def test_studio_only_serves_what_it_was_given(studio):
    server = studio["server"]
    assert [i["name"] for i in server.get("/api/identities").json()["identities"]] == ["person"]
    assert server.get("/api/identity/0/..%2F..%2Fperson.pti.png").status == 404


@needs_server
@needs_browser
@pytest.mark.slow
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
        assert "token" not in driver.current_url  # the cookie holds it now; the address bar does not
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
        p = run_pti(
            "render",
            studio["ident"].name,
            "--edit",
            edit,
            "-o",
            tmp_path / "render",
            "--device",
            "cpu",
            cwd=studio["tmp"],
            env=env_with(PTI_HOME=str(studio["tmp"] / "home")),
        )
        assert p.returncode == 0, p.stderr
        (png,) = [f for f in (tmp_path / "render").glob("*.png")]
        assert np.array_equal(_png(shown), np.asarray(Image.open(png).convert("RGB")))
        recon = studio["server"].get("/api/identity/0/reconstruction.png").body
        assert np.abs(_png(shown).astype(int) - _png(recon).astype(int)).max() > 10  # the edit changed it
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
        # a reload works on the cookie alone; a browser without it is told where the token is
        driver.refresh()
        wait.until(lambda d: int(d.find_element(By.ID, "edited").get_attribute("data-version")) >= 1)
        driver.delete_all_cookies()
        driver.refresh()
        wait.until(lambda d: "token" in d.find_element(By.ID, "message").text)
    finally:
        driver.quit()
    assert studio["proc"].poll() is None


def test_without_the_extra_it_says_how_to_get_it(tmp_path):
    if HAVE_SERVER:
        pytest.skip("the studio extra is installed here; this checks the message where it is not")
    p = run_pti("studio", tmp_path)
    assert p.returncode == 1 and "pip install 'pti[studio]'" in p.stderr
