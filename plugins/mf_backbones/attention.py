"""Softmax attention with an exact, memory-linear forward-mode (JVP) rule.

The fused ``scaled_dot_product_attention`` kernels have no forward-mode rule, and the
math fallback materialises the (T, T) matrix and its tangent. Here the primal is the
fused kernel and the tangent is computed exactly, one block of queries at a time, so
at most a (C, T) block of scores lives at once (C ≤ ``JVP_QUERY_BLOCK`` queries, fewer
when B·H·T is large, see ``JVP_BLOCK_ELEMENTS``): memory linear in T.

Tangent of O = softmax(S) V with S = Q Kᵀ / √d (the same derivation as in sCM, Lu &
Song 2025, Appendix F). With P = softmax(S) row-wise:

    dS = (dQ Kᵀ + Q dKᵀ) / √d
    dP = P ∘ (dS - rowsum(P ∘ dS))                    (softmax JVP)
    dO = dP V + P dV = (P ∘ dS) V - rowsum(P ∘ dS) ∘ O + P dV

``rowsum(P ∘ dS)`` is a (T, 1) column that broadcasts over the head dimension of O.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .jvp_ops import custom_jvp_active, forward_ad_active

__all__ = [
    "attention",
    "attention_math",
    "attention_blockwise",
    "attention_tangent",
    "attention_backend",
    "JVPAttention",
    "BACKENDS",
    "JVP_BLOCK_ELEMENTS",
    "JVP_QUERY_BLOCK",
]

BACKENDS = ("auto", "math", "blockwise")
_BACKEND = "auto"

# A block holds at most JVP_QUERY_BLOCK queries (so its (B, H, C, T) scores grow linearly
# in T) and at most JVP_BLOCK_ELEMENTS elements (64 MiB in fp32, for large B x H).
JVP_QUERY_BLOCK = 256
JVP_BLOCK_ELEMENTS = 2**24


@contextmanager
def attention_backend(name: str):
    """Select how ``attention`` computes: "auto" (fused primal, exact blockwise tangent),
    "math" (plain ``softmax(QKᵀ/√d)V``, default autograd rules, T×T memory) or
    "blockwise" (plain ops over query blocks)."""
    global _BACKEND
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {BACKENDS}")
    prev, _BACKEND = _BACKEND, name
    try:
        yield
    finally:
        _BACKEND = prev


def _query_block(q: torch.Tensor, k: torch.Tensor) -> int:
    rows = math.prod(q.shape[:-2])  # batch x heads
    T_q, T_k = q.shape[-2], k.shape[-2]
    return max(1, min(T_q, JVP_QUERY_BLOCK, JVP_BLOCK_ELEMENTS // max(1, rows * T_k)))


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference attention in plain ops (the T×T matrix is materialised). (..., T, d) -> (..., T, d)."""
    scale = q.shape[-1] ** -0.5
    return torch.softmax((q * scale) @ k.transpose(-2, -1), dim=-1) @ v


