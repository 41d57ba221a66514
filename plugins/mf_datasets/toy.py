"""2-D toy distributions: checkerboard, 8 Gaussians, two moons, and a 2-D Gaussian.

The split is a fixed draw of ``num_points`` points (seeded), so the engine can hold it on the
device like any small dataset and a test can compare samples with data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

DISTRIBUTIONS = ("checkerboard", "8gaussians", "moons", "gaussian")


NUM_MODES = {"checkerboard": 8, "8gaussians": 8, "moons": 2, "gaussian": 1}


def sample_toy_labeled(distribution: str, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 2) float32 points and (n,) long mode labels (square, Gaussian or moon index)."""
    g = generator
    if distribution == "checkerboard":
        # 4x4 board on [-2, 2]^2 with 8 of the squares filled
        x1 = torch.rand(n, generator=g) * 4 - 2
        row = torch.randint(0, 2, (n,), generator=g)
        x2 = torch.rand(n, generator=g) - row.float() * 2 + (torch.floor(x1) % 2)
        label = (torch.floor(x1) + 2).long() * 2 + row
        return torch.stack([x1, x2], dim=1).float(), label
    if distribution == "8gaussians":
        k = torch.randint(0, 8, (n,), generator=g)
        centers = torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], dim=1) * 2.0
        return (centers + 0.1 * torch.randn(n, 2, generator=g)).float(), k
    if distribution == "moons":
        half = n // 2
        a = torch.rand(half, generator=g) * math.pi
        b = torch.rand(n - half, generator=g) * math.pi
        m1 = torch.stack([torch.cos(a), torch.sin(a)], 1)
        m2 = torch.stack([1 - torch.cos(b), 0.5 - torch.sin(b)], 1)
        pts = torch.cat([m1, m2]) + 0.05 * torch.randn(n, 2, generator=g)
        label = torch.cat([torch.zeros(half, dtype=torch.long), torch.ones(n - half, dtype=torch.long)])
        return ((pts - torch.tensor([0.5, 0.25])) * 1.5).float(), label
    if distribution == "gaussian":
        return (torch.tensor([0.5, -0.5]) + 0.5 * torch.randn(n, 2, generator=g)).float(), torch.zeros(n, dtype=torch.long)
    raise ValueError(f"unknown distribution {distribution!r}")


def in_support_fraction(distribution: str, points: torch.Tensor) -> float:
    """Fraction of ``points`` that lie where the distribution puts its mass: a filled checkerboard
    square, or within 3 standard deviations of one of the 8 Gaussians' centres. Data scores ~1.0."""
    x, y = points[:, 0].double(), points[:, 1].double()
    if distribution == "checkerboard":
        inside = (x.abs() <= 2) & (y.abs() <= 2)
        filled = ((torch.floor(x) + torch.floor(y)) % 2) == 0  # the squares the sampler fills
        return float((inside & filled).double().mean())
    if distribution == "8gaussians":
        k = torch.arange(8, dtype=torch.float64)
        centers = torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], 1) * 2.0
        d = torch.cdist(points.double(), centers).min(1).values
        return float((d <= 0.3).double().mean())
    raise ValueError(f"no support test for {distribution!r}")


def sample_toy(distribution: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 2) float32 points, roughly within [-2.5, 2.5]^2."""
    return sample_toy_labeled(distribution, n, generator)[0]


@dataclass
class ToyConfig:
    distribution: Literal["checkerboard", "8gaussians", "moons", "gaussian"] = "checkerboard"
    num_points: int = 100_000  # size of the fixed training draw
    seed: int = 0  # seed of the draw (the test split uses seed + 1)
    conditional: bool = False  # label each point with its mode (square, Gaussian, moon) for class-conditional models


class Toy2D(torch.utils.data.Dataset):
    """A fixed draw of 2-D points, unlabelled or labelled by mode."""

    shape = (2,)

    def __init__(self, cfg: ToyConfig, *, split: str = "train"):
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed + (1 if split == "test" else 0))
        self.points, labels = sample_toy_labeled(cfg.distribution, cfg.num_points, g)
        self.num_classes = NUM_MODES[cfg.distribution] if cfg.conditional else 0
        self.labels = labels if cfg.conditional else torch.zeros_like(labels)

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, i: int):
        return self.points[i], int(self.labels[i])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.points, self.labels


COMPONENTS = {"toy": (Toy2D, ToyConfig, "2-D toy distributions (checkerboard, 8gaussians, moons, gaussian)")}
