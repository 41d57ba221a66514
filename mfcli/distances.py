"""Sample-to-data distances for low-dimensional data (2-D toy sets)."""

from __future__ import annotations

import torch


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between two equal-size point clouds (N, D).

    Each random unit direction reduces the problem to 1-D, where optimal transport pairs
    sorted values; the result is the root mean squared difference over all directions.
    """
    if a.shape != b.shape:
        raise ValueError(f"point clouds must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], num_projections, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    pa = torch.sort(a.double().cpu() @ dirs, dim=0).values
    pb = torch.sort(b.double().cpu() @ dirs, dim=0).values
    return float((pa - pb).pow(2).mean().sqrt())


def mmd_rbf(a: torch.Tensor, b: torch.Tensor, bandwidths: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5)) -> float:
    """Unbiased squared maximum mean discrepancy with a sum of Gaussian kernels exp(-|x-y|²/(2σ²)).

    Narrow bandwidths make it sensitive to fine structure (the squares of a checkerboard) that
    sliced Wasserstein, which only compares 1-D projections, largely misses.
    """
    a, b = a.double().cpu(), b.double().cpu()
    n, m = len(a), len(b)

    def k(x, y):
        d2 = torch.cdist(x, y).pow(2)
        return sum(torch.exp(-d2 / (2 * s * s)) for s in bandwidths)

    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    kaa = (kaa.sum() - kaa.diagonal().sum()) / (n * (n - 1))
    kbb = (kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
    return float(kaa + kbb - 2 * kab.mean())
