"""DiT with in-context conditioning as improved MeanFlow uses it (iMF; Geng et al. 2025, arXiv 2512.02012, §2.3).

No adaLN. Every condition becomes a few learnable prefix tokens, each offset by a
broadcast embedding of its value, placed before the patch tokens:

    [class (8) + e(y) | ω (4) + e(1 - 1/ω) | t_min (2) + e(t_min) | t_max (2) + e(t_max) | time (4) + e(h) | patches]

The network is noise-unconditional: it reads h = t - r but not t (following Sun et al.
2025, "Is noise conditioning necessary?"); ``t`` is accepted for the common interface
and ignored. Blocks are pre-RMSNorm with 1-D RoPE over the whole sequence, QK-RMSNorm,
bias-free attention projections, a SwiGLU MLP of width 8/3·D and zero-initialised
per-channel residual gates. A trunk of ``depth - head_depth`` blocks is shared by the
u head and the auxiliary v head (``head_depth`` blocks each); prefix tokens are
dropped before each head's final RMSNorm + linear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mfcli.errors import MFError

from .layers import (
    Conv2d,
    LabelEmbedder,
    Linear,
    RMSNorm,
    SelfAttention,
    SwiGLU,
    TimestepEmbedder,
    null_or,
    pick,
    resolve_variant,
    rope_tables,
    stop_tangent,
)

# iMF Table (§2.3): depth counts the shared trunk plus the u head; head_depth = 8.
iMF_models = {
    "iMF-B/2": dict(depth=12, hidden=768, heads=12, patch=2, head_depth=8),
    "iMF-M/2": dict(depth=24, hidden=768, heads=12, patch=2, head_depth=8),
    "iMF-L/2": dict(depth=32, hidden=1024, heads=16, patch=2, head_depth=8),
    "iMF-XL/2": dict(depth=48, hidden=1024, heads=16, patch=2, head_depth=8),
}


@dataclass
class InContextDiTConfig:
    variant: str = "iMF-B/2"  # named size, see iMF_models
    depth: int | None = None  # shared trunk + u head blocks (None = from the variant)
    hidden: int | None = None  # token width (None = from the variant)
    heads: int | None = None  # attention heads (None = from the variant)
    patch: int | None = None  # patch size (None = from the variant)
    head_depth: int | None = None  # blocks in each of the u and v heads (None = from the variant)
    v_head: bool = True  # build the auxiliary v head (training); False = inference-only network
    mlp_ratio: float = 8 / 3  # SwiGLU hidden width / token width
    class_tokens: int = 8  # prefix tokens for the label
    omega_tokens: int = 4  # prefix tokens for the guidance scale ω
    interval_tokens: int = 2  # prefix tokens for each of t_min and t_max
    time_tokens: int = 4  # prefix tokens for h = t - r
    rope_theta: float = 10000.0  # RoPE base
    dropout: float = 0.0  # dropout on attention and MLP outputs
    freq_dim: int = 256  # sinusoidal frequencies of each scalar embedder
    init_constant: float = 0.32  # block weights ~ N(0, (c / sqrt(fan_in))²) ("scaled variance")


class Block(nn.Module):
    """x + g_a ∘ Attn(RMSNorm(x)) then x + g_m ∘ SwiGLU(RMSNorm(x)), gates zero at init."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = SelfAttention(dim, heads, bias=False, qk_norm=True, dropout=dropout)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio), dropout)
        self.attn_scale = nn.Parameter(torch.zeros(dim))
        self.mlp_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope) * self.attn_scale
        x = x + self.mlp(self.norm2(x)) * self.mlp_scale
        return x  # (N, T, D)


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.linear = Linear(dim, patch * patch * out_channels)

    def forward(self, x):
        return self.linear(self.norm(x))


