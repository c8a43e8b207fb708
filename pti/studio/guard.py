"""The studio's front door: which requests reach the app at all (plain ASGI, standard library only).

A server on 127.0.0.1 is reachable from every page the user's browser opens, so each request is
treated as hostile until it passes, in this order:

- **Host** must be a name the server was bound to (127.0.0.1, localhost, [::1] with the port, and the
  `--host` value). A DNS-rebinding page, whose own name is made to resolve to 127.0.0.1 so the
  browser treats the studio as that page's origin, sends its own name as Host and is refused.
- **Anything but GET/HEAD** must be `Content-Type: application/json`, and its `Origin` (else its
  `Referer`), when there is one, must be the studio's own. An HTML form or a `text/plain` fetch,
  which any site may send without asking, never reaches a handler; a cross-site JSON request needs
  a CORS preflight, which the studio never grants.
- **A token**, as Jupyter does: the printed address carries `?token=...`; the first visit with it
  sets a cookie (HttpOnly, SameSite=Strict, so other sites' requests do not carry it), and every
  /api request needs that cookie or an `Authorization: Bearer <token>` header.
- **The body** is read here, at most `MAX_BODY` bytes (413 beyond), within the time limit.

What it does not stop: anyone who has the token. On a non-loopback `--host` the traffic is plain
HTTP, so whoever can read the network can read the token too.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import socket
from urllib.parse import parse_qs, urlsplit

from pti.errors import first_line
from pti.studio.checks import MAX_BODY

WILDCARD = ("0.0.0.0", "::", "")  # every address of the machine
READ_ONLY = ("GET", "HEAD")
DRAIN = 1 << 20  # bytes of a refused body read and dropped, so the client sees the answer rather than a reset


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def url_host(host: str) -> str:
    """`host` as it appears in a URL: IPv6 in brackets; a wildcard bind as 127.0.0.1 (the one this machine can open)."""
    if host in WILDCARD:
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


class Guard:
    def __init__(self, app, *, host: str, port: int, token: str | None, timeout: float, body_limit: int = MAX_BODY):
        self.app, self.port, self.token, self.timeout, self.body_limit = app, port, token, timeout, body_limit
        names = {"127.0.0.1", "localhost", "[::1]", url_host(host).lower()}
        self.any_address = host in WILDCARD
        if self.any_address:  # reached from elsewhere by this machine's name or any of its addresses
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
        self.names = names
        self.cookie = f"pti-studio-{port}"  # cookies ignore ports: two studios on one machine keep theirs apart

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers: dict[str, list[str]] = {}
        for k, v in scope["headers"]:
            headers.setdefault(k.decode("latin-1").lower(), []).append(v.decode("latin-1"))
        path, method = scope["path"], scope["method"]
        api = path == "/api" or path.startswith("/api/")
        reply = _Reply(send, api, receive if method not in READ_ONLY else None)

        hosts = headers.get("host", [])
        if len(hosts) != 1 or not self._host_ok(hosts[0]):
            shown = repr(hosts[0][:60]) if len(hosts) == 1 else "no Host" if not hosts else "several"
            return await reply(
                403,
                f"pti studio answers only at the address it printed (127.0.0.1, localhost or [::1] "
                f"at port {self.port}, or its --host); this request named {shown}",
            )
        host = hosts[0].strip().lower()

        if method not in READ_ONLY:
            ctype = _one(headers, "content-type").split(";")[0].strip().lower()
            if ctype != "application/json":
                return await reply(
                    403, f"only JSON is accepted here (Content-Type: application/json), not {ctype or 'no type'!r}"
                )
            origin, referer = _one(headers, "origin", None), _one(headers, "referer", None)
            own = f"http://{host}"
            if origin is not None and origin.strip().lower() != own:
                return await reply(403, f"a request from another site ({origin[:60]!r}) is refused")
            if origin is None and referer is not None and _origin_of(referer) != own:
                return await reply(403, "a request from another site (by its Referer) is refused")

        set_cookie = False
        if self.token is not None:
            given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
            if given is not None:
                if not any(_same(t, self.token) for t in given):
                    return await reply(403, "wrong token: open the address pti studio printed when it started")
                set_cookie = path == "/"
            elif api and not self._authorized(headers):
                return await reply(
                    403, "no token: open the address pti studio printed when it started (it ends in ?token=...)"
                )

        if method not in READ_ONLY:
            body = await self._body(headers, receive, reply)
            if body is None:
                return
            receive = _replay(body, receive)
        cookie = f"{self.cookie}={self.token}; Path=/; HttpOnly; SameSite=Strict" if set_cookie else None
        started = [False]

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                started[0] = True
                extra = [
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"content-security-policy", b"frame-ancestors 'none'"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cache-control", b"no-store"),
                ]
                if cookie:
                    extra.append((b"set-cookie", cookie.encode()))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, receive, guarded_send)
        except asyncio.CancelledError:  # the server is stopping and gave up on this request: nothing to answer
            return
        except Exception as e:  # noqa: BLE001  the app answers its own errors; this is the last line of defence
            if not started[0]:
                await _Reply(send, api, None)(500, f"{first_line(e)} (this is a bug in pti)")

    def _host_ok(self, value: str) -> bool:
        name, port = _split_host(value.strip().lower())
        if port != self.port:
            return False
        if name in self.names:
            return True
        if self.any_address:  # an address literal cannot be rebound: a page can only name it by its number
            try:
                ipaddress.ip_address(name.strip("[]"))
                return True
            except ValueError:
                return False
        return False

    def _authorized(self, headers: dict[str, list[str]]) -> bool:
        for value in headers.get("authorization", []):
            scheme, _, given = value.strip().partition(" ")
            if scheme.lower() in ("bearer", "token") and _same(given.strip(), self.token):
                return True
        for value in headers.get("cookie", []):
            for part in value.split(";"):
                name, _, given = part.strip().partition("=")
                if name == self.cookie and _same(given, self.token):
                    return True
        return False

    async def _body(self, headers, receive, reply) -> bytes | None:
        """The request body, or None once a refusal was sent (too large, too slow, malformed length)."""
        length = _one(headers, "content-length", None)
        if length is not None and not (length.strip().isascii() and length.strip().isdigit()):
            await reply(400, f"Content-Length {length[:20]!r} is not a number")
            return None
        if length is not None and int(length) > self.body_limit:
            await reply(413, f"the body is {int(length)} bytes; at most {self.body_limit} are accepted")
            return None
        body = bytearray()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except (asyncio.TimeoutError, TimeoutError):
                await reply(408, f"the body did not arrive within {self.timeout:g} s")
                return None
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.body_limit:
                reply.drained = len(body)
                await reply(
                    413,
                    f"the body is over {self.body_limit} bytes; at most {self.body_limit} are accepted",
                    more=message.get("more_body", False),
                )
                return None
            if not message.get("more_body", False):
                return bytes(body)


class _Reply:
    """A one-line refusal: JSON {"error": ...} for the API (the page shows it), plain text for the rest."""

    def __init__(self, send, api: bool, receive=None):
        self.send, self.api, self.receive, self.drained = send, api, receive, 0

    async def __call__(self, status: int, message: str, more: bool = True) -> None:
        if self.receive is not None and more:
            await self._drain()
        body = (json.dumps({"error": message}) if self.api else message + "\n").encode()
        ctype = b"application/json" if self.api else b"text/plain; charset=utf-8"
        await self.send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", ctype),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                    (b"x-content-type-options", b"nosniff"),
                ],
            }
        )
        await self.send({"type": "http.response.body", "body": body})

    async def _drain(self) -> None:
        """Read and drop what is left of the body (up to DRAIN bytes, a second at most): a server that closes
        with unread data makes the client's system reset the connection before the client reads the answer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        while self.drained < DRAIN:
            try:
                message = await asyncio.wait_for(self.receive(), max(0.0, deadline - loop.time()))
            except (asyncio.TimeoutError, TimeoutError):
                return
            if message["type"] != "http.request":
                return
            self.drained += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


def _replay(body: bytes, receive):
    """A `receive` that gives the body read here once, then whatever the connection says (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay():
        return pending.pop() if pending else await receive()

    return replay


def _one(headers: dict[str, list[str]], name: str, default: str | None = ""):
    values = headers.get(name)
    return values[0] if values else default


def _split_host(value: str) -> tuple[str, int | None]:
    """'[::1]:7860' -> ('[::1]', 7860); 'localhost' -> ('localhost', 80)."""
    if value.startswith("["):
        name, _, rest = value.partition("]")
        name += "]"
        port = rest[1:] if rest.startswith(":") else ("" if not rest else None)
    else:
        name, colon, port = value.rpartition(":") if ":" in value else (value, "", "")
    if port is None or (port and not (port.isascii() and port.isdigit())):
        return name, None
    return name, int(port) if port else 80


def _origin_of(url: str) -> str:
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return ""
    return f"{parts.scheme}://{parts.netloc}".lower()


def _same(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode())
