"""Weights registry: fetch over loopback HTTP only, checksums, first-use records, atomic installs,
offline messages, CLI (through CliRunner and through the installed console script)."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from clirun import env_with, error_lines, no_traceback, run_pti
from helpers import command_app
from pti.engine import weights as W
from pti.errors import OutputError, WeightsError
from pti.fsutil import default_cache_dir

PAYLOAD = bytes(range(256)) * 4096 * 3  # 3 MiB: several 1 MiB chunks, so progress fires repeatedly
SHA = hashlib.sha256(PAYLOAD).hexdigest()
OTHER = PAYLOAD[::-1]  # same size, another sha256: what a changed upstream file looks like


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        if self.path == "/missing":
            self.send_error(404)
            return
        body = OTHER if self.path == "/other" else PAYLOAD
        if self.path.startswith("/file/d/"):  # a Google Drive share link answers with its confirmation page
            body = b"<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head></html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path == "/half":  # promise everything, send half, hang up
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _entry(url: str, sha: str | None = SHA, size: int | None = len(PAYLOAD), **kw) -> W.WeightEntry:
    return W.WeightEntry(
        name="toy", filename="toy.bin", url=url, size=size, sha256=sha, license="test", used_by="tests", **kw
    )


def _dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_fetch_ok_with_progress(server: str, tmp_path: Path) -> None:
    reg = W.Registry([_entry(f"{server}/toy.bin")], cache_dir=tmp_path)
    calls: list[tuple[int, int | None]] = []
    path = reg.fetch("toy", progress=lambda d, t: calls.append((d, t)))
    assert path == tmp_path / "toy.bin" and path.read_bytes() == PAYLOAD
    assert calls[-1] == (len(PAYLOAD), len(PAYLOAD)) and len(calls) >= 3
    assert _leftovers(tmp_path) == ["toy.bin"]
    assert reg.resolve("toy") == path and reg.status("toy") == "cached"


def test_wrong_checksum_leaves_nothing(server: str, tmp_path: Path) -> None:
    reg = W.Registry([_entry(f"{server}/toy.bin", sha="0" * 64)], cache_dir=tmp_path)
    with pytest.raises(WeightsError, match="does not match") as info:
        reg.fetch("toy")
    assert "\n" not in str(info.value)
    assert _leftovers(tmp_path) == []


def test_prefix_checksum(server: str, tmp_path: Path) -> None:
    good = W.Registry([_entry(f"{server}/t", sha=None, sha256_prefix=SHA[:8])], cache_dir=tmp_path / "a")
    assert good.fetch("toy").is_file()
    bad = W.Registry([_entry(f"{server}/t", sha=None, sha256_prefix="deadbeef")], cache_dir=tmp_path / "b")
    with pytest.raises(WeightsError, match="deadbeef"):
        bad.fetch("toy")
    assert _leftovers(tmp_path / "b") == []


def test_interrupted_download_leaves_nothing(server: str, tmp_path: Path) -> None:
    reg = W.Registry([_entry(f"{server}/half", size=None, sha=None)], cache_dir=tmp_path)
    with pytest.raises(WeightsError) as info:
        reg.fetch("toy")
    assert "toy" in str(info.value)
    assert _leftovers(tmp_path) == []


def test_a_web_page_instead_of_the_file_is_refused(server: str, tmp_path: Path) -> None:
    """A share link (as the encoders' READMEs give) answers with a page: refused, nothing recorded or kept, and the
    offline command names the cache's file (the URL's last part is `view?usp=sharing`)."""
    entry = _entry(f"{server}/file/d/abc/view?usp=sharing", sha=None, size=None)
    reg = W.Registry([entry], cache_dir=tmp_path)
    with pytest.raises(WeightsError) as info:
        reg.fetch("toy")
    assert "web page" in str(info.value) and "pti weights import PATH/TO/toy.bin --name toy" in str(info.value)
    assert _leftovers(tmp_path) == [] and not (tmp_path / "toy.bin").exists()


def test_keyboard_interrupt_leaves_nothing(server: str, tmp_path: Path) -> None:
    reg = W.Registry([_entry(f"{server}/toy.bin")], cache_dir=tmp_path)

    def stop(done: int, total: int | None) -> None:
        if done >= 1 << 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reg.fetch("toy", progress=stop)
    assert _leftovers(tmp_path) == []


def test_offline_message(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_dead_port()}/toy.bin"
    reg = W.Registry([_entry(url)], cache_dir=tmp_path)
    with pytest.raises(WeightsError) as info:
        reg.fetch("toy", timeout=5)
    msg = str(info.value)
    assert "toy.bin" in msg and url in msg and "pti weights import PATH/TO/toy.bin --name toy" in msg
    assert "\n" not in msg
    assert _leftovers(tmp_path) == []


def test_http_404(server: str, tmp_path: Path) -> None:
    reg = W.Registry([_entry(f"{server}/missing")], cache_dir=tmp_path)
    with pytest.raises(WeightsError, match="404"):
        reg.fetch("toy")


def test_resolve_never_downloads_unless_asked(server: str, tmp_path: Path) -> None:
    reg = W.Registry([_entry(f"{server}/toy.bin")], cache_dir=tmp_path)
    with pytest.raises(WeightsError, match="pti weights fetch toy"):
        reg.resolve("toy")
    assert _leftovers(tmp_path) == []
    assert reg.resolve("toy", fetch=True).read_bytes() == PAYLOAD


def test_file_url(tmp_path: Path) -> None:
    src = tmp_path / "src" / "toy.bin"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    reg = W.Registry([_entry(src.as_uri())], cache_dir=tmp_path / "cache")
    assert reg.fetch("toy").read_bytes() == PAYLOAD


def test_import(tmp_path: Path) -> None:
    src = tmp_path / "toy.bin"
    src.write_bytes(PAYLOAD)
    reg = W.Registry([_entry("http://unused.invalid/toy.bin")], cache_dir=tmp_path / "cache")
    assert reg.import_file(src).read_bytes() == PAYLOAD  # guessed from the filename
    bad = tmp_path / "other.bin"
    bad.write_bytes(PAYLOAD[:-1] + b"x")
    with pytest.raises(WeightsError, match="cannot tell"):
        reg.import_file(bad)
    with pytest.raises(WeightsError, match="does not match"):
        reg.import_file(bad, name="toy")
    assert _leftovers(tmp_path / "cache") == ["toy.bin"]


# Every platform's branch, checked on whichever platform runs the tests (`platform` is a sys.platform
# value; the home folder and the environment are the test's own).
@pytest.mark.parametrize(
    "platform,env,expected",
    [
        ("linux", {"XDG_CACHE_HOME": "{tmp}/xdg"}, "{tmp}/xdg/pti"),
        ("linux", {}, "{home}/.cache/pti"),
        ("linux", {"XDG_CACHE_HOME": ""}, "{home}/.cache/pti"),  # set but empty counts as unset (XDG spec)
        ("freebsd14", {"XDG_CACHE_HOME": "{tmp}/xdg"}, "{tmp}/xdg/pti"),  # any other Unix follows XDG
        ("darwin", {"XDG_CACHE_HOME": "{tmp}/xdg"}, "{home}/Library/Caches/pti"),  # macOS ignores XDG
        ("win32", {"LOCALAPPDATA": "{tmp}/local"}, "{tmp}/local/pti"),
        ("win32", {}, "{home}/AppData/Local/pti"),
        ("win32", {"LOCALAPPDATA": "", "XDG_CACHE_HOME": "{tmp}/xdg"}, "{home}/AppData/Local/pti"),
    ],
)
def test_cache_dir_per_platform(
    platform: str, env: dict, expected: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    monkeypatch.setattr(Path, "home", lambda: home)
    for var in ("PTI_HOME", "XDG_CACHE_HOME", "LOCALAPPDATA"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value.format(tmp=tmp_path))
    assert default_cache_dir(platform) == Path(expected.format(tmp=tmp_path, home=home))
    monkeypatch.setenv("PTI_HOME", str(tmp_path / "pti-home"))  # PTI_HOME wins everywhere
    assert default_cache_dir(platform) == tmp_path / "pti-home"
    assert W.Registry().cache_dir == tmp_path / "pti-home"


def test_cache_dir_defaults_to_this_platform(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(Path, "home", lambda: tmp_path)
    for var in ("PTI_HOME", "XDG_CACHE_HOME", "LOCALAPPDATA"):
        monkeypatch.delenv(var, raising=False)
    assert default_cache_dir() == default_cache_dir(sys.platform)
    assert default_cache_dir().name == "pti" and tmp_path in default_cache_dir().parents


def test_default_entries_are_consistent() -> None:
    names = [e.name for e in W.DEFAULT_ENTRIES]
    assert len(set(names)) == len(names)
    assert len({e.filename for e in W.DEFAULT_ENTRIES}) == len(names)
    for e in W.DEFAULT_ENTRIES:
        assert e.url.startswith("https://")
        if e.sha256 and e.sha256_prefix:
            assert e.sha256.startswith(e.sha256_prefix)
    assert {"ffhq", "vgg16-metric", "alexnet", "vgg16", "lpips-alex", "lpips-vgg"} <= set(names)


FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "directions"


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/fixtures absent")
def test_direction_checksums_match_fixtures(tmp_path: Path) -> None:
    reg = W.Registry(cache_dir=tmp_path)
    for fname, name in [("age.pt", "interfacegan-age"), ("ffhq_pca.pt", "ganspace-ffhq")]:
        assert reg.import_file(FIXTURES / fname, name=name) == tmp_path / reg.get(name).filename


# --- trust on first use (entries with no published sha256) ------------------------------------


def _tofu(url: str = "http://unused.invalid/toy.bin", **kw) -> W.WeightEntry:
    """An entry like ffhq.pkl: no published sha256 or size."""
    return _entry(url, sha=None, size=None, **kw)


def _record(cache: Path, filename: str = "toy.bin") -> dict:
    return json.loads((cache / f"{filename}.first-use.json").read_text())


@pytest.fixture()
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every call of W.sha256_file (the only place resolve reads a whole cached file), still doing the work."""
    calls: list[Path] = []
    real = W.sha256_file

    def counting(path: Path) -> str:
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(W, "sha256_file", counting)
    return calls


