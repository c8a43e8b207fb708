"""The `pti` console script and `python -m pti`.

This module imports nothing but the standard library (and `pti.signals`, which holds the handler and
needs nothing else) before it installs the signal handlers, so
Ctrl-C or SIGTERM at any moment, even while Typer or torch are still importing, ends the same way:
exit 130, one line saying what was kept, no traceback. The CLI itself lives in `pti.cli`.
"""

from __future__ import annotations

import os
import sys

from pti.signals import how_interrupted, install


def main(argv: list[str] | None = None) -> None:
    """Install the handlers, run the CLI, exit with its code."""
    install()
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
