"""The `pti` console script and `python -m pti`.

This module imports nothing but the standard library before it installs the signal handlers, so
Ctrl-C or SIGTERM at any moment, even while Typer or torch are still importing, ends the same way:
exit 130, one line saying what was kept, no traceback. The CLI itself lives in `pti.cli`.
"""

from __future__ import annotations

import os
import signal
import sys

# Which signal stopped us (for the message), and how many arrived.
_received: list[str] = []


def _on_signal(signum, frame) -> None:
    """First SIGINT/SIGTERM: raise KeyboardInterrupt, so `finally` blocks remove temporary files.

    Later ones are ignored while that unwinding runs (a second Ctrl-C must not cut a cleanup in
    half); a third forces an immediate exit, for a process that is stuck.
    """
    _received.append("SIGTERM" if signum == signal.SIGTERM else "Ctrl-C")
    if len(_received) == 1:
        raise KeyboardInterrupt
    if len(_received) >= 3:
        os._exit(130)


def how_interrupted() -> str:
    """'Ctrl-C' or 'SIGTERM': what stopped this process (Ctrl-C when no handler saw it)."""
    return _received[0] if _received else "Ctrl-C"


def main(argv: list[str] | None = None) -> None:
    """Install the handlers, run the CLI, exit with its code."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    if os.environ.get("PTI_THREADS") != "torch":
        # Waiting OpenMP threads sleep instead of spinning: read once when torch loads, so set it now.
        # Why, and the numbers: pti.engine.device, benchmarks/bench_threads.py.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        from pti.cli import run

        code = run(args)
    except KeyboardInterrupt:  # before the CLI could handle it (while importing)
        sys.stderr.write(f"interrupted ({how_interrupted()}); nothing was written\n")
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
