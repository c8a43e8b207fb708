"""One render thread per person, apart from request handling: a short queue, turned away when full.

The web app answers on one event loop and never blocks it: a render, save, sweep or first load is
handed to the person's worker as a job and the request awaits its future (with the studio's time
limit). A full queue, or a second sweep for a person while one is made, is refused at once (429),
so a burst of requests costs the server nothing and the page, its images and the other people's
renders are answered meanwhile. Jobs of one person run one at a time: their renders share one
backend, and the order a person's sliders moved in is the order they render in.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, InvalidStateError
from typing import Any, Callable

from pti.studio.checks import RequestError

QUEUE = (
    6  # jobs queued or running per person; the page has at most 4 in flight (load, reconstruction, render, save/sweep)
)


class Worker:
    def __init__(self, name: str, depth: int = QUEUE):
        self.name, self.depth = name, depth
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._jobs: deque[tuple[Future, Callable[[], Any], bool]] = deque()
        self._taken = 0  # jobs queued or running
        self._sweeps = 0  # of them, sweeps
        self._running: Future | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[[], Any], sweep: bool = False) -> Future:
        """Queue `fn`; its future. Raises RequestError 429 when the queue is full or a sweep is in flight."""
        with self._lock:
            if self._closed:
                raise RequestError("the studio is stopping", 503)
            if sweep and self._sweeps:
                raise RequestError(f"a sweep of {self.name} is already being made; one at a time", 429)
            if self._taken >= self.depth:
                raise RequestError(f"{self.name} has {self._taken} renders waiting; try again in a moment", 429)
            fut: Future = Future()
            self._jobs.append((fut, fn, sweep))
            self._taken += 1
            self._sweeps += sweep
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"pti-studio-{self.name}", daemon=True)
                self._thread.start()
            self._wake.notify()
        return fut

    def close(self) -> None:
        """Take no more jobs; answer the queued ones and the running one with 'stopping' (its render goes on
        in the background, and nobody waits for its answer)."""
        stopping = RequestError("the studio is stopping", 503)
        with self._lock:
            self._closed = True
            queued, self._jobs = list(self._jobs), deque()
            for _, _, sweep in queued:
                self._taken -= 1
                self._sweeps -= sweep
            running = self._running
            self._wake.notify_all()
        for fut, _, _ in queued:
            _settle(fut, error=stopping)
        if running is not None:
            _settle(running, error=stopping)

    def busy(self) -> bool:
        """Whether a job is running (its thread is inside a render)."""
        with self._lock:
            return self._running is not None

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._jobs and not self._closed:
                    self._wake.wait()
                if not self._jobs:
                    return
                fut, fn, sweep = self._jobs.popleft()
                self._running = fut
            result, error = None, None
            ran = fut.set_running_or_notify_cancel()  # False: the request gave up (its time limit) while it waited
            if ran:
                try:
                    result = fn()
                except BaseException as e:  # noqa: BLE001  the request's answer, whatever went wrong
                    error = e
            with self._lock:  # the place is free before the answer goes out: the next request may take it at once
                self._taken -= 1
                self._sweeps -= sweep
                self._running = None
            if ran:
                _settle(fut, result, error)


def _settle(fut: Future, result: Any = None, error: BaseException | None = None) -> None:
    """Set a future's outcome unless it has one already (close() may have answered it first)."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass
