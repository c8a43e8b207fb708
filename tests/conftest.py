"""Shared test setup."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The tests' tensors are tiny and gain nothing from a second thread, while OpenMP's spin-waiting
    makes 2 threads 10-40x slower whenever another process holds a core (measured on the 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
