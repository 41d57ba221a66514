import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests that take more than a few seconds (still run in CI)")
    # raised inside torch itself on the first torch.func call; not ours to fix
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script` is deprecated:FutureWarning")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
