"""A running `pti studio` for tests: the installed console script on a free port, and real HTTP to it.

`start_studio` starts the server, reads the address it prints (with its `?token=`), waits until it
listens and, when there is a token, takes the cookie the way a browser does: the first visit to the
printed address sets it. `Studio.call` sends one request over http.client with exactly the headers
a test names (a browser's, an attacker's), so nothing is added behind the test's back.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path

from clirun import env_with, start_pti

ADDRESS = re.compile(r"http://(\S+?):(\d+)/(?:\?token=([A-Za-z0-9_\-]+))?")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    at: float  # time.monotonic() when the whole reply had arrived

    def json(self):
        return json.loads(self.body)

    def message(self) -> str:
        """The one-line error: the JSON `error` field, or the plain-text body."""
        text = self.json()["error"] if "json" in (self.headers.get("content-type") or "") else self.body.decode()
        assert isinstance(text, str) and text.strip() and "\n" not in text.strip(), f"not one line: {text!r}"
        return text.strip()


@dataclass
class Studio:
    proc: object
    port: int
    token: str | None
    folder: Path
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    cookie: str | None = None  # "name=value", as the first visit set it

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(
        self,
        method: str,
        path: str,
        body=None,
        headers: dict | None = None,
        auth: bool = True,
        json_body: bool = True,
        timeout: float = 120,
    ) -> Reply:
        """One request. A dict/list `body` is sent as JSON with `Content-Type: application/json` (unless
        `json_body` is False or `headers` name a Content-Type); bytes are sent as they are. `auth` adds
        the cookie the first visit set."""
        headers = dict(headers or {})
        if isinstance(body, (dict, list, str, int, float)) and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        if body is not None and json_body and not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/json"
        if auth and self.cookie and not any(k.lower() == "cookie" for k in headers):
            headers["Cookie"] = self.cookie
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            return Reply(r.status, r.headers, r.read(), time.monotonic())
        finally:
            conn.close()

    def get(self, path: str, **kw) -> Reply:
        return self.call("GET", path, **kw)

    def post(self, path: str, payload, **kw) -> Reply:
        return self.call("POST", path, body=payload, **kw)

    def output(self) -> str:
        return "".join(self.out) + "".join(self.err)

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        self._readers_done()
        return rc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.wait(60)
        finally:
            self.kill()

    def kill(self) -> None:
        """Make sure it is gone (a failed test must not leave a server behind)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._readers_done()

    def _readers_done(self) -> None:
        for t in getattr(self, "_readers", ()):
            t.join(timeout=10)


def start_studio(*args, cwd: Path, env=None, timeout: float = 120) -> Studio:
    """`pti studio ARGS --port FREE` in `cwd`; returns once it listens (and holds its cookie)."""
    port = free_port()
    proc = start_pti("studio", *args, "--port", port, cwd=cwd, env=env or env_with(PTI_HOME=str(cwd / "home")))
    s = Studio(proc, port, None, Path(cwd))
    s._readers = [
        threading.Thread(target=_drain, args=(stream, sink), daemon=True)
        for stream, sink in ((proc.stdout, s.out), (proc.stderr, s.err))
    ]
    for t in s._readers:
        t.start()
    deadline = time.monotonic() + timeout
    while True:
        m = ADDRESS.search("".join(s.out))
        if m and listens(port):
            break
        if proc.poll() is not None:
            s.wait(10)
            raise AssertionError(f"pti studio exited ({proc.returncode}) before it listened:\n{s.output()}")
        if time.monotonic() > deadline:
            s.kill()
            raise AssertionError(f"pti studio did not listen within {timeout} s:\n{s.output()}")
        time.sleep(0.05)
    s.token = m.group(3)
    if s.token:
        first = s.get(f"/?token={s.token}", auth=False)
        jar = SimpleCookie()
        for value in first.headers.get_all("set-cookie") or []:
            jar.load(value)
        s.cookie = "; ".join(f"{k}={m.value}" for k, m in jar.items()) or None
    return s


def _drain(stream, sink: list[str]) -> None:
    for line in iter(stream.readline, ""):
        sink.append(line)


def listens(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def burst(studio: Studio, path: str, payload, n: int) -> list[Reply | Exception]:
    """`n` POSTs released together: each connection sends all but the last byte, waits at a barrier,
    then sends it, so the server sees them all at once."""
    body = json.dumps(payload).encode()
    barrier = threading.Barrier(n)
    replies: list = [None] * n

    def one(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", studio.port, timeout=300)
        try:
            conn.putrequest("POST", path)
            for k, v in (("Content-Type", "application/json"), ("Content-Length", str(len(body)))):
                conn.putheader(k, v)
            if studio.cookie:
                conn.putheader("Cookie", studio.cookie)
            conn.endheaders()
            conn.send(body[:-1])
            barrier.wait(timeout=60)
            conn.send(body[-1:])
            r = conn.getresponse()
            replies[i] = Reply(r.status, r.headers, r.read(), time.monotonic())
        except Exception as e:  # noqa: BLE001  reported to the test, which decides
            replies[i] = e
        finally:
            conn.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return replies
