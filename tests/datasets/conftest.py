"""Paths of the real data that tests use when it is there (see ../shared/data/README.md)."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
MNIST_GZ = SHARED_DATA / "mnist"
CIFAR10_NPZ = SHARED_DATA / "cifar10" / "cifar10_uint8.npz"
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


@pytest.fixture
def mnist_gz() -> Path:
    if not all((MNIST_GZ / f"{name}.gz").is_file() for name in MNIST_FILES):
        pytest.skip(f"the MNIST idx files are not in {MNIST_GZ}")
    return MNIST_GZ


@pytest.fixture
def cifar10_npz() -> Path:
    if not CIFAR10_NPZ.is_file():
        pytest.skip(f"{CIFAR10_NPZ} is not here")
    return CIFAR10_NPZ
