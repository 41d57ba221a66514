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


def sample_toy(distribution: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 2) float32 points, scaled to roughly unit variance per axis."""
    g = generator
    if distribution == "checkerboard":
        # 4x4 board on [-2, 2]^2 with the dark squares filled
        x1 = torch.rand(n, generator=g) * 4 - 2
        x2 = torch.rand(n, generator=g) - torch.randint(0, 2, (n,), generator=g).float() * 2
        x2 = x2 + (torch.floor(x1) % 2)
        pts = torch.stack([x1, x2], dim=1) * 1.0
        return pts.float()
    if distribution == "8gaussians":
        k = torch.randint(0, 8, (n,), generator=g).float()
        centers = torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], dim=1) * 2.0
        return (centers + 0.1 * torch.randn(n, 2, generator=g)).float()
    if distribution == "moons":
        half = n // 2
        a = torch.rand(half, generator=g) * math.pi
        b = torch.rand(n - half, generator=g) * math.pi
        m1 = torch.stack([torch.cos(a), torch.sin(a)], 1)
        m2 = torch.stack([1 - torch.cos(b), 0.5 - torch.sin(b)], 1)
        pts = torch.cat([m1, m2]) + 0.05 * torch.randn(n, 2, generator=g)
        return ((pts - torch.tensor([0.5, 0.25])) * 1.5).float()
    if distribution == "gaussian":
        return (torch.tensor([0.5, -0.5]) + 0.5 * torch.randn(n, 2, generator=g)).float()
    raise ValueError(f"unknown distribution {distribution!r}")


@dataclass
class ToyConfig:
    distribution: Literal["checkerboard", "8gaussians", "moons", "gaussian"] = "checkerboard"
    num_points: int = 100_000  # size of the fixed training draw
    seed: int = 0  # seed of the draw (the test split uses seed + 1)


class Toy2D(torch.utils.data.Dataset):
    """A fixed draw of 2-D points; labels are all 0 (unconditional)."""

    num_classes = 0
    shape = (2,)

    def __init__(self, cfg: ToyConfig, *, split: str = "train"):
        self.cfg = cfg
        g = torch.Generator().manual_seed(cfg.seed + (1 if split == "test" else 0))
        self.points = sample_toy(cfg.distribution, cfg.num_points, g)

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, i: int):
        return self.points[i], 0

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.points, torch.zeros(len(self.points), dtype=torch.long)


COMPONENTS = {"toy": (Toy2D, ToyConfig, "2-D toy distributions (checkerboard, 8gaussians, moons, gaussian)")}
