"""Layers shared by the generative backbones (DiT, in-context DiT, U-Net).

The ``Linear``, ``Conv2d``, ``LayerNorm`` and ``GroupNorm`` here are the ``torch.nn``
modules (same parameters, same state-dict keys) routed through ``jvp_ops`` so that a
``torch.func.jvp`` through them costs about two forwards.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
import torch.nn.functional as F

from . import jvp_ops
from .attention import attention


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return jvp_ops.linear(x, self.weight, self.bias)


class Conv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super().forward(x)
        return jvp_ops.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return jvp_ops.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class GroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return jvp_ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): y = x / sqrt(mean(x²) + ε) · w over the last dim."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """GLIDE/DiT sinusoidal embedding [cos, sin] of unscaled times t in [0, 1] (MeanFlow §1.2). (B,) -> (B, dim).

    Computed in fp64 when t is fp64 (finite-difference checks), else in fp32.
    """
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = t.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Scalar -> vector: 256 sinusoidal frequencies, then Linear-SiLU-Linear (DiT, Peebles & Xie 2023)."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(Linear(freq_dim, hidden), nn.SiLU(), Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        w = self.mlp[0].weight
        return self.mlp(timestep_embedding(t, self.freq_dim).to(w.dtype))  # (B, hidden)


class LabelEmbedder(nn.Module):
    """Class labels -> vectors, with one extra row for the null class (index ``num_classes``) used by guidance."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        if y is None:  # no label given: the null class
            y = torch.full((batch,), self.num_classes, device=device, dtype=torch.long)
        return self.embedding_table(y)


def null_or(cond: dict | None, key: str, default):
    value = (cond or {}).get(key)
    return default if value is None else value


class Mlp(nn.Module):
    """Transformer MLP: Linear-GELU(tanh)-Linear, as in ViT/DiT."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1, self.fc2 = Linear(dim, hidden), Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x), approximate="tanh"))))


class SwiGLU(nn.Module):
    """SwiGLU MLP (Shazeer 2020): w2(silu(w1 x) ∘ w3 x), bias-free."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.w1, self.w3 = Linear(dim, hidden, bias=False), Linear(dim, hidden, bias=False)
        self.w2 = Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.drop(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def rope_tables(head_dim: int, seq_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles pos · θ^(-2i/d) (Su et al. 2021), each (seq_len, head_dim/2), fp64."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * freqs[None]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of the head dim by the angle table. x: (B, H, T, d)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, H, T, d/2)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class SelfAttention(nn.Module):
    """Multi-head self-attention on (B, T, D) tokens through ``attention`` (exact, memory-linear JVP).

    ``qk_norm``: RMSNorm on each head's queries and keys (iMF); ``rope`` tables are passed to forward.
    """

    def __init__(self, dim: int, heads: int, *, bias: bool = True, qk_norm: bool = False, dropout: float = 0.0):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = Linear(dim, 3 * dim, bias=bias)
        self.proj = Linear(dim, dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else None
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, d)
        q, k, v = qkv.unbind(0)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, k, v).transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.drop(self.proj(out))


def stop_tangent(x: torch.Tensor) -> torch.Tensor:
    """x without its forward-mode tangent, keeping its value and its gradient (``forward_ad.unpack_dual``).

    For auxiliary outputs whose tangent nobody reads: ops downstream then do no tangent work.
    """
    if jvp_ops.forward_ad_active() and not torch.compiler.is_compiling():
        return fwAD.unpack_dual(x).primal
    return x


def resolve_variant(kind: str, table: dict, name: str) -> dict:
    """The named variant's settings, or an MFError that lists the names and suggests the nearest."""
    if name in table:
        return dict(table[name])
    import difflib

    from mfcli.errors import MFError

    close = difflib.get_close_matches(name, list(table), n=1, cutoff=0.4)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise MFError(f"Unknown {kind} variant {name!r}.{hint} Valid variants: {', '.join(table)}.")


def pick(override, default):
    """A config override (None = keep the variant's value)."""
    return default if override is None else override
