"""Run the installed `pti` console script the way a person does: a subprocess, real signals.

Helpers only tests use. `pti_bin()` is the console script installed beside the interpreter running
the tests (the project's .venv), so these tests exercise the real entry point and the real Typer /
Click versions, not `CliRunner`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def pti_bin() -> str:
    exe = Path(sys.executable).parent / ("pti.exe" if os.name == "nt" else "pti")
    if not exe.exists():
        raise RuntimeError(f"the console script {exe} is not installed; run `pip install -e .` first")
    return str(exe)


def env_with(**extra: str) -> dict[str, str]:
    """The test environment plus `extra`; a plain, wide, colourless terminal-less output."""
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "100"}
    env.update(extra)
    return env


def run_pti(*args: str, cwd=None, env=None, timeout: float = 300, preexec_fn=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [pti_bin(), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env or env_with(),
        timeout=timeout,
        preexec_fn=preexec_fn,
    )


def start_pti(*args: str, cwd=None, env=None, wrapper: list[str] | None = None) -> subprocess.Popen:
    """Start `pti ARGS` (or `python interrupt_at.py ... ARGS` when `wrapper` is given) without waiting."""
    cmd = (
        [sys.executable, str(TESTS / "interrupt_at.py"), *wrapper, *map(str, args)]
        if wrapper
        else [pti_bin(), *map(str, args)]
    )
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env or env_with()
    )


def wait_until(predicate, proc: subprocess.Popen | None = None, timeout: float = 120, what: str = "condition") -> None:
    """Poll `predicate()` until true; fail early if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"pti exited ({proc.returncode}) before {what}:\n{out}\n{err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def handlers_installed(pid: int) -> bool:
    """True once the process catches SIGTERM: pti's handlers are in place (Linux /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except OSError:
        return False
    return False


def files_under(root: Path) -> list[str]:
    """Every file below `root`, hidden ones included, as sorted relative paths."""
    return sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*") if p.is_file())


def temp_files_under(root: Path) -> list[str]:
    """Leftovers of atomic writes (`.name.XXXX.tmp` / `.part`)."""
    return [f for f in files_under(root) if Path(f).name.startswith(".") and Path(f).suffix in (".tmp", ".part")]


def no_traceback(proc) -> bool:
    return "Traceback" not in (proc.stdout or "") + (proc.stderr or "")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.strip().splitlines() if line.strip()]


def succeeded(proc) -> subprocess.CompletedProcess:
    """`proc`, after asserting it exited 0 (its output in the failure message)."""
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def one_line_error(proc, code: int = 1) -> str:
    """The one stderr line of a run that failed with `code` and no traceback (the CLI's contract)."""
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert no_traceback(proc)
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    return lines[0]


# Linux capability numbers (linux/capability.h) and prctl's "drop from the bounding set" request.
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH, _PR_CAPBSET_DROP = 1, 2, 24


def can_drop_dac() -> bool:
    """Whether `drop_dac` works here (root with CAP_SETPCAP on Linux); non-root needs no dropping."""
    if not sys.platform.startswith("linux"):
        return False
    if os.geteuid() != 0:
        return True
    probe = subprocess.run([sys.executable, "-c", "import os"], preexec_fn=drop_dac, capture_output=True)
    return probe.returncode == 0


def drop_dac() -> None:
    """preexec_fn: make file permissions bind even for root (no CAP_DAC_OVERRIDE), so a 0555 folder is read-only."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")
