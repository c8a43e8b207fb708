"""Shared test setup: one torch thread for every test and fixture; `gpu` tests skipped (with the reason) without CUDA.

Markers (declared in pyproject.toml, enforced by --strict-markers): `slow` marks tests over about
5 s on one CPU core, which still run by default (`-m "not slow"` leaves them out); `gpu` marks tests
that need a CUDA device.
"""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
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
