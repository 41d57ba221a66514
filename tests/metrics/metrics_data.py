"""Real data helpers of the metrics tests (a uniquely named module, so that test files of other
folders with their own conftest.py cannot shadow it)."""

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


def need(path: str) -> str:
    if not os.path.exists(path):
        pytest.skip(f"real data not found at {path} (set MF_SHARED_DATA to the folder of ../shared/data)")
    return path


def read_mnist_images(path: str, n: int) -> np.ndarray:
    """The first n MNIST digits of an idx3 .gz file as (n, 28, 28) uint8."""
    with gzip.open(path, "rb") as f:
        header = np.frombuffer(f.read(16), dtype=">u4")
        assert header[0] == 2051, "not an idx3 image file"
        rows, cols = int(header[2]), int(header[3])
        return np.frombuffer(f.read(n * rows * cols), dtype=np.uint8).reshape(n, rows, cols)


def noise_images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    """Gaussian noise images: N(127.5, 64^2) per pixel, clipped and rounded to uint8, (n, size, size, 3)."""
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(rng.normal(127.5, 64.0, size=(n, size, size, 3))), 0, 255).astype(np.uint8)
