"""A small randomly initialised conv net used as a feature extractor to test the FID pipeline offline.

Its features are meaningless as a quality measure; it exists so that the whole
clean-fid path (file listing, resizing, batching, statistics, distance) can be
exercised and benchmarked without the Inception weights. It follows clean-fid's
feature-extractor contract: (B, 3, H, W) float in [0, 255] -> (B, dim).
"""

from __future__ import annotations

import torch
from torch import nn


class RandomConvFeatures(nn.Module):
    """Three strided convolutions (ReLU between them) and a global average pool; weights fixed by ``seed``.

    Any input size works (the pool is global), so it fits both clean-fid modes:
    299x299 after ``clean`` resizing and the raw size in ``legacy_tensorflow``.
    """

    def __init__(self, dim: int = 64, seed: int = 0):
        super().__init__()
        self.feature_name = f"random_conv{dim}_seed{seed}"
        with torch.random.fork_rng(devices=[]):  # fixed weights without disturbing the caller's RNG
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Conv2d(3, 16, kernel_size=4, stride=4),  # (B, 16, H/4, W/4)
                nn.ReLU(),
                nn.Conv2d(16, 32, kernel_size=3, stride=2, padding=1),  # (B, 32, H/8, W/8)
                nn.ReLU(),
                # No ReLU on the last layer: a dead unit would be a constant feature and make
                # the covariance singular.
                nn.Conv2d(32, dim, kernel_size=3, stride=2, padding=1),  # (B, dim, H/16, W/16)
            )
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 255] -> (B, dim)."""
        return self.net(x / 127.5 - 1.0).mean(dim=(2, 3))
