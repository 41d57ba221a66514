"""A small MLP velocity network for 2-D toy data (and other flat vectors)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .layers import Linear, timestep_embedding


@dataclass
class MLPConfig:
    width: int = 256  # hidden units per layer
    depth: int = 4  # number of hidden layers
    time_dim: int = 64  # sinusoidal embedding size for each of t and h


class MLP(nn.Module):
    """u(z, t, h, y): the embeddings of t and h are concatenated with z (and a label embedding)."""

    has_v_head = False

    def __init__(self, cfg: MLPConfig, *, shape: tuple[int, ...], num_classes: int = 0):
        super().__init__()
        self.cfg, self.shape, self.num_classes = cfg, tuple(shape), num_classes
        self.conditions = frozenset({"y"}) if num_classes else frozenset()
        dim = math.prod(self.shape)
        self.label_emb = nn.Embedding(num_classes + 1, 2 * cfg.time_dim) if num_classes else None
        layers: list[nn.Module] = []
        width_in = dim + 2 * cfg.time_dim
        for _ in range(cfg.depth):
            layers += [Linear(width_in, cfg.width), nn.SiLU()]
            width_in = cfg.width
        layers.append(Linear(width_in, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        emb = torch.cat([timestep_embedding(t, self.cfg.time_dim), timestep_embedding(h, self.cfg.time_dim)], dim=-1)
        if self.label_emb is not None:
            y = (cond or {}).get("y")
            if y is None:  # no label given: the null class
                y = torch.full((z.shape[0],), self.num_classes, device=z.device, dtype=torch.long)
            emb = emb + self.label_emb(y)
        out = self.net(torch.cat([z.flatten(1), emb.to(z.dtype)], dim=-1))
        return out.view_as(z)


COMPONENTS = {"mlp": (MLP, MLPConfig, "MLP for 2-D points and other flat data")}
