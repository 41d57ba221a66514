"""Shared fixtures of the metrics tests: real CIFAR-10 and MNIST from ../shared/data when present."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED_DATA = os.environ.get("MF_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))
CIFAR_NPZ = os.path.join(SHARED_DATA, "cifar10", "cifar10_uint8.npz")
MNIST_IMAGES = os.path.join(SHARED_DATA, "mnist", "train-images-idx3-ubyte.gz")
RESNET56 = os.path.join(SHARED_DATA, "resnet_cifar10", "resnet56-4bfd9763.th")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs longer (real data or networks); still part of CI, kept bounded")


def need(path: str) -> str:
    if not os.path.exists(path):
        pytest.skip(f"real data not found at {path} (set MF_SHARED_DATA to the folder of ../shared/data)")
    return path


@pytest.fixture(scope="session")
def cifar():
    """CIFAR-10 as uint8 NHWC arrays, rows shuffled once with a fixed seed (the file is sorted by class)."""
    with np.load(need(CIFAR_NPZ)) as d:
        data = {k: d[k] for k in d.files}
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        perm = rng.permutation(len(data[f"y_{split}"]))
        data[f"x_{split}"], data[f"y_{split}"] = data[f"x_{split}"][perm], data[f"y_{split}"][perm]
    return data


def read_mnist_images(path: str, n: int) -> np.ndarray:
    """The first n MNIST digits of an idx3 .gz file as (n, 28, 28) uint8."""
    with gzip.open(path, "rb") as f:
        header = np.frombuffer(f.read(16), dtype=">u4")
        assert header[0] == 2051, "not an idx3 image file"
        rows, cols = int(header[2]), int(header[3])
        return np.frombuffer(f.read(n * rows * cols), dtype=np.uint8).reshape(n, rows, cols)


@pytest.fixture(scope="session")
def mnist_as_cifar():
    """A function n -> n MNIST digits as CIFAR-shaped images: zero-padded to 32x32, grey copied to RGB."""

    def load(n: int) -> np.ndarray:
        digits = read_mnist_images(need(MNIST_IMAGES), n)
        padded = np.pad(digits, ((0, 0), (2, 2), (2, 2)))
        return np.repeat(padded[..., None], 3, axis=-1)

    return load


def noise_images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """Gaussian noise images: N(127.5, 64^2) per pixel, clipped and rounded to uint8, (n, size, size, 3)."""
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(rng.normal(127.5, 64.0, size=(n, size, size, 3))), 0, 255).astype(np.uint8)
