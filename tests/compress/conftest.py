import pytest
import torch

# Small tensors: one thread avoids OpenMP barrier stalls when the cores are shared.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def resnet_registered():
    """Skip tests that need the registered ResNet classifiers when they are not installed."""
    from mfcli.plugins import registry

    if "resnet" not in registry().components["backbones"]:
        pytest.skip("the 'resnet' backbone is not registered in this installation")
