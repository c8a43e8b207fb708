"""Run the pti CLI and send this process a real signal the first time a given function is called.

    python interrupt_at.py MODULE:ATTR[.ATTR] SIGINT|SIGTERM -- PTI ARGS...

Some commands print nothing until they are done (`pti info`, `pti convert`), so a test cannot time a
Ctrl-C from outside. This puts the signal at a known point instead: the function still runs (it is
not replaced), but first the process signals itself with `os.kill`, exactly as a terminal would, and
pti's own handler takes it from there. The entry point is the console script's, `pti.__main__.main`.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys


def main() -> None:
    target, signame, sep, *argv = sys.argv[1:]
    assert sep == "--", "usage: interrupt_at.py MODULE:ATTR SIGNAL -- ARGS..."
    module_name, _, path = target.partition(":")
    owner = importlib.import_module(module_name)
    *parents, attr = path.split(".")
    for name in parents:
        owner = getattr(owner, name)
    original = getattr(owner, attr)
    fired = []

    def signal_then_call(*args, **kwargs):
        if not fired:
            fired.append(True)
            os.kill(os.getpid(), getattr(signal, signame))
        return original(*args, **kwargs)

    setattr(owner, attr, signal_then_call)
    from pti.__main__ import main as pti_main

    pti_main(argv)


if __name__ == "__main__":
    main()
