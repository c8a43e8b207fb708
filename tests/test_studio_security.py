"""`pti studio` as a hostile web page, a stranger and a crowd see it: real HTTP against the installed console script.

A page on another site must not drive the studio (a cross-site form or `text/plain` POST) nor read it
through DNS rebinding (a foreign `Host`); nobody without the printed token gets an answer from the API;
every malformed or oversized request is a one-line 4xx while the server keeps running; a burst of
sweeps is turned away (429) instead of starving the page; Ctrl-C or SIGTERM end it at once, exit 130.
One server (two tiny identities, 16 GANSpace sliders) serves most tests; the ones that start their
own are marked slow.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from clirun import run_pti, wait_until
from helpers import tuned_tiny
from pti.engine.checkpoint import generator_hash
from pti.engine.identity import Identity
from studiorun import burst, free_port, listens, start_studio

try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError:
    pytest.skip("the studio extra is not installed (pip install 'pti[studio]')", allow_module_level=True)

SLIDERS = 16
SERVE = ("--backend", "torch", "--device", "cpu", "--components", str(SLIDERS))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """person.pti (its aligned photo beside it), other.pti (a copy under another name) and narrow.pti, on a
    generator of its own (saved beside it) whose w has fewer dimensions (8) than the studio's 20 GANSpace components."""
    tmp = tmp_path_factory.mktemp("studio")
    base, G, pivot = tuned_tiny()
    ident = Identity.from_tuning(base, G, pivot, generator_hash(base), "builtin:tiny").save(tmp / "person.pti")
    (tmp / "person").mkdir()
    with torch.no_grad():
        photo = base.synthesis(pivot, noise_mode="const", force_fp32=True)[0]
    Image.fromarray(((photo.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()).save(
        tmp / "person" / "aligned.png"
    )
    shutil.copy(ident, tmp / "other.pti")
    _identity_on_own_base(tmp, "narrow", w_dim=8, resolution=16, channels=(512, 16))
    return tmp


def _identity_on_own_base(folder: Path, name: str, w_dim: int, resolution: int, channels: tuple[int, int]) -> Path:
    """`folder/name.pti`, untuned, on a random generator saved as `folder/name-base.safetensors`."""
    from pti.engine.checkpoint import save_generator
    from pti.engine.generator import Generator

    torch.manual_seed(0)
    base = Generator(
        z_dim=w_dim,
        w_dim=w_dim,
        img_resolution=resolution,
        synthesis_kwargs=dict(channel_base=channels[0], channel_max=channels[1]),
    ).eval()
    save_generator(base, folder / f"{name}-base.safetensors")
    with torch.no_grad():
        pivot = base.mapping(torch.randn(1, w_dim), None)
    return Identity.from_tuning(base, base, pivot, generator_hash(base), str(folder / f"{name}-base.safetensors")).save(
        folder / f"{name}.pti"
    )


@pytest.fixture(scope="module")
def studio(folder):
    s = start_studio(folder / "person.pti", folder / "other.pti", folder / "narrow.pti", *SERVE, cwd=folder)
    try:
        for i in (0, 1):  # load them now, so no test pays for it at an unknown moment
            assert s.get(f"/api/identity/{i}").status == 200
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def pc0(studio) -> dict:
    return next(x for x in studio.get("/api/identity/0").json()["sliders"] if x["id"] == "pc0")


def _refused(reply, status: int) -> str:
    assert reply.status == status, (reply.status, reply.body[:300])
    return reply.message()


# ----------------------------------------------------------------------------- Host, Origin, token


def test_a_rebinding_host_gets_nothing(studio):
    """DNS rebinding: evil.example resolves to 127.0.0.1 and the browser sends `Host: evil.example`."""
    port = studio.port
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", f"localhost:{port + 1}", ""):
        for path in ("/", "/api/identities", "/api/identity/0", "/api/identity/0/input.png"):
            _refused(studio.get(path, headers={"Host": host}), 403)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}", f"[::1]:{port}"):
        assert studio.get("/api/identities", headers={"Host": host}).status == 200, host


def test_a_cross_site_form_or_text_post_never_reaches_a_handler(studio, folder):
    """What a page on another site can send without a CORS preflight, with and without our cookie."""
    form = b'{"identity": 0, "moves": [], "x": "="}'  # a text/plain form: name '{"identity"...', value '"}'
    evil = {"Origin": "http://evil.example"}
    cases = [
        {"Content-Type": "application/x-www-form-urlencoded", **evil},
        {"Content-Type": "text/plain", **evil},
        {"Content-Type": "multipart/form-data; boundary=x", **evil},
        {"Content-Type": "text/plain"},  # same site, still not JSON
        {},  # no Content-Type at all
        {"Content-Type": "application/json", **evil},
        {"Content-Type": "application/json", "Origin": "null"},
        {"Content-Type": "application/json", "Origin": f"http://127.0.0.1:{studio.port + 1}"},
        {"Content-Type": "application/json", "Referer": "http://evil.example/page.html"},
    ]
    for path in ("/api/save", "/api/render", "/api/sweep"):
        for headers in cases:
            for auth in (True, False):
                _refused(studio.call("POST", path, body=form, headers=headers, json_body=False, auth=auth), 403)
    assert not (folder / "person" / "studio").exists()
    # the page itself: same origin, JSON
    ok = studio.post(
        "/api/render", {"identity": 0, "moves": []}, headers={"Origin": studio.origin, "Referer": studio.origin + "/"}
    )
    assert ok.status == 200


def test_nobody_without_the_token_gets_in(studio):
    assert studio.token and len(studio.token) >= 32, f"the printed address carries no ?token=: {studio.output()}"
    name = studio.cookie.split("=", 1)[0]
    for path in (
        "/api/identities",
        "/api/identity/0",
        "/api/identity/0/input.png",
        "/api/identity/0/reconstruction.png",
    ):
        _refused(studio.get(path, auth=False), 403)
        _refused(studio.get(path, headers={"Cookie": f"{name}=guessed"}), 403)
        _refused(studio.get(path, headers={"Authorization": "Bearer guessed"}, auth=False), 403)
    _refused(studio.post("/api/render", {"identity": 0, "moves": []}, auth=False), 403)
    _refused(studio.get("/?token=guessed", auth=False), 403)
    # the printed address: the first visit sets the cookie, HttpOnly and SameSite=Strict, and the page works
    first = studio.get(f"/?token={studio.token}", auth=False)
    assert first.status == 200 and b"pti studio" in first.body
    (cookie,) = [c for c in first.headers.get_all("set-cookie") if c.startswith(name + "=")]
    attributes = {a.strip().lower() for a in cookie.split(";")[1:]}
    assert "httponly" in attributes and "samesite=strict" in attributes, cookie
    assert studio.get("/api/identities", headers={"Cookie": cookie.split(";")[0]}, auth=False).status == 200
    # a script may send the token itself
    assert studio.get("/api/identities", headers={"Authorization": f"Bearer {studio.token}"}, auth=False).status == 200


@pytest.mark.slow
def test_a_network_bind_needs_the_token_and_no_token_is_for_loopback_only(folder):
    ident = folder / "other.pti"
    p = run_pti("studio", ident, "--host", "0.0.0.0", "--no-token", "--port", free_port(), cwd=folder)
    assert p.returncode == 2 and "loopback" in p.stderr, p.stderr
    wide = start_studio(ident, "--host", "0.0.0.0", *SERVE, cwd=folder)
    try:
        assert wide.token, wide.output()
        warning = [line for line in wide.output().splitlines() if "warning" in line]
        assert warning and "token" in warning[0], wide.output()
        _refused(wide.get("/api/identities", auth=False), 403)
        _refused(wide.get("/api/identities", headers={"Host": f"evil.example:{wide.port}"}), 403)
        assert wide.get("/api/identities").status == 200
    finally:
        wide.stop()
    open_ = start_studio(ident, "--no-token", *SERVE, cwd=folder)
    try:
        assert open_.token is None
        assert open_.get("/api/identities", auth=False).status == 200  # no token on loopback, as asked
        _refused(open_.get("/api/identities", headers={"Host": f"evil.example:{open_.port}"}), 403)
        _refused(
            open_.call(
                "POST",
                "/api/render",
                body=b'{"identity": 0, "moves": []}',
                headers={"Content-Type": "text/plain"},
                json_body=False,
            ),
            403,
        )
    finally:
        open_.stop()


# ----------------------------------------------------------------------------- limits and malformed requests


def test_a_body_over_the_cap_is_413(studio):
    big = json.dumps({"identity": 0, "moves": [], "pad": "x" * 70_000}).encode()
    _refused(studio.call("POST", "/api/render", body=big), 413)
    _refused(studio.call("POST", "/api/render", body=iter([big[:40_000], big[40_000:]])), 413)  # chunked: no length
    assert studio.get("/api/identities").status == 200


def _bad_requests(pc0: dict) -> list[tuple[str, bytes, str]]:
    """(endpoint, body, a word the one-line answer must contain): each must be a 400."""
    ok = {"id": "pc0", "value": pc0["high"]}

    def j(**payload) -> bytes:
        return json.dumps(payload).encode()

    def move(**m) -> bytes:
        return j(identity=0, moves=[{**ok, **m}])

    deep = b'{"identity": 0, "moves": ' + b"[" * 40 + b"]" * 40 + b"}"
    deeper = b'{"identity": 0, "moves": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"
    cases = [
        ("render", b"not json{", "JSON"),
        ("render", b"\xff\xfe{}", "JSON"),
        ("render", b"", "JSON"),
        ("render", b'"a string"', "object"),
        ("render", b"[]", "object"),
        ("render", j(moves=[]), "identity"),
        ("render", j(identity=0), "moves"),
        ("render", j(identity="0", moves=[]), "identity"),
        ("render", j(identity=True, moves=[]), "identity"),
        ("render", j(identity=0.0, moves=[]), "identity"),
        ("render", j(identity=None, moves=[]), "identity"),
        ("render", j(identity=[0], moves=[]), "identity"),
        ("render", j(identity=7, moves=[]), "identity"),
        ("render", j(identity=-1, moves=[]), "identity"),
        ("render", j(identity=0, moves=[], colour=1), "colour"),
        ("render", j(identity=0, moves="pc0"), "moves"),
        ("render", j(identity=0, moves={"pc0": 1}), "moves"),
        ("render", j(identity=0, moves=[1]), "move"),
        ("render", j(identity=0, moves=[{"value": 1}]), "id"),
        ("render", j(identity=0, moves=[{"id": "pc0"}]), "value"),
        ("render", j(identity=0, moves=[{"id": 0, "value": 1}]), "id"),
        ("render", move(id="../../etc/passwd"), "direction"),
        ("render", move(layer=[0, 1]), "layer"),
        ("render", move(value="1"), "value"),
        ("render", move(value=True), "value"),
        ("render", move(value=None), "value"),
        ("render", b'{"identity": 0, "moves": [{"id": "pc0", "value": 1e309}]}', "value"),
        ("render", b'{"identity": 0, "moves": [{"id": "pc0", "value": NaN}]}', "NaN"),
        ("render", b'{"identity": 0, "moves": [{"id": "pc0", "value": -Infinity}]}', "Infinity"),
        ("render", move(value=pc0["high"] + 1), "range"),
        ("render", move(value=pc0["low"] - 1), "range"),
        ("render", move(layers=[0]), "layers"),
        ("render", move(layers=[0, 1, 2]), "layers"),
        ("render", move(layers=[0, 99]), "layers"),
        ("render", move(layers=[-1, 3]), "layers"),
        ("render", move(layers=[5, 2]), "layers"),
        ("render", move(layers=[True, 3]), "layers"),
        ("render", move(layers=["0", "3"]), "layers"),
        ("render", move(layers=[0.0, 3.0]), "layers"),
        ("render", move(layers="0-3"), "layers"),
        ("render", j(identity=0, moves=[ok, ok]), "twice"),
        ("render", j(identity=0, moves=[ok] * 65), "moves"),
        ("render", deep, "nested"),
        ("render", deeper, "nested"),
        ("save", j(identity=0, moves=[1]), "move"),
        ("save", move(value=pc0["high"] + 1), "range"),
        ("sweep", j(identity=0, moves=[]), "slider"),
        ("sweep", j(identity=0, moves=[], slider=3), "slider"),
        ("sweep", j(identity=0, moves=[], slider="nope"), "direction"),
        (
            "sweep",
            j(identity=0, moves=[{"id": "pc0", "value": pc0["neutral"], "layers": [0, 99]}], slider="pc0"),
            "layers",
        ),
        (
            "sweep",
            j(identity=0, moves=[{"id": "pc0", "value": pc0["neutral"], "layers": ["0; x", 3]}], slider="pc0"),
            "layers",
        ),
        ("sweep", j(identity=0, moves=[], slider="pc0", frames=1), "frames"),
        ("sweep", j(identity=0, moves=[], slider="pc0", frames=10_000), "frames"),
        ("sweep", j(identity=0, moves=[], slider="pc0", frames="9"), "frames"),
    ]
    return cases


def test_every_malformed_request_is_a_400_with_one_line(studio, pc0, folder):
    wrong = []
    for endpoint, body, word in _bad_requests(pc0):
        r = studio.call("POST", f"/api/{endpoint}", body=body)
        try:
            text = _refused(r, 400)
            assert word.lower() in text.lower(), f"{word!r} not in {text!r}"
            assert str(folder) not in text and str(folder.resolve()) not in text
        except (AssertionError, ValueError, KeyError) as e:
            wrong.append(f"{endpoint} {body[:80]!r}: {e}")
    for path, status in (
        ("/api/identity/3", 404),
        ("/api/identity/-1", 404),
        ("/api/identity/99/input.png", 404),
        ("/api/identity/abc", 400),
        ("/api/identity/1e3", 400),
        ("/api/identity/0/secret.png", 404),
        ("/api/nothing", 404),
    ):
        r = studio.get(path)
        try:
            _refused(r, status)
        except (AssertionError, ValueError, KeyError) as e:
            wrong.append(f"GET {path}: {e}")
    assert not wrong, "\n".join(wrong)
    assert studio.proc.poll() is None
    assert studio.post("/api/render", {"identity": 0, "moves": [{"id": "pc0", "value": pc0["high"]}]}).status == 200


def test_the_api_names_identities_not_paths(studio, folder, pc0):
    listed = studio.get("/api/identities")
    assert listed.json() == {
        "identities": [{"index": 0, "name": "person"}, {"index": 1, "name": "other"}, {"index": 2, "name": "narrow"}]
    }
    rendered = studio.post("/api/render", {"identity": 0, "moves": [{"id": "pc0", "value": pc0["high"]}]})
    swept = studio.post(
        "/api/sweep", {"identity": 0, "moves": [{"id": "pc0", "value": 0, "layers": [0, 99]}], "slider": "pc0"}
    )
    for r in (listed, studio.get("/api/identity/0"), rendered, swept):
        assert str(folder) not in r.body.decode() and str(folder.resolve()) not in r.body.decode(), r.body[:400]
    assert rendered.json()["edits"] == [f"person/ganspace.pt:0={pc0['high']:+.2f}@0-9"]
    # the command, run where the identity lies, gives what the page showed
    assert rendered.json()["command"].startswith("pti render person.pti --edit person/ganspace.pt:0=")


def test_a_generator_with_a_narrow_w_gets_as_many_sliders_as_it_has_components(studio):
    """GANSpace of a w with 8 dimensions has 8 components, not the 20 the studio computes elsewhere."""
    r = studio.get("/api/identity/2")
    assert r.status == 200, r.body
    assert [x["id"] for x in r.json()["sliders"]] == [f"pc{k}" for k in range(8)]
    assert (
        studio.post(
            "/api/render", {"identity": 2, "moves": [{"id": "pc7", "value": r.json()["sliders"][7]["high"]}]}
        ).status
        == 200
    )


# ----------------------------------------------------------------------------- save


def test_save_with_every_slider_moved_keeps_a_short_name_and_the_full_edits(studio, folder):
    sliders = studio.get("/api/identity/0").json()["sliders"]
    assert len(sliders) >= 12
    moves = [{"id": s["id"], "value": round(s["neutral"] + 1, 2)} for s in sliders]
    saved = studio.post("/api/save", {"identity": 0, "moves": moves})
    assert saved.status == 200, saved.body
    out = saved.json()
    png, txt = Path(out["image"]), Path(out["edits"])
    assert not png.is_absolute() and png.parent == Path("person/studio") and txt.parent == png.parent
    assert len(png.name.encode()) <= 110 and (folder / png).is_file()
    edits = studio.post("/api/render", {"identity": 0, "moves": moves}).json()["edits"]
    assert len(edits) == len(sliders)
    assert (folder / txt).read_text().splitlines()[0] == " ".join(edits)
    again = studio.post("/api/save", {"identity": 0, "moves": moves}).json()
    assert again["image"] == out["image"]  # the same edit: the same file, nothing new
    assert sorted(p.name for p in (folder / "person" / "studio").iterdir()) == sorted([png.name, txt.name])


def test_save_never_replaces_a_file_made_from_another_edit(studio, folder):
    mine = folder / "other" / "studio"
    mine.mkdir(parents=True)
    (mine / "reconstruction.png").write_bytes(b"my own picture")
    (mine / "reconstruction.txt").write_text("my own notes\n")
    saved = studio.post("/api/save", {"identity": 1, "moves": []})
    assert saved.status == 200, saved.body
    assert saved.json()["image"] != "other/studio/reconstruction.png" and (folder / saved.json()["image"]).is_file()
    assert (mine / "reconstruction.png").read_bytes() == b"my own picture"
    assert (mine / "reconstruction.txt").read_text() == "my own notes\n"
    assert studio.post("/api/save", {"identity": 1, "moves": []}).json()["image"] == saved.json()["image"]


# ----------------------------------------------------------------------------- load


def test_a_burst_of_sweeps_is_turned_away_not_queued(studio):
    replies = burst(studio, "/api/sweep", {"identity": 0, "moves": [], "slider": "pc1"}, 64)
    statuses = sorted(r.status if not isinstance(r, Exception) else repr(r) for r in replies)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    for r in replies:
        if r.status == 429:
            r.message()
    renders = burst(studio, "/api/render", {"identity": 1, "moves": []}, 64)
    assert {r.status for r in renders} <= {200, 429}, [r if isinstance(r, Exception) else r.status for r in renders]
    # one after another, nothing is refused: a finished sweep leaves its place before its answer goes out
    for _ in range(5):
        r = studio.post("/api/sweep", {"identity": 0, "moves": [], "slider": "pc1"})
        assert r.status == 200, r.body


def test_the_page_and_other_people_answer_while_a_sweep_renders(studio):
    """While person 0's sweep is in flight (a second one is refused before and after), the page, the input
    photo, the list and a render of person 1 all answer: nothing waits for the render in progress."""
    sweep = {"identity": 0, "moves": [], "slider": "pc2", "frames": 30}
    assert studio.get("/api/identity/0/input.png").status == 200
    for _ in range(40):
        first: list = []
        t = threading.Thread(target=lambda: first.append(studio.post("/api/sweep", sweep)))
        t.start()
        busy_before = studio.post("/api/sweep", sweep).status == 429
        quick = [
            studio.get("/"),
            studio.get("/api/identity/0/input.png"),
            studio.get("/api/identities"),
            studio.post("/api/render", {"identity": 1, "moves": []}),
        ]
        busy_after = studio.post("/api/sweep", sweep).status == 429
        t.join()
        assert first[0].status in (200, 429)
        if busy_before and busy_after:
            assert [r.status for r in quick] == [200] * 4
            return
    pytest.fail("never saw a second sweep refused while the first rendered: sweeps are not limited to one per person")


# ----------------------------------------------------------------------------- time limit and shutdown


def test_a_request_over_the_time_limit_is_a_503_and_the_server_keeps_going(folder):
    s = start_studio(folder / "person.pti", *SERVE, "--timeout", "0.01", cwd=folder)
    try:
        # a first sweep loads the person and renders 30 frames: far beyond 10 ms
        _refused(s.post("/api/sweep", {"identity": 0, "moves": [], "slider": "pc0", "frames": 30}), 503)
        assert s.get("/api/identities").status == 200
    finally:
        s.stop()


@pytest.fixture(scope="module")
def slow(tmp_path_factory) -> Path:
    """slow.pti on a 256 px generator of its own: a 30-frame sweep takes seconds on a CPU."""
    tmp = tmp_path_factory.mktemp("slow")
    _identity_on_own_base(tmp, "slow", w_dim=32, resolution=256, channels=(8192, 256))
    return tmp


@pytest.mark.slow
@pytest.mark.parametrize("sig,how", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_a_signal_stops_it_at_once_with_exit_130_and_no_traceback(slow, sig, how):
    """A signal while sweeps are in flight: it stops listening, answers what waits, does not finish the work
    (a sweep here takes seconds; those queued would take many), and a second signal changes nothing."""
    s = start_studio(slow / "slow.pti", "--backend", "torch", "--device", "cpu", "--components", "2", cwd=slow)
    try:
        assert s.get("/api/identity/0").status == 200
        sweep = {"identity": 0, "moves": [], "slider": "pc0", "frames": 30}
        crowd = threading.Thread(target=burst, args=(s, "/api/sweep", sweep, 16), daemon=True)
        crowd.start()
        for _ in range(20):  # until a sweep is in flight: another one is refused, or waits
            try:
                if s.post("/api/sweep", sweep, timeout=1).status == 429:
                    break
            except TimeoutError:
                break
        s.proc.send_signal(sig)
        wait_until(
            lambda: s.proc.poll() is not None or not listens(s.port), timeout=30, what="the studio to stop listening"
        )
        if s.proc.poll() is None:
            s.proc.send_signal(sig)  # a second one while it stops: ignored, no traceback
        rc = s.wait(timeout=15)  # a few seconds: what is in flight does not hold it
        crowd.join(timeout=60)
    finally:
        s.kill()
    out = s.output()
    assert rc == 130, out
    assert f"interrupted ({how})" in out and "Kept:" in out
    assert "Traceback" not in out and "Exception" not in out, out
