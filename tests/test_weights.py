"""Weights registry: fetch over loopback HTTP only, checksums, atomic installs, offline messages, CLI."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from pti.engine import weights as W
from pti.errors import WeightsError

PAYLOAD = bytes(range(256)) * 4096 * 3  # 3 MiB: several 1 MiB chunks, so progress fires repeatedly
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        if self.path == "/missing":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        if self.path == "/half":  # promise everything, send half, hang up
            self.wfile.write(PAYLOAD[: len(PAYLOAD) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(PAYLOAD)

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
    return W.WeightEntry(name="toy", filename="toy.bin", url=url, size=size, sha256=sha, license="test", used_by="tests", **kw)


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


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PTI_HOME", str(tmp_path / "home"))
    assert W.default_cache_dir() == tmp_path / "home"
    monkeypatch.delenv("PTI_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if W.sys.platform.startswith("linux"):
        assert W.default_cache_dir() == tmp_path / "xdg" / "pti"


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


# --- CLI -----------------------------------------------------------------------------------------


@pytest.fixture()
def cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, server: str) -> typer.Typer:
    from pti.commands import weights as cmd

    monkeypatch.setenv("PTI_HOME", str(tmp_path / "cache"))
    gone = W.WeightEntry(name="gone", filename="gone.bin", url=f"http://127.0.0.1:{_dead_port()}/gone.bin",
                         size=None, sha256=None, license="test", used_by="tests")
    monkeypatch.setattr(W, "DEFAULT_ENTRIES", (_entry(f"{server}/toy.bin"), gone))
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        pass

    cmd.register(app)
    return app


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
