"""The studio's web app and server: FastAPI routes on one event loop, uvicorn, and Ctrl-C.

Every route is `async` and none renders: the page is a string in memory, the input photo is read
once, and renders await the person's worker with the studio's time limit. So the event loop, and
with it `GET /` and the images already made, stays free however many renders are queued; a
synchronous route would take one of Starlette's 40 threadpool threads for as long as it waits.

Signals: uvicorn would put its own handlers in place of `pti.signals`'; `serve` installs one that
asks uvicorn to stop at the first Ctrl-C or SIGTERM (no more connections; the requests waiting for
renders are answered "stopping" at once), ignores a second while it stops, exits at a third, gives
the renders in progress `JOIN` seconds to end, and then hands the first signal back to the handler
that was there, which for the `pti` command is `pti.signals`: it says which signal it was and raises
KeyboardInterrupt, and the CLI prints the usual `interrupted (...)` line and exits 130. A render
still running then is not waited for (a sweep of a large generator on a CPU takes a minute).
"""

import asyncio
import atexit
import contextlib
import functools
import os
import signal
import sys
import threading

from pti.errors import PTIError, first_line
from pti.studio import PAGE, Studio, need_server
from pti.studio.checks import RequestError, index as parse_index, parse
from pti.studio.guard import Guard

GRACE = 3.0  # seconds uvicorn waits for open requests when stopping (they are answered at once; a backstop)
JOIN = 3.0  # seconds to let renders in progress end when stopping (a save completes its files)
CONNECTIONS = 256  # open connections at most; uvicorn answers more with 503


def create_app(studio: Studio, *, host: str = "127.0.0.1", port: int = 7860, token: str | None = None):
    """The ASGI app: `Guard` in front of FastAPI routes that answer errors as {"error": "one line"}."""
    need_server()
    from fastapi import FastAPI, Request  # noqa: PLC0415  optional extra (studio), after need_server's message
    from fastapi.responses import HTMLResponse, JSONResponse, Response  # noqa: PLC0415  optional extra (studio)
    from starlette.concurrency import run_in_threadpool  # noqa: PLC0415  optional extra (studio)
    from starlette.exceptions import HTTPException  # noqa: PLC0415  optional extra (studio)

    app = FastAPI(title="pti studio", docs_url=None, redoc_url=None, openapi_url=None)

    def error(message: str, status: int) -> JSONResponse:
        return JSONResponse({"error": studio.scrub(message)}, status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            return error(f"nothing at {request.url.path[:80]!r}", 404)
        if exc.status_code == 405:
            return error(f"{request.method} is not accepted at {request.url.path[:80]!r}", 405)
        return error(str(exc.detail), exc.status_code)

    def answering(fn):
        """The route's answer, or its error as one line: 4xx for the request's faults, 500 for ours."""

        @functools.wraps(fn)
        async def route(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except RequestError as e:
                return error(str(e), e.status)
            except PTIError as e:  # a bad file or edit: the page says so and the server keeps running
                return error(str(e), 400)
            except Exception as e:  # noqa: BLE001  a bug of ours must not take the server down either
                return error(f"{first_line(e)} (this is a bug in pti)", 500)

        return route

    async def done(future):
        """The worker's answer, within the studio's time limit (the queue included)."""
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), studio.timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise RequestError(
                f"no answer within {studio.timeout:g} s (renders are slow or queued); try again", 503
            ) from None

    html = PAGE.read_text()

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(html)

    @app.get("/api/identities")
    @answering
    async def identities():
        return {"identities": studio.identities()}

    @app.get("/api/identity/{number}")
    @answering
    async def identity(number: str):
        i = parse_index(number)
        person = studio.slot(i, 404).person or await done(studio.submit(i, lambda p: p, status=404))
        return studio.describe(i, person)

    @app.get("/api/identity/{number}/{which}.png")
    @answering
    async def image(number: str, which: str):
        i = parse_index(number)
        slot = studio.slot(i, 404)
        if which == "input":
            data = slot.input or await run_in_threadpool(studio.input_png, slot)
        elif which == "reconstruction":
            made = slot.person.reconstruction if slot.person else None
            data = made or await done(studio.submit(i, studio.reconstruction_png, status=404))
        else:
            raise RequestError(f"no image {which[:40]!r}; there are input.png and reconstruction.png", 404)
        return Response(data, media_type="image/png")

    @app.post("/api/render")
    @answering
    async def render(request: Request):
        ask = parse(await request.body(), "render")
        return await done(studio.submit(ask.identity, lambda p: studio.render(p, ask.moves, ask.pasted)))

    @app.post("/api/save")
    @answering
    async def save(request: Request):
        ask = parse(await request.body(), "save")
        return await done(studio.submit(ask.identity, lambda p: studio.save(p, ask.moves)))

    @app.post("/api/sweep")
    @answering
    async def sweep(request: Request):
        ask = parse(await request.body(), "sweep")
        gif = await done(
            studio.submit(ask.identity, lambda p: studio.sweep(p, ask.moves, ask.slider, ask.frames), sweep=True)
        )
        return Response(
            gif, media_type="image/gif", headers={"Content-Disposition": 'attachment; filename="sweep.gif"'}
        )

    return Guard(app, host=host, port=port, token=token, timeout=studio.timeout)


def serve(app, studio: Studio, host: str, port: int, on_ready=None) -> bool:
    """Serve until Ctrl-C or SIGTERM, calling `on_ready()` once it listens; False when it could not listen.
    A signal ends in KeyboardInterrupt (raised by the handler that was in place before, `pti.signals` for the CLI)."""
    import uvicorn  # noqa: PLC0415  optional extra (studio)

    class Server(uvicorn.Server):
        def install_signal_handlers(self) -> None:  # uvicorn < 0.29: ours are in place
            pass

        @contextlib.contextmanager
        def capture_signals(self):  # uvicorn >= 0.29: ours are in place
            yield

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if self.started and on_ready is not None:
                on_ready()

        async def shutdown(self, sockets=None) -> None:
            studio.stop()  # the requests waiting for renders are answered now, so none holds the shutdown
            await super().shutdown(sockets)

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="critical",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=GRACE,
        limit_concurrency=CONNECTIONS,
    )
    server = Server(config)
    caught: list[int] = []

    def on_signal(signum, frame) -> None:
        caught.append(signum)
        if len(caught) == 1:
            server.should_exit = True
        elif len(caught) >= 3:  # stuck: as pti.signals does, end now
            os._exit(130)

    mine = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if mine else {}
    try:
        try:
            server.run()
        except SystemExit:  # uvicorn exits when it cannot bind
            return False
        if caught:
            studio.stop()
            studio.join(JOIN)
            if studio.busy():
                atexit.register(_end_now, 130)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if caught:
        signal.raise_signal(caught[0])  # pti.signals: records which, raises KeyboardInterrupt
        raise KeyboardInterrupt
    return server.started


def _end_now(code: int) -> None:
    """The last exit step when a render still runs in a worker thread: torch's C++ teardown at exit would abort
    under it ("terminate called without an active exception"), so end here, once Python's output is out.
    Registered last, it runs first among the exit handlers; everything of pti's is done by then (the CLI
    has printed its line and removed temporary files)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
