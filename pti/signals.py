"""Ctrl-C and SIGTERM: one handler for the CLI and its worker processes (standard library only).

The first SIGINT/SIGTERM raises KeyboardInterrupt, so `finally` blocks remove temporary files and the
CLI can say what was kept. Later ones are ignored while that unwinding runs (a second Ctrl-C must not
cut a cleanup in half); a third exits at once, for a process that is stuck.

Python raises the exception at whatever bytecode runs when the signal arrives, including inside the
standard library's own cleanup (an interrupt inside `shutil.rmtree`'s `finally` turns into an EBADF
`OSError`, measured). The few short steps that must not be cut (creating and registering a temporary
file, the fsync-rename-record of a finished one, removing a staging folder) run under `deferred()`:
a signal that arrives there is held and raised when the block ends.

The state lives here, not in `pti.__main__`, so `python -m pti` (where that file runs as `__main__`)
and the console script share it.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Iterator

_received: list[str] = []  # which signals arrived, in order
_held = [0, False]  # depth of deferred() blocks, and whether a first signal waits for their end


def on_signal(signum, frame) -> None:
    _received.append("SIGTERM" if signum == signal.SIGTERM else "Ctrl-C")
    if len(_received) == 1:
        if _held[0]:
            _held[1] = True
            return
        raise KeyboardInterrupt
    if len(_received) >= 3:
        os._exit(130)


def install(signals=(signal.SIGINT, signal.SIGTERM)) -> None:
    for sig in signals:
        signal.signal(sig, on_signal)


def how_interrupted() -> str:
    """'Ctrl-C' or 'SIGTERM': what stopped this process (Ctrl-C when no handler saw it)."""
    return _received[0] if _received else "Ctrl-C"


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold a first Ctrl-C / SIGTERM that arrives inside the block; raise it when the block ends.

    Only for short steps: the user waits for them. Without `install()` (pti used as a library) it
    changes nothing: Python's own handler raises where it raises."""
    _held[0] += 1
    try:
        yield
    finally:
        _held[0] -= 1
        if _held[0] == 0 and _held[1]:
            _held[1] = False
            raise KeyboardInterrupt
