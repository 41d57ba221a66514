"""Backbone tests: the "slow" marker and a fixed seed per test (helpers live in helpers_backbones.py)."""

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: tests that take more than ~20 s (still run in CI)")


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
