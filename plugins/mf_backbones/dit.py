"""DiT with adaLN-Zero as MeanFlow uses it (Geng et al. 2025, §4 and Table 4; DiT: Peebles & Xie 2023).

The network predicts the average velocity u(z_t, r, t) from (t, h = t - r): two separate
timestep embedders (256 sinusoidal frequencies of the unscaled time, then an MLP) whose
outputs are summed with the label embedding into the conditioning vector c of every
adaLN-Zero block (MeanFlow §1.2). Labels are class-conditional with a null class
(index ``num_classes``) for classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mfcli.errors import MFError

from .layers import (
    Conv2d,
    LabelEmbedder,
    LayerNorm,
    Linear,
    Mlp,
    SelfAttention,
    TimestepEmbedder,
    pick,
    resolve_variant,
)

_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "M": (16, 1024, 16), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
# MeanFlow Table 4 / DiT Table 1: (depth, hidden, heads) per size, patch 2, 4 or 8.
DiT_models = {
    f"DiT-{size}/{patch}": dict(depth=d, hidden=w, heads=n, patch=patch)
    for size, (d, w, n) in _SIZES.items()
    for patch in (2, 4, 8)
}


@dataclass
class DiTConfig:
    variant: str = "DiT-B/2"  # named size, see DiT_models (S, B, M, L, XL with patch 2, 4, 8)
    depth: int | None = None  # number of blocks (None = from the variant)
    hidden: int | None = None  # token width (None = from the variant)
    heads: int | None = None  # attention heads (None = from the variant)
    patch: int | None = None  # patch size (None = from the variant)
    mlp_ratio: float = 4.0  # MLP hidden width / token width
    dropout: float = 0.0  # dropout on attention and MLP outputs (MeanFlow ImageNet: 0)
    freq_dim: int = 256  # sinusoidal frequencies of each time embedder


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position table (MAE/DiT): half the channels encode the column, half the row. (T, dim)."""
    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")
    emb = np.concatenate([one_d(dim // 2, cols.reshape(-1)), one_d(dim // 2, rows.reshape(-1))], axis=1)
    return torch.from_numpy(emb).float()


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated by c and whose residuals are gated (adaLN-Zero)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads, bias=True, dropout=dropout)
        self.norm2 = LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (N, T, D)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C)


class DiT(nn.Module):
    """u_θ(z, t, h, y) on (C, H, W) inputs (latents or pixels). ``forward(z, t, h, cond)`` -> same shape as z."""

    has_v_head = False

    def __init__(self, cfg: DiTConfig, *, shape: tuple[int, ...], num_classes: int = 0):
        super().__init__()
        v = resolve_variant("DiT", DiT_models, cfg.variant)
        depth, hidden = pick(cfg.depth, v["depth"]), pick(cfg.hidden, v["hidden"])
        heads, patch = pick(cfg.heads, v["heads"]), pick(cfg.patch, v["patch"])
        if len(shape) != 3:
            raise MFError(f"DiT needs image-shaped data (C, H, W); got shape {tuple(shape)}. Use the 'mlp' backbone for flat data.")
        C, H, W = shape
        if H % patch or W % patch:
            raise MFError(f"DiT patch size {patch} does not divide the input size {H}x{W}; choose a patch that divides both.")
        if hidden % heads or (hidden // heads) % 2:
            raise MFError(f"DiT hidden={hidden} must be a multiple of heads={heads} with an even head size.")
        self.cfg, self.shape, self.num_classes, self.patch = cfg, tuple(shape), num_classes, patch
        self.conditions = frozenset({"y"}) if num_classes else frozenset()
        self.grid = (H // patch, W // patch)

        self.x_embedder = Conv2d(C, hidden, kernel_size=patch, stride=patch)
        self.register_buffer("pos_embed", sincos_2d(hidden, *self.grid)[None], persistent=False)  # (1, T, D)
        self.t_embedder = TimestepEmbedder(hidden, cfg.freq_dim)
        self.h_embedder = TimestepEmbedder(hidden, cfg.freq_dim)
        self.y_embedder = LabelEmbedder(num_classes, hidden) if num_classes else None
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads, cfg.mlp_ratio, cfg.dropout) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden, patch, C)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT initialisation: Xavier linears, N(0, 0.02) embedders, zero adaLN and output (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for emb in (self.t_embedder, self.h_embedder):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (*self.final_layer.adaLN_modulation[-1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        N, p, C = x.shape[0], self.patch, self.shape[0]
        gh, gw = self.grid
        x = x.reshape(N, gh, gw, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(N, C, gh * p, gw * p)

    def forward(self, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        x = self.x_embedder(z).flatten(2).transpose(1, 2) + self.pos_embed.to(z.dtype)  # (N, T, D)
        c = self.t_embedder(t) + self.h_embedder(h)  # (N, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder((cond or {}).get("y"), z.shape[0], z.device)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))  # (N, C, H, W)


def build_dit(cfg: DiTConfig, *, shape, num_classes: int = 0) -> DiT:
    return DiT(cfg, shape=shape, num_classes=num_classes)


COMPONENTS = {"dit": (build_dit, DiTConfig, "DiT with adaLN-Zero and (t, h) embedders (MeanFlow, ImageNet latents)")}