def attention_blockwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention in plain ops over blocks of queries: any AD rule applied to it is exact and
    never holds more than a (C, T) block of scores."""
    C = _query_block(q, k)
    if C >= q.shape[-2]:
        return attention_math(q, k, v)
    return torch.cat([attention_math(q[..., s : s + C, :], k, v) for s in range(0, q.shape[-2], C)], dim=-2)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # the tangent is accumulated in fp32 when the activations are half precision
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def attention_tangent(q, k, v, o, dq=None, dk=None, dv=None) -> torch.Tensor:
    """Exact tangent dO of O = attention(Q, K, V) along (dQ, dK, dV) (None = zero), blockwise over queries.

    Shapes (..., T, d); ``o`` is the primal output. See the module docstring for the formula.
    """
    wt = _work_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5
    # contiguous (B, H, T, d) operands once, so the block matmuls below do not copy
    k_, v_, o_ = (x.to(wt).contiguous() for x in (k, v, o))
    # dS = [dQ, Q] [K, dK]ᵀ / √d as one matmul per block when both tangents exist
    if dq is not None and dk is not None:
        kk_t = torch.cat([k_, dk.to(wt)], dim=-1).transpose(-2, -1)  # (..., 2d, T)
    elif dk is not None:
        kk_t = dk.to(wt).contiguous().transpose(-2, -1)
    else:
        kk_t = k_.transpose(-2, -1)
    k_t = k_.transpose(-2, -1)
    dv_ = dv.to(wt).contiguous() if dv is not None else None
    C = _query_block(q, k)
    blocks = []
    for s in range(0, q.shape[-2], C):
        qc = q[..., s : s + C, :].to(wt) * scale  # (..., C, d)
        p = torch.softmax(qc @ k_t, dim=-1)  # (..., C, T)
        out = p @ dv_ if dv_ is not None else None
        if dq is not None or dk is not None:
            if dq is not None and dk is not None:
                qq = torch.cat([dq[..., s : s + C, :].to(wt) * scale, qc], dim=-1)
            elif dq is not None:
                qq = dq[..., s : s + C, :].to(wt) * scale
            else:
                qq = qc
            pds = (qq @ kk_t).mul_(p)  # P ∘ dS, (..., C, T)
            del p
            term = pds @ v_ - pds.sum(-1, keepdim=True) * o_[..., s : s + C, :]
            out = term if out is None else out + term
        blocks.append(out)
    do = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-2)
    return do.to(q.dtype)


class JVPAttention(torch.autograd.Function):
    """O = softmax(QKᵀ/√d)V with the fused kernel as primal and ``attention_tangent`` as its JVP.

    ``backward`` differentiates the fused kernel again (its own flash/efficient backward),
    so the primal of a "fused" ``torch.func.jvp`` can be back-propagated.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v):
        if torch.compiler.is_compiling() and forward_ad_active():
            # Dynamo inlines this forward and drops `jvp` (pytorch#192985); plain ops
            # keep the tangent exact without the (T, T) matrix.
            return attention_blockwise(q, k, v)
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v = inputs
        ctx.set_materialize_grads(False)
        ctx.save_for_forward(q, k, v, output)
        ctx.save_for_backward(q, k, v)

    @staticmethod
    def jvp(ctx, dq, dk, dv):
        q, k, v, o = ctx.saved_tensors
        return attention_tangent(q, k, v, o, dq, dk, dv)

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors
        if grad is None:
            return None, None, None
        needs = ctx.needs_input_grad
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(n) for t, n in zip((q, k, v), needs)]
            out = F.scaled_dot_product_attention(*leaves)
            wrt = [t for t, n in zip(leaves, needs) if n]
            grads = iter(torch.autograd.grad(out, wrt, grad))
        return tuple(next(grads) if n else None for n in needs)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Multi-head softmax attention, (B, H, T, d) -> (B, H, T, d), usable inside ``torch.func.jvp``.

    "auto": outside forward-mode AD this is ``F.scaled_dot_product_attention`` (fused
    kernels, their backward). Inside ``torch.func.jvp`` (eager) it is ``JVPAttention``:
    fused primal, exact blockwise tangent. While Dynamo traces forward-mode AD it is
    ``attention_blockwise``, since a custom ``jvp`` would be dropped silently.
    """
    backend = backend or _BACKEND
    if backend == "math":
        return attention_math(q, k, v)
    if backend == "blockwise":
        return attention_blockwise(q, k, v)
    if torch.compiler.is_compiling():
        return attention_blockwise(q, k, v) if forward_ad_active() else F.scaled_dot_product_attention(q, k, v)
    if forward_ad_active():
        # the fused kernels have no forward-mode rule; with custom rules switched off
        # (baselines) the plain-ops reference is the only exact option
        return JVPAttention.apply(q, k, v) if custom_jvp_active() else attention_math(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)
