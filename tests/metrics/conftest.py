"""Fixtures of the metrics tests: real CIFAR-10 and MNIST from ../shared/data when present."""

from __future__ import annotations

import numpy as np
import pytest

from metrics_data import CIFAR_NPZ, MNIST_IMAGES, need, read_mnist_images


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs longer (real data or networks); still part of CI, kept bounded")


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


@pytest.fixture(scope="session")
def mnist_as_cifar():
    """A function n -> n MNIST digits as CIFAR-shaped images: zero-padded to 32x32, grey copied to RGB."""

    def load(n: int) -> np.ndarray:
        digits = read_mnist_images(need(MNIST_IMAGES), n)
        padded = np.pad(digits, ((0, 0), (2, 2), (2, 2)))
        return np.repeat(padded[..., None], 3, axis=-1)

    return load