def _bump_mtime(path: Path, seconds: int = 5) -> None:
    """A distinct mtime: file systems stamp times in coarse ticks (ms to 2 s), so a rewrite right after
    a record can keep the old mtime_ns; a later edit by a person never does."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


def test_first_import_records_digest(tmp_path: Path, hashes: list[Path]) -> None:
    src = tmp_path / "toy.bin"
    src.write_bytes(PAYLOAD)
    cache = tmp_path / "cache"
    reg = W.Registry([_tofu()], cache_dir=cache)
    assert reg.status("toy") == "missing" and reg.record("toy") is None
    path = reg.import_file(src)
    rec, st = _record(cache), path.stat()
    assert rec["file"] == "toy.bin" and rec["sha256"] == SHA and rec["size"] == len(PAYLOAD) == st.st_size
    assert rec["mtime_ns"] == st.st_mtime_ns and rec["source"] == str(src) and rec["recorded"].endswith("Z")
    assert reg.record("toy") == W.FirstUse(SHA, len(PAYLOAD), st.st_mtime_ns, rec["recorded"], str(src))
    assert _leftovers(cache) == ["toy.bin", "toy.bin.first-use.json"]  # no temporary files
    assert reg.status("toy") == "cached"
    assert hashes == []  # import hashed while copying; it did not read the file a second time


def test_unchanged_file_is_not_rehashed(tmp_path: Path, hashes: list[Path]) -> None:
    src = tmp_path / "toy.bin"
    src.write_bytes(PAYLOAD)
    reg = W.Registry([_tofu()], cache_dir=tmp_path / "cache")
    path = reg.import_file(src)
    for _ in range(3):
        assert reg.resolve("toy") == path
    assert hashes == []  # size and mtime_ns match the record: one stat per load
    first = reg.record("toy")
    _bump_mtime(path)  # `touch`: same bytes, new mtime
    assert reg.status("toy") == "cached, touched (re-hashed on next use)"
    assert reg.resolve("toy") == path and hashes == [path]  # hashed once, found identical ...
    again = reg.record("toy")
    assert again.mtime_ns == path.stat().st_mtime_ns and (again.sha256, again.recorded) == (
        first.sha256,
        first.recorded,
    )
    assert reg.resolve("toy") == path and hashes == [path]  # ... and re-stamped, so the next load is one stat again
    assert reg.status("toy") == "cached"


def test_record_gates_hashing(tmp_path: Path, hashes: list[Path]) -> None:
    """It is the record that resolve consults: a record whose stat matches is believed without reading the file."""
    cache = tmp_path / "cache"
    reg = W.Registry([_tofu()], cache_dir=cache)
    cache.mkdir()
    (cache / "toy.bin").write_bytes(PAYLOAD)
    st = (cache / "toy.bin").stat()
    fake = {
        "file": "toy.bin",
        "sha256": "0" * 64,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "recorded": "2020-01-01T00:00:00Z",
        "source": "test",
    }
    (cache / "toy.bin.first-use.json").write_text(json.dumps(fake))
    assert reg.resolve("toy") == cache / "toy.bin" and hashes == []
    fake["mtime_ns"] += 1  # now the stat differs: the file is read, and its real digest is not the recorded one
    (cache / "toy.bin.first-use.json").write_text(json.dumps(fake))
    with pytest.raises(WeightsError, match="changed since its first use"):
        reg.resolve("toy")
    assert hashes == [cache / "toy.bin"]


@pytest.mark.parametrize("same_size", [True, False])
def test_modified_file_is_refused_at_resolve(same_size: bool, tmp_path: Path, server: str) -> None:
    src = tmp_path / "toy.bin"
    src.write_bytes(PAYLOAD)
    cache = tmp_path / "cache"
    reg = W.Registry([_tofu(f"{server}/toy.bin")], cache_dir=cache)
    path = reg.import_file(src)
    changed = OTHER if same_size else PAYLOAD + b"!"
    path.write_bytes(changed)
    _bump_mtime(path)
    assert reg.status("toy") == ("cached, touched (re-hashed on next use)" if same_size else "changed since first use")
    for fetch in (False, True):  # fetch=True does not paper over it with a download either
        with pytest.raises(WeightsError) as info:
            reg.resolve("toy", fetch=fetch)
        msg = str(info.value)
        assert "\n" not in msg and "toy.bin" in msg and "changed since its first use" in msg
        assert hashlib.sha256(changed).hexdigest() in msg and SHA in msg  # what it is now, what was recorded
        assert f"pti weights import {path} --name toy --force" in msg and "pti weights fetch toy --force" in msg
    assert path.read_bytes() == changed and _record(cache)["sha256"] == SHA  # nothing touched
    with pytest.raises(WeightsError, match="changed since"):
        reg.fetch("toy")  # `pti weights fetch` without --force says so too, rather than "already cached"
    # The two ways out the message offers: restore the original ...
    assert reg.fetch("toy", force=True).read_bytes() == PAYLOAD and reg.resolve("toy") == path
    # ... or accept the changed file on purpose (import of the cached file itself: no copy).
    path.write_bytes(changed)
    _bump_mtime(path)
    assert reg.import_file(path, name="toy", force=True) == path
    assert reg.resolve("toy") == path and _record(cache)["sha256"] == hashlib.sha256(changed).hexdigest()


def test_import_of_a_different_file_needs_force(tmp_path: Path) -> None:
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    first, second = tmp_path / "a" / "toy.bin", tmp_path / "b" / "toy.bin"
    first.write_bytes(PAYLOAD)
    second.write_bytes(OTHER)
    cache = tmp_path / "cache"
    reg = W.Registry([_tofu()], cache_dir=cache)
    reg.import_file(first)
    assert reg.import_file(first) == cache / "toy.bin"  # the same file again is fine
    with pytest.raises(WeightsError) as info:
        reg.import_file(second)
    msg = str(info.value)
    assert "\n" not in msg and "nothing was saved" in msg and SHA in msg and hashlib.sha256(OTHER).hexdigest() in msg
    assert f"pti weights import {second} --name toy --force" in msg
    assert (cache / "toy.bin").read_bytes() == PAYLOAD and _record(cache)["sha256"] == SHA
    assert _leftovers(cache) == ["toy.bin", "toy.bin.first-use.json"]
    (cache / "toy.bin").unlink()  # the record outlives the file: deleting the file does not reset trust
    with pytest.raises(WeightsError, match="--force"):
        reg.import_file(second)
    assert reg.import_file(second, force=True).read_bytes() == OTHER
    rec = _record(cache)
    assert rec["sha256"] == hashlib.sha256(OTHER).hexdigest() and rec["source"] == str(second)
    assert reg.resolve("toy") == cache / "toy.bin"


def test_fetch_records_digest(server: str, tmp_path: Path, hashes: list[Path]) -> None:
    reg = W.Registry([_tofu(f"{server}/toy.bin")], cache_dir=tmp_path)
    path = reg.fetch("toy")
    rec = _record(tmp_path)
    assert rec["sha256"] == SHA and rec["size"] == len(PAYLOAD) and rec["source"] == f"{server}/toy.bin"
    assert rec["mtime_ns"] == path.stat().st_mtime_ns
    assert reg.resolve("toy") == path and reg.fetch("toy") == path and hashes == []


def test_fetch_never_accepts_a_changed_download(server: str, tmp_path: Path) -> None:
    W.Registry([_tofu(f"{server}/toy.bin")], cache_dir=tmp_path).fetch("toy")
    moved = W.Registry([_tofu(f"{server}/other")], cache_dir=tmp_path)  # the same name now serves other bytes
    assert moved.fetch("toy") == tmp_path / "toy.bin"  # cached: no download at all
    with pytest.raises(WeightsError) as info:
        moved.fetch("toy", force=True)
    msg = str(info.value)
    assert (
        "\n" not in msg and "nothing was saved" in msg and "pti weights import PATH/TO/other --name toy --force" in msg
    )
    assert (tmp_path / "toy.bin").read_bytes() == PAYLOAD and _record(tmp_path)["sha256"] == SHA
    assert _leftovers(tmp_path) == ["toy.bin", "toy.bin.first-use.json"]


def test_published_checksums_need_no_record(server: str, tmp_path: Path, hashes: list[Path]) -> None:
    reg = W.Registry([_entry(f"{server}/toy.bin")], cache_dir=tmp_path)
    path = reg.fetch("toy")
    assert _leftovers(tmp_path) == ["toy.bin"] and reg.record("toy") is None
    assert reg.resolve("toy") == path and hashes == []  # checked against the published sha256 at fetch, as before


def test_unrecorded_cached_file_is_recorded_on_first_use(tmp_path: Path, hashes: list[Path]) -> None:
    """A file put in the cache by hand, or cached before records existed: its first load is its first use."""
    tmp_path.joinpath("toy.bin").write_bytes(PAYLOAD)
    reg = W.Registry([_tofu(sha256_prefix=SHA[:8])], cache_dir=tmp_path)
    assert reg.status("toy") == "cached, not yet recorded"
    assert reg.resolve("toy") == tmp_path / "toy.bin" and hashes == [tmp_path / "toy.bin"]
    assert _record(tmp_path)["sha256"] == SHA and _record(tmp_path)["source"] == "found in the cache"
    assert reg.resolve("toy") == tmp_path / "toy.bin" and len(hashes) == 1 and reg.status("toy") == "cached"
    # The published filename prefix still applies to a hand-placed file: a wrong one is never recorded.
    bad = W.Registry([_tofu(sha256_prefix="deadbeef")], cache_dir=tmp_path / "b")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "toy.bin").write_bytes(PAYLOAD)
    with pytest.raises(WeightsError, match="deadbeef") as info:
        bad.resolve("toy")
    assert "\n" not in str(info.value) and _leftovers(tmp_path / "b") == ["toy.bin"]


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "[]",
        '{"file": "toy.bin"}',
        json.dumps({"file": "other.bin", "sha256": SHA, "size": 1, "mtime_ns": 1, "recorded": "x", "source": "x"}),
        json.dumps({"file": "toy.bin", "sha256": SHA[:40], "size": 1, "mtime_ns": 1, "recorded": "x", "source": "x"}),
        json.dumps({"file": "toy.bin", "sha256": SHA, "size": "1", "mtime_ns": 1, "recorded": "x", "source": "x"}),
    ],
    ids=["not-json", "not-object", "fields-missing", "other-file", "short-digest", "size-text"],
)
def test_unreadable_record_is_refused_until_accepted(content: str, tmp_path: Path) -> None:
    src = tmp_path / "toy.bin"
    src.write_bytes(PAYLOAD)
    cache = tmp_path / "cache"
    reg = W.Registry([_tofu()], cache_dir=cache)
    path = reg.import_file(src)
    (cache / "toy.bin.first-use.json").write_text(content)
    assert reg.status("toy") == "first-use record unreadable"
    for attempt in (lambda: reg.resolve("toy"), lambda: reg.import_file(src), lambda: reg.fetch("toy", force=True)):
        with pytest.raises(WeightsError) as info:
            attempt()
        msg = str(info.value)
        assert (
            "\n" not in msg
            and "cannot read the first-use record" in msg
            and str(cache / "toy.bin.first-use.json") in msg
        )
        assert f"pti weights import {path} --name toy --force" in msg
    assert reg.import_file(path, name="toy", force=True) == path  # the way out the message names
    assert _record(cache)["sha256"] == SHA and reg.resolve("toy") == path


def test_read_only_cache_still_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hashes: list[Path]) -> None:
    """A shared cache the user cannot write: the file is checked and used, only not re-stamped."""
    tmp_path.joinpath("toy.bin").write_bytes(PAYLOAD)
    reg = W.Registry([_tofu()], cache_dir=tmp_path)

    def read_only(*args) -> None:
        raise OutputError(f"cannot write the file {tmp_path}/toy.bin.first-use.json: permission denied")

    monkeypatch.setattr(W.Registry, "_write_record", read_only)
    assert reg.resolve("toy") == tmp_path / "toy.bin" and reg.resolve("toy") == tmp_path / "toy.bin"
    assert len(hashes) == 2 and reg.record("toy") is None  # no record: every load hashes, none fails


def test_entry_formats() -> None:
    by_name = {e.name: e for e in W.DEFAULT_ENTRIES}
    assert by_name["vgg16-metric"].kind == "TorchScript" and by_name["vgg16-metric"].executes_code
    assert by_name["ffhq"].kind == "network pickle" and not by_name["ffhq"].executes_code  # safe_pickle's allow-list
    assert [e.name for e in W.DEFAULT_ENTRIES if e.executes_code] == ["vgg16-metric"]
    assert {e.name for e in W.DEFAULT_ENTRIES if e.trust_on_first_use} == {
        "ffhq",
        "vgg16-metric",
        "vgg16",
        "e4e-ffhq",
        "restyle-e4e-ffhq",
    }
    with pytest.raises(ValueError, match="kind"):
        _entry("http://unused.invalid/x", kind="python")


# --- CLI -----------------------------------------------------------------------------------------


@pytest.fixture()
def cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, server: str) -> typer.Typer:
    from pti.commands import weights as cmd

    monkeypatch.setenv("PTI_HOME", str(tmp_path / "cache"))
    gone = W.WeightEntry(
        name="gone",
        filename="gone.bin",
        url=f"http://127.0.0.1:{_dead_port()}/gone.bin",
        size=None,
        sha256=None,
        license="test",
        used_by="tests",
    )
    monkeypatch.setattr(W, "DEFAULT_ENTRIES", (_entry(f"{server}/toy.bin"), gone))
    return command_app(cmd)


def test_cli(cli: typer.Typer, tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(cli, ["weights", "list"])
    assert r.exit_code == 0 and "toy" in r.output and "missing" in r.output
    r = runner.invoke(cli, ["weights", "path", "toy"])
    assert r.exit_code != 0 and isinstance(r.exception, WeightsError)
    r = runner.invoke(cli, ["weights", "fetch", "toy"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "cache" / "toy.bin").read_bytes() == PAYLOAD
    r = runner.invoke(cli, ["weights", "path", "toy"])
    assert r.exit_code == 0 and r.output.strip() == str(tmp_path / "cache" / "toy.bin")
    r = runner.invoke(cli, ["weights", "fetch", "gone"])
    assert r.exit_code != 0 and "pti weights import" in str(r.exception)
    src = tmp_path / "mine.bin"
    src.write_bytes(b"abc")
    r = runner.invoke(cli, ["weights", "import", str(src), "--name", "gone"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "cache" / "gone.bin").read_bytes() == b"abc"
    r = runner.invoke(cli, ["weights", "list"])
    assert r.output.count("cached") >= 2
    assert hashlib.sha256(b"abc").hexdigest() in r.output  # gone.bin's first-use sha256, recorded by the import
    other = tmp_path / "other.bin"
    other.write_bytes(b"abd")
    r = runner.invoke(cli, ["weights", "import", str(other), "--name", "gone"])
    assert r.exit_code != 0 and isinstance(r.exception, WeightsError) and "--force" in str(r.exception)
    r = runner.invoke(cli, ["weights", "import", str(other), "--name", "gone", "--force"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "cache" / "gone.bin").read_bytes() == b"abd"


def test_list_in_a_terminal_fits_the_width_and_breaks_no_value(tmp_path: Path) -> None:
    """The table a terminal gets, roomy to cramped: no line wider than the terminal, every value shown whole (a
    wrapping one breaks between words only), the digest a prefix where room is short, the rest named as left out."""
    from rich.console import Console

    from pti.commands import weights as cmd

    reg = W.Registry(cache_dir=tmp_path / "a-rather-long-cache-folder-name-that-does-not-fit-in-one-column")
    rows = {r["name"]: r for r in cmd._rows(reg)}
    atomic = {head for _, head, _, one_line in cmd._TERMINAL if one_line}
    for width in (250, 140, 100, 80, 60, 40):
        out = io.StringIO()
        cmd._print_table(list(rows.values()), reg.cache_dir, Console(file=out, width=width, color_system=None))
        first, *lines = out.getvalue().splitlines()
        assert first == f"weights cache: {reg.cache_dir}"  # a path is one word: the terminal wraps it if it must
        if width == 40:  # too narrow for name, status, size and digest side by side: a line per value, each whole
            for e in W.DEFAULT_ENTRIES:
                assert f"  source: {e.url}" in lines and f"  file: {e.filename}" in lines
                assert e.sha256 is None or f"  sha256: {e.sha256}" in lines
            continue
        assert max(map(len, lines)) <= width, (width, out.getvalue())
        assert all(e.name in "\n".join(lines).split() for e in W.DEFAULT_ENTRIES)
        header = next((line for line in lines if "\u2503" in line), None)
        if header is None:  # no borders (cramped): nothing to take apart by column
            assert "--json" in out.getvalue() and "\u2026" in out.getvalue(), width
            continue
        heads = [c.strip() for c in header.split("\u2503")[1:-1]]
        groups: list[list[list[str]]] = []  # per entry, its lines' cells
        for line in lines:
            if line.startswith("\u2502"):
                cells = [c.strip() for c in line.split("\u2502")[1:-1]]
                if cells[0]:
                    groups.append([])
                groups[-1].append(cells)
        assert [g[0][0] for g in groups] == [e.name for e in W.DEFAULT_ENTRIES]
        full_digest = "source" in heads  # the whole digest only once every column fits
        for e, group in zip(W.DEFAULT_ENTRIES, groups):
            r = rows[e.name]
            digest = "unknown" if r["digest"] is None else r["digest"] if full_digest else r["digest"][:12] + "\u2026"
            want = {
                "name": e.name,
                "status": r["status"],
                "size": cmd._human(r["bytes"]),
                "sha256": digest,
                "format": r["format"],
                "used by": e.used_by,
                "file": e.filename,
                "source": e.url,
            }
            for i, head in enumerate(heads):
                pieces = [cells[i] for cells in group if cells[i]]
                if head in want:
                    assert " ".join(pieces) == want[head], (width, head, pieces)
                if head in atomic:
                    assert len(pieces) == 1, (width, head, pieces)
        left_out = [head for _, head, _, _ in cmd._TERMINAL if head not in heads]
        if left_out:
            assert f"not shown at this width: {', '.join(left_out)}" in " ".join(out.getvalue().split())
        if not full_digest:
            assert "--json" in out.getvalue()
        assert "note: vgg16-metric (vgg16.pt) is TorchScript, which is code" in out.getvalue()


def test_list_piped_through_the_console_script(tmp_path: Path) -> None:
    """`pti weights list | ...`: one tab-separated line per file, every value whole, checksums and the
    TorchScript note."""
    env = env_with(PTI_HOME=str(tmp_path / "cache"))
    fake = tmp_path / "ffhq.pkl"
    fake.write_bytes(b"not really a generator")
    r = run_pti("weights", "import", fake, "--name", "ffhq", env=env)
    assert r.returncode == 0 and no_traceback(r), r.stderr
    r = run_pti("weights", "list", env=env)
    assert r.returncode == 0 and no_traceback(r), r.stderr
    lines = r.stdout.splitlines()
    header = lines[0].split("\t")
    assert header == ["name", "status", "bytes", "sha256", "checksum", "format", "path", "source", "license", "used by"]
    rows = {cells[0]: dict(zip(header, cells)) for cells in (line.split("\t") for line in lines[1:])}
    assert all(len(row) == len(header) for row in rows.values()) and len(lines) == 1 + len(W.DEFAULT_ENTRIES)
    for e in W.DEFAULT_ENTRIES:
        row = rows[e.name]
        assert row["source"] == e.url and row["used by"] == e.used_by and row["license"] == e.license
        assert row["path"] == str(tmp_path / "cache" / e.filename)
        if e.sha256:
            assert (row["sha256"], row["checksum"]) == (e.sha256, "published")
    assert rows["ffhq"]["sha256"] == hashlib.sha256(fake.read_bytes()).hexdigest()
    assert rows["ffhq"]["checksum"].startswith("recorded on first use 20") and rows["ffhq"]["status"] == "cached"
    assert rows["ffhq"]["bytes"] == str(fake.stat().st_size) and rows["ffhq"]["format"] == "network pickle"
    assert (
        rows["vgg16"]["sha256"] == "unknown (recorded on first use)" and "prefix 397923af" in rows["vgg16"]["checksum"]
    )
    assert rows["vgg16-metric"]["sha256"] == "unknown (recorded on first use)"
    assert rows["vgg16-metric"]["format"] == "TorchScript, runs code when loaded"
    assert rows["alexnet"]["bytes"] == "244408911" and rows["alexnet"]["status"] == "missing"
    assert "\u2026" not in r.stdout and "\u2502" not in r.stdout  # no ellipsis, no table borders


def test_changed_file_through_the_console_script(tmp_path: Path) -> None:
    """The refusal a user sees: exit 1, one line naming the change and the command that accepts it."""
    env = env_with(PTI_HOME=str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "ffhq.pkl"
    first, second = tmp_path / "first" / "ffhq.pkl", tmp_path / "second" / "ffhq.pkl"
    for f, body in ((first, b"generator one"), (second, b"generator two")):
        f.parent.mkdir()
        f.write_bytes(body)
    assert run_pti("weights", "import", first, env=env).returncode == 0  # entry guessed from the filename
    assert run_pti("weights", "path", "ffhq", env=env).stdout.strip() == str(cached)
    cached.write_bytes(b"generator 2!!")  # same size, other bytes
    _bump_mtime(cached)
    r = run_pti("weights", "path", "ffhq", env=env)
    assert r.returncode == 1 and no_traceback(r) and r.stdout == ""
    [line] = error_lines(r.stderr)
    assert "ffhq.pkl" in line and "changed since its first use" in line
    assert f"pti weights import {cached} --name ffhq --force" in line
    r = run_pti("weights", "import", second, "--name", "ffhq", env=env)
    assert r.returncode == 1 and no_traceback(r)
    [line] = error_lines(r.stderr)
    assert "nothing was saved" in line and "--force" in line
    r = run_pti("weights", "import", second, "--name", "ffhq", "--force", env=env)
    assert r.returncode == 0 and no_traceback(r), r.stderr
    assert run_pti("weights", "path", "ffhq", env=env).stdout.strip() == str(cached)
    assert cached.read_bytes() == b"generator two"
