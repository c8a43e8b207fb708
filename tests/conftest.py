"""Shared test setup: one torch thread for every test and fixture; `gpu` tests skipped (with the reason) without CUDA.

Markers (declared in pyproject.toml, enforced by --strict-markers): `slow` marks tests over about
5 s on one CPU core, which still run by default (`-m "not slow"` leaves them out: `make test-fast`);
`gpu` marks tests that need a CUDA device. Two are set here, on every test they apply to:
`interpreter` on the Triton kernel tests (under Triton's interpreter on a CPU), by file;
`subprocess` on every test that starts the console script, found by reading the code the test and its
fixtures run (`run_pti`, `start_pti`, `pti_bin`, `start_studio`, also through helpers of tests/).
"""

import inspect
import types
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).parent
INTERPRETER_FILES = (
    "test_kernels.py",
    "test_kernels_bias_act.py",
    "test_kernels_precision.py",
    "test_kernels_upfirdn.py",
)
CONSOLE_SCRIPT = frozenset({"run_pti", "start_pti", "pti_bin", "start_studio"})  # clirun.py, studiorun.py


def reaches(func, names: frozenset[str] = CONSOLE_SCRIPT, _seen: set | None = None) -> bool:
    """Whether `func` names one of `names`, itself or through a function of tests/ it calls (not run)."""
    seen = set() if _seen is None else _seen
    func = inspect.unwrap(func)
    code = getattr(func, "__code__", None)
    if code is None or code in seen:
        return False
    seen.add(code)
    todo = [code]
    while todo:
        c = todo.pop()
        for name in c.co_names:
            if name in names:
                return True
            callee = func.__globals__.get(name)
            if (
                inspect.isfunction(callee)
                and Path(callee.__code__.co_filename).parent == TESTS
                and reaches(callee, names, seen)
            ):
                return True
        todo.extend(k for k in c.co_consts if isinstance(k, types.CodeType))  # nested functions, lambdas
    return False


def _starts_the_console_script(item) -> bool:
    fixtures = [d.func for n in item.fixturenames for d in item._fixtureinfo.name2fixturedefs.get(n, ())]
    return any(reaches(f) for f in [getattr(item, "function", None), *fixtures] if f is not None)


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in INTERPRETER_FILES:
            item.add_marker(pytest.mark.interpreter)
        if _starts_the_console_script(item):
            item.add_marker(pytest.mark.subprocess)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The tests' tensors are tiny and gain nothing from a second thread, while OpenMP's spin-waiting makes
# 2 threads 10-40x slower whenever another process holds a core (measured on the 2-core machine).
# Session scope covers module-scoped fixtures (set up before any function-scoped fixture); the
# per-test one puts back the single thread after a test that changes it.
@pytest.fixture(scope="session", autouse=True)
def one_thread_session():
    yield from _one_thread()


@pytest.fixture(autouse=True)
def one_thread():
    yield from _one_thread()
