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
import warnings
from contextlib import contextmanager

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .jvp_ops import custom_jvp_active, forward_ad_active, unpack

__all__ = [
    "attention",
    "attention_math",
    "attention_blockwise",
    "attention_tangent",
    "attention_and_tangent",
    "attention_backend",
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


# Kernels for a fused primal whose gradient is taken later ("fused" JVP mode), per device type.
# Inside torch.func.jvp the kernel cannot see that its inputs require gradients, and CUDA's
# memory-efficient and cuDNN kernels then skip the softmax statistics (log-sum-exp) that their
# backward reads: the backward fails with "LSE is not correctly aligned" (seen on an H200, DiT-B/2,
# fp32 JVP). Flash (half precision) always keeps them and math is plain ops. The CPU kernels always
# keep them. Not listed: every backend.
FUSED_PRIMAL_BACKENDS: dict[str, tuple[SDPBackend, ...]] = {"cuda": (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)}
# above this many keys, say once that the math kernel holds the (T, T) matrix for the backward
MATH_PRIMAL_WARN_T = 1024
_warned_math_primal = False


def _primal_for_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` restricted to kernels whose backward works when the
    call was made inside ``torch.func.jvp`` (see ``FUSED_PRIMAL_BACKENDS``)."""
    global _warned_math_primal
    backends = FUSED_PRIMAL_BACKENDS.get(q.device.type)
    if backends is None:
        return F.scaled_dot_product_attention(q, k, v)
    if q.dtype == torch.float32 and k.shape[-2] > MATH_PRIMAL_WARN_T and not _warned_math_primal:
        _warned_math_primal = True
        warnings.warn(f"jvp_mode 'fused' on {q.device.type} in fp32: the attention primal uses the math kernel, which "
                      f"holds the ({k.shape[-2]}, {k.shape[-2]}) score matrix for the backward; jvp_mode 'split' does not",
                      stacklevel=2)
    with sdpa_kernel(list(backends)):
        return F.scaled_dot_product_attention(q, k, v)


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
    return _blockwise_jvp(q, k, v, o, dq, dk, dv)[1]


def attention_and_tangent(q, k, v, dq=None, dk=None, dv=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, dO) from one pass over query blocks: the primal reuses the block's softmax P.

    For a tangent pass without gradients (MeanFlow's "split" JVP) this replaces the fused
    primal call, which would compute Q Kᵀ and its softmax a second time; ``P [V, dV]`` gives
    O and P dV in one matmul.
    """
    return _blockwise_jvp(q, k, v, None, dq, dk, dv)


def _blockwise_jvp(q, k, v, o, dq, dk, dv) -> tuple[torch.Tensor, torch.Tensor]:
    wt = _work_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5
    lead, T, d = q.shape[:-2], q.shape[-2], q.shape[-1]
    Tk = k.shape[-2]
    both = dq is not None and dk is not None

    # Operands as (B·H, T, n·d) contiguous blocks (batched 3-D matmuls are ~1.5x faster than
    # 4-D ones on CPU), each written in one pass from the (usually head-strided) inputs;
    # operands used together sit side by side, so the block matmuls below take views and
    # never copy: [dQ, Q]/√d and [K, dK] (dS = [dQ, Q] [K, dK]ᵀ / √d as one matmul), [V, dV]
    # (O and P dV from one matmul when the primal is wanted).
    def side_by_side(xs, mul=None):
        if torch.is_grad_enabled():  # gradients may flow ("fused" JVP mode; requires_grad is not visible inside torch.func)
            out = torch.cat([x.to(wt) * mul if mul is not None else x.to(wt) for x in xs], dim=-1)
        else:
            out = torch.empty(*lead, xs[0].shape[-2], len(xs) * d, dtype=wt, device=q.device)
            for i, x in enumerate(xs):
                part = out[..., i * d:(i + 1) * d]
                torch.mul(x, mul, out=part) if mul is not None else part.copy_(x)
        return out.reshape(-1, out.shape[-2], out.shape[-1])

    if both:
        qq = side_by_side([dq, q], scale)
        q_s, dq_s = qq[..., d:], None
        kk = side_by_side([k, dk])
        k_t, dk_t = kk[..., :d].transpose(1, 2), None
        kk_t = kk.transpose(1, 2)
    else:
        q_s = side_by_side([q], scale)
        dq_s = side_by_side([dq], scale) if dq is not None else None
        k_t = side_by_side([k]).transpose(1, 2)
        dk_t = side_by_side([dk]).transpose(1, 2) if dk is not None else None
    vv = None
    if o is None:  # the primal wanted too: P [V, dV] gives O and P dV in one matmul
        vv = side_by_side([v, dv] if dv is not None else [v])
        v_, dv_, o_ = vv[..., :d], None, None
    else:
        v_ = side_by_side([v])
        dv_ = side_by_side([dv]) if dv is not None else None
        o_ = o.to(wt).reshape(-1, T, d)
    C = _query_block(q, k)
    outs, blocks = [], []
    for s in range(0, T, C):
        qc = q_s[:, s : s + C]  # (BH, C, d), already scaled
        p = torch.softmax(torch.bmm(qc, k_t), dim=-1)  # (BH, C, Tk)
        p_dv = None
        if vv is not None:
            pv = torch.bmm(p, vv)
            oc = pv[..., :d]
            p_dv = pv[..., d:] if dv is not None else None
            outs.append(oc)
        else:
            oc = o_[:, s : s + C]
        out = None
        if dq is not None or dk is not None:
            if both:
                a, b = qq[:, s : s + C], kk_t
            elif dq is not None:
                a, b = dq_s[:, s : s + C], k_t
            else:
                a, b = qc, dk_t
            pds = torch.bmm(a, b).mul_(p)  # P ∘ dS, (BH, C, Tk)
            # (P ∘ dS) V - rowsum(P ∘ dS) ∘ O (+ P dV) in one fused call
            base = oc * -pds.sum(-1, keepdim=True)
            if p_dv is not None:
                base += p_dv
            out = torch.baddbmm(base, pds, v_)
            del pds
        elif p_dv is not None:
            out = p_dv
        if dv_ is not None:  # the tangent of V when P dV did not come with the primal
            out = torch.bmm(p, dv_) if out is None else torch.baddbmm(out, p, dv_)
        if out is None:  # no tangent at all
            out = torch.zeros_like(oc)
        blocks.append(out)
    do = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
    if o is None:
        o_full = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        o = o_full.reshape(*lead, T, d).to(q.dtype)
    return o, do.reshape(*lead, T, d).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Multi-head softmax attention, (B, H, T, d) -> (B, H, T, d), usable inside ``torch.func.jvp``.

    "auto": outside forward-mode AD this is ``F.scaled_dot_product_attention`` (fused
    kernels, their backward). Inside ``torch.func.jvp`` (eager), with grad mode on (gradients
    may flow through the primal: the "fused" JVP mode), the primal is
    still the fused kernel, on the primal parts of the dual inputs, and the tangent is
    ``attention_tangent`` (exact, blockwise); the two are joined into the dual output
    (see ``jvp_ops``), so gradients of the primal go through the fused kernel's own
    backward. A tangent pass under ``torch.no_grad()`` ("split" mode) takes
    primal and tangent from one blockwise pass (``attention_and_tangent``), which computes
    each block's softmax once instead of twice. While Dynamo traces forward-mode AD it is
    ``attention_blockwise``: plain ops whose default rules are exact and never hold the
    (T, T) matrix.
    """
    backend = backend or _BACKEND
    if backend == "math":
        return attention_math(q, k, v)
    if backend == "blockwise":
        return attention_blockwise(q, k, v)
    if torch.compiler.is_compiling():
        return attention_blockwise(q, k, v) if forward_ad_active() else F.scaled_dot_product_attention(q, k, v)
    if forward_ad_active():
        if not custom_jvp_active():
            # custom rules switched off (baselines): the fused kernels have no forward-mode
            # rule, the plain-ops reference is the exact option
            return attention_math(q, k, v)
        (qp, dq), (kp, dk), (vp, dv) = unpack(q), unpack(k), unpack(v)
        if dq is not None or dk is not None or dv is not None:
            if torch.is_grad_enabled():
                # gradients may flow (inside torch.func.jvp requires_grad is not visible, so grad
                # mode decides): the fused kernel's primal and backward ("fused" JVP mode)
                out = _primal_for_backward(qp, kp, vp)
                return fwAD.make_dual(out, attention_tangent(qp, kp, vp, out, dq, dk, dv))
            # a tangent pass without gradients: one blockwise pass gives both
            return fwAD.make_dual(*attention_and_tangent(qp, kp, vp, dq, dk, dv))
        if torch.is_grad_enabled():  # no tangent here, but a gradient may still flow through this call
            return _primal_for_backward(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)