class InContextDiT(nn.Module):
    """u_θ(z, h, ω, t_min, t_max, y) and optionally the auxiliary v_θ from the same trunk.

    ``cond``: "y" labels (None = null class), "omega" (default 1 = no guidance),
    "t_min"/"t_max" (default 0/1), "return_v" (True: return (u, v)), "v_tangent"
    (default True; False drops the v head's forward-mode tangent, which the iMF loss
    never reads: v keeps its value and gradients, the JVP skips the v head's tangent).
    """

    def __init__(self, cfg: InContextDiTConfig, *, shape: tuple[int, ...], num_classes: int = 0):
        super().__init__()
        v = resolve_variant("in-context DiT", iMF_models, cfg.variant)
        depth, hidden = pick(cfg.depth, v["depth"]), pick(cfg.hidden, v["hidden"])
        heads, patch = pick(cfg.heads, v["heads"]), pick(cfg.patch, v["patch"])
        head_depth = pick(cfg.head_depth, v["head_depth"])
        if len(shape) != 3:
            raise MFError(f"dit-ic needs image-shaped data (C, H, W); got shape {tuple(shape)}.")
        C, H, W = shape
        if H % patch or W % patch:
            raise MFError(f"dit-ic patch size {patch} does not divide the input size {H}x{W}; choose a patch that divides both.")
        if hidden % heads or (hidden // heads) % 2:
            raise MFError(f"dit-ic hidden={hidden} must be a multiple of heads={heads} with an even head size (RoPE).")
        if not 1 <= head_depth <= depth:
            raise MFError(f"dit-ic head_depth={head_depth} must be between 1 and depth={depth}.")
        self.cfg, self.shape, self.num_classes, self.patch = cfg, tuple(shape), num_classes, patch
        self.grid = (H // patch, W // patch)
        self.has_v_head = bool(cfg.v_head)
        keys = {"y", "omega", "t_min", "t_max"} if num_classes else {"omega", "t_min", "t_max"}
        self.conditions = frozenset(keys | ({"return_v", "v_tangent"} if self.has_v_head else set()))

        self.x_embedder = Conv2d(C, hidden, kernel_size=patch, stride=patch)
        self.h_embedder = TimestepEmbedder(hidden, cfg.freq_dim)
        self.omega_embedder = TimestepEmbedder(hidden, cfg.freq_dim)
        self.t_min_embedder = TimestepEmbedder(hidden, cfg.freq_dim)
        self.t_max_embedder = TimestepEmbedder(hidden, cfg.freq_dim)
        # unconditional data still gets class tokens (all null) so the layout stays fixed
        self.y_embedder = LabelEmbedder(num_classes, hidden)
        self.class_tokens = nn.Parameter(torch.empty(cfg.class_tokens, hidden))
        self.omega_tokens = nn.Parameter(torch.empty(cfg.omega_tokens, hidden))
        self.t_min_tokens = nn.Parameter(torch.empty(cfg.interval_tokens, hidden))
        self.t_max_tokens = nn.Parameter(torch.empty(cfg.interval_tokens, hidden))
        self.time_tokens = nn.Parameter(torch.empty(cfg.time_tokens, hidden))
        self.num_prefix = cfg.class_tokens + cfg.omega_tokens + 2 * cfg.interval_tokens + cfg.time_tokens
        cos, sin = rope_tables(hidden // heads, self.num_prefix + self.grid[0] * self.grid[1], cfg.rope_theta)
        self.register_buffer("rope_cos", cos.float(), persistent=False)  # (T, d/2)
        self.register_buffer("rope_sin", sin.float(), persistent=False)

        block = lambda: Block(hidden, heads, cfg.mlp_ratio, cfg.dropout)  # noqa: E731
        self.shared_blocks = nn.ModuleList([block() for _ in range(depth - head_depth)])
        self.u_blocks = nn.ModuleList([block() for _ in range(head_depth)])
        self.u_final = FinalLayer(hidden, patch, C)
        if self.has_v_head:
            self.v_blocks = nn.ModuleList([block() for _ in range(head_depth)])
            self.v_final = FinalLayer(hidden, patch, C)
        self.initialize_weights()

    def initialize_weights(self):
        """iMF initialisation: N(0, (c/√fan_in)²) weights (c = 0.32 in blocks, 1 in embedders),
        N(0, 1/D) tokens, Xavier patch embedding, zero gates and zero output layers."""
        c = self.cfg.init_constant
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                std = (c if "blocks" in name else 1.0) / math.sqrt(m.in_features)
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=1.0 / math.sqrt(self.x_embedder.out_channels))
        D = self.x_embedder.out_channels
        for tok in (self.class_tokens, self.omega_tokens, self.t_min_tokens, self.t_max_tokens, self.time_tokens):
            nn.init.normal_(tok, std=1.0 / math.sqrt(D))
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for final in [self.u_final] + ([self.v_final] if self.has_v_head else []):
            nn.init.zeros_(final.linear.weight)
            nn.init.zeros_(final.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        N, p, C = x.shape[0], self.patch, self.shape[0]
        gh, gw = self.grid
        x = x.reshape(N, gh, gw, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(N, C, gh * p, gw * p)

    def _sequence(self, z, h, cond):
        N, dev = z.shape[0], z.device
        omega = null_or(cond, "omega", torch.ones(N, device=dev, dtype=h.dtype))
        t_min = null_or(cond, "t_min", torch.zeros(N, device=dev, dtype=h.dtype))
        t_max = null_or(cond, "t_max", torch.ones(N, device=dev, dtype=h.dtype))
        prefix = [
            self.class_tokens + self.y_embedder((cond or {}).get("y"), N, dev)[:, None],
            self.omega_tokens + self.omega_embedder(1 - 1 / omega)[:, None],  # ω embedded as 1 - 1/ω
            self.t_min_tokens + self.t_min_embedder(t_min)[:, None],
            self.t_max_tokens + self.t_max_embedder(t_max)[:, None],
            self.time_tokens + self.h_embedder(h)[:, None],
        ]
        patches = self.x_embedder(z).flatten(2).transpose(1, 2)  # (N, T_img, D)
        return torch.cat([p.to(patches.dtype) for p in prefix] + [patches], dim=1)  # (N, T, D)

    def _head(self, x, blocks, final, rope):
        for block in blocks:
            x = block(x, rope)
        return self.unpatchify(final(x[:, self.num_prefix :]))  # (N, C, H, W)

    def forward(self, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor, cond: dict | None = None):
        del t  # noise-unconditional: only h = t - r is read (iMF §2.3)
        rope = (self.rope_cos, self.rope_sin)
        x = self._sequence(z, h, cond)
        for block in self.shared_blocks:
            x = block(x, rope)
        u = self._head(x, self.u_blocks, self.u_final, rope)
        if not (cond or {}).get("return_v"):
            return u
        if not self.has_v_head:
            raise MFError("This dit-ic network was built without the v head (v_head = false); it cannot return v.")
        x_v = x if (cond or {}).get("v_tangent", True) else stop_tangent(x)
        return u, self._head(x_v, self.v_blocks, self.v_final, rope)


def build_dit_ic(cfg: InContextDiTConfig, *, shape, num_classes: int = 0) -> InContextDiT:
    return InContextDiT(cfg, shape=shape, num_classes=num_classes)


COMPONENTS = {
    "dit-ic": (build_dit_ic, InContextDiTConfig, "DiT with in-context condition tokens and an auxiliary v head (improved MeanFlow)")
}
