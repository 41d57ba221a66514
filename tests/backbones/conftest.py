"""Backbone tests: the "slow" marker and a fixed seed per test (helpers live in helpers_backbones.py)."""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: tests that take more than ~20 s (still run in CI)")


@pytest.fixture(autouse=True)
def _deterministic_single_thread():
    # The networks here are tiny: with several intra-op threads on a shared machine the
    # OpenMP barriers cost more than the arithmetic (measured 6x slower with 2 threads).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
