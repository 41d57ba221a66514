"""Helpers shared by the backbone tests: finite differences, relative errors, randomised weights, data paths."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def shared_data() -> Path:
    """The shared real data (CIFAR-10, pretrained ResNets): $MF_SHARED_DATA or <repo>/../shared/data."""
    env = os.environ.get("MF_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over all elements (b is the reference)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def central_fd(f, primals, tangents, eps: float = 1e-6):
    """(f(x + εv) - f(x - εv)) / 2ε, the O(ε²) central difference, for a tensor- or tuple-valued f."""
    with torch.no_grad():
        plus = f(*[p + eps * t for p, t in zip(primals, tangents)])
        minus = f(*[p - eps * t for p, t in zip(primals, tangents)])
    if isinstance(plus, tuple):
        return tuple((a - b) / (2 * eps) for a, b in zip(plus, minus))
    return (plus - minus) / (2 * eps)


def randomize_(model: torch.nn.Module, scale: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter so zero-initialised gates and output layers do not make tests trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype.is_floating_point:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return model
