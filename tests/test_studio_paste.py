"""The studio's pasted view and Save with paste-back, over HTTP against the running console script.

A tiny astronaut identity (tuned through `pti tune`, so it records how its face was cut) and one tuned with
--no-align (which cannot be pasted) are served by one `pti studio`. The pasted view must be the page's edit
pasted into the photo as `pti render --paste` pastes it, Save must write the pasted photo beside the crop (the
same bytes `pti render --paste` writes for that edit), and what cannot be pasted says why in one line.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data

from clirun import env_with, run_pti
from pti.engine import paste as P
from pti.engine.identity import Identity
from studiorun import start_studio

pytest.importorskip("fastapi", reason="the studio extra is not installed (pip install 'pti[studio]')")
STEPS = ["--invert-steps", "2", "--tune-steps", "2"]


def _image(data_url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("RGB"))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("studio_paste")
    photo = tmp / "astro.png"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    crop = tmp / "crop.png"
    Image.fromarray(skimage_data.astronaut()[0:256, 100:356]).save(crop)
    for args in ((photo,), (crop, "--no-align")):
        proc = run_pti("tune", *args, *STEPS, "-o", tmp / "out")
        assert proc.returncode == 0, proc.stderr
    env = env_with(PTI_HOME=str(tmp / "home"))
    server = start_studio(
        tmp / "out" / "astro.pti",
        tmp / "out" / "crop.pti",
        "--backend",
        "torch",
        "--components",
        "2",
        "--device",
        "cpu",
        cwd=tmp / "out",
        env=env,
    )
    try:
        yield tmp, photo, server, env
    finally:
        server.stop()


def test_pasted_view_and_save(served):
    tmp, photo, server, env = served
    person = server.get("/api/identity/0").json()
    assert person["can_paste"] is True and person["paste_note"] is None
    moves = [{"id": "pc0", "value": person["sliders"][0]["neutral"] + 2.0}]
    plain = server.post("/api/render", {"identity": 0, "moves": moves}).json()
    assert "pasted" not in plain  # asked for only when the view is on
    r = server.post("/api/render", {"identity": 0, "moves": moves, "pasted": True})
    assert r.status == 200, r.message()
    shown, crop = _image(r.json()["pasted"]), _image(r.json()["image"])
    rec = Identity.load(tmp / "out" / "astro.pti").alignment
    original = np.asarray(Image.open(photo).convert("RGB"))
    assert np.array_equal(shown, P.paste(original, crop, rec["quad"], rec["landmarks"]).image)
    saved = server.post("/api/save", {"identity": 0, "moves": moves}).json()
    assert saved["pasted"].endswith("_pasted.png")
    written = np.asarray(Image.open(tmp / "out" / saved["pasted"]).convert("RGB"))
    assert np.array_equal(written, shown)
    # The page's edit string through `pti render --paste`: the same pasted photo.
    proc = run_pti(
        "render", "astro.pti", "--edit", r.json()["edits"][0], "--paste", "-o", tmp / "r", cwd=tmp / "out", env=env
    )
    assert proc.returncode == 0, proc.stderr
    (pasted,) = (tmp / "r").glob("*_pasted.png")
    assert np.array_equal(np.asarray(Image.open(pasted).convert("RGB")), written)


def test_what_cannot_be_pasted_says_why(served):
    _, _, server, _ = served
    person = server.get("/api/identity/1").json()
    assert person["can_paste"] is False and "--no-align" in person["paste_note"]
    r = server.post("/api/render", {"identity": 1, "moves": [], "pasted": True})
    assert r.status == 400 and "--no-align" in r.message() and "\n" not in r.message()
    saved = server.post("/api/save", {"identity": 1, "moves": []}).json()
    assert "pasted" not in saved
    r = server.post("/api/render", {"identity": 0, "moves": [], "pasted": "yes"})
    assert r.status == 400 and "pasted must be true or false" in r.message()
