"""Attention with an exact forward-mode rule: tangent vs finite differences and vs PyTorch's rules on the
plain-ops attention, blockwise memory, fused-mode gradients, vmap, torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import mf_backbones.attention as A
from mf_backbones.attention import attention, attention_backend, attention_math, attention_tangent
from mf_backbones.jvp_ops import custom_jvp_rules

from helpers_backbones import central_fd, rel_err


def qkv(B=2, H=3, T=30, d=8, dtype=torch.float64, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, d, generator=g, dtype=dtype) for _ in range(n)]


def math_jvp(primals, tangents):
    with attention_backend("math"), custom_jvp_rules(False):
        return torch.func.jvp(attention, primals, tangents)


@pytest.mark.parametrize("grad", [False, True])  # primal from the blockwise pass / from the fused kernel
@pytest.mark.parametrize("block", [256, 7])  # one block, and uneven blocks of 7 queries
def test_tangent_matches_finite_differences_and_math_rule_fp64(monkeypatch, block, grad):
    monkeypatch.setattr(A, "JVP_QUERY_BLOCK", block)
    q, k, v, dq, dk, dv = qkv()
    with torch.set_grad_enabled(grad):
        out, tangent = torch.func.jvp(attention, (q, k, v), (dq, dk, dv))
    ref_out, ref_tangent = math_jvp((q, k, v), (dq, dk, dv))
    assert rel_err(out, ref_out) < 1e-12
    assert rel_err(tangent, ref_tangent) < 1e-12
    assert rel_err(tangent, central_fd(attention_math, (q, k, v), (dq, dk, dv))) < 1e-8


@pytest.mark.parametrize("which", ["q", "k", "v", "qk", "kv"])
def test_partial_tangents(which):
    # tangents that are absent (None inside the rule) contribute nothing, the others exactly
    q, k, v, dq, dk, dv = qkv(T=12)
    zero = torch.zeros_like(q)
    tangents = tuple(t if name in which else zero for name, t in zip("qkv", (dq, dk, dv)))
    idx = ["qkv".index(c) for c in which]

    def f(*live):
        args = [q, k, v]
        for i, t in zip(idx, live):
            args[i] = t
        return attention(*args)

    _, tangent = torch.func.jvp(f, tuple((q, k, v)[i] for i in idx), tuple(tangents[i] for i in idx))
    _, reference = math_jvp((q, k, v), tangents)
    assert rel_err(tangent, reference) < 1e-12


def test_matches_math_backend_fp32_to_1e5():
    q, k, v, dq, dk, dv = qkv(B=2, H=4, T=64, d=32, dtype=torch.float32)
    out, tangent = torch.func.jvp(attention, (q, k, v), (dq, dk, dv))
    ref_out, ref_tangent = math_jvp((q, k, v), (dq, dk, dv))
    assert rel_err(out, ref_out) < 1e-5
    assert rel_err(tangent, ref_tangent) < 1e-5


def test_half_precision_tangent_is_accumulated_in_fp32():
    q, k, v, dq, dk, dv = qkv(T=40, d=16)
    exact = attention_tangent(q, k, v, attention_math(q, k, v), dq, dk, dv)
    low = [t.bfloat16() for t in (q, k, v, dq, dk, dv)]
    _, tangent = torch.func.jvp(attention, tuple(low[:3]), tuple(low[3:]))
    assert tangent.dtype == torch.bfloat16
    assert rel_err(tangent, exact) < 3e-2  # bf16 inputs carry ~3 significant digits


class MaxNumel(TorchDispatchMode):
    """Largest tensor any op creates while active."""

    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.max = max(self.max, t.numel())
        return out


def test_tangent_never_holds_the_full_score_matrix(monkeypatch):
    monkeypatch.setattr(A, "JVP_QUERY_BLOCK", 32)
    B, H, T, d = 1, 2, 512, 16
    q, k, v, dq, dk, dv = qkv(B, H, T, d, dtype=torch.float32)
    with MaxNumel() as custom:
        torch.func.jvp(attention, (q, k, v), (dq, dk, dv))
    with MaxNumel() as plain:
        math_jvp((q, k, v), (dq, dk, dv))
    assert plain.max >= B * H * T * T  # the math route materialises (T, T) scores
    assert custom.max <= B * H * 32 * T  # ours: one (32, T) block of queries at a time
    # and the block bound keeps that linear in T: twice the length, twice the largest block
    q2, k2, v2, dq2, dk2, dv2 = qkv(B, H, 2 * T, d, dtype=torch.float32)
    with MaxNumel() as longer:
        torch.func.jvp(attention, (q2, k2, v2), (dq2, dk2, dv2))
    assert longer.max <= 2 * custom.max


def test_element_budget_shrinks_the_block(monkeypatch):
    monkeypatch.setattr(A, "JVP_BLOCK_ELEMENTS", 2 * 3 * 40 * 5)  # 5 queries per block for (2, 3, T=40)
    q, k, v, dq, dk, dv = qkv(T=40)
    assert A._query_block(q, k) == 5
    _, tangent = torch.func.jvp(attention, (q, k, v), (dq, dk, dv))
    assert rel_err(tangent, math_jvp((q, k, v), (dq, dk, dv))[1]) < 1e-12


def test_eager_jvp_uses_fused_primal_and_custom_rule(monkeypatch):
    seen = {"sdpa": 0, "tangent": 0}
    sdpa, tangent_fn = F.scaled_dot_product_attention, A.attention_tangent

    def spy_sdpa(*a, **kw):
        seen["sdpa"] += 1
        return sdpa(*a, **kw)

    def spy_tangent(*a, **kw):
        seen["tangent"] += 1
        return tangent_fn(*a, **kw)

    monkeypatch.setattr(A.F, "scaled_dot_product_attention", spy_sdpa)
    monkeypatch.setattr(A, "attention_tangent", spy_tangent)
    q, k, v, dq, dk, dv = qkv(T=10)
    leaves = tuple(x.clone().requires_grad_() for x in (q, k, v))
    torch.func.jvp(attention, leaves, (dq, dk, dv))  # grad mode on: fused primal + custom tangent
    assert seen == {"sdpa": 1, "tangent": 1}
    attention(q, k, v)  # outside forward AD: the fused kernel alone
    assert seen == {"sdpa": 2, "tangent": 1}
    with torch.no_grad():  # a tangent pass without gradients: one blockwise pass for both
        out, tangent = torch.func.jvp(attention, leaves, (dq, dk, dv))
    assert seen == {"sdpa": 2, "tangent": 1}
    ref_out, ref_tangent = math_jvp((q, k, v), (dq, dk, dv))
    assert rel_err(out, ref_out) < 1e-12 and rel_err(tangent, ref_tangent) < 1e-12


def assert_gradients_match_math(out, leaves):
    """Gradients of a random linear function of ``out`` (attention of ``leaves``) equal those of
    plain-ops attention."""
    cot = torch.randn_like(out)
    grads = torch.autograd.grad((out * cot).sum(), leaves)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ref = torch.autograd.grad((attention_math(*ref_leaves) * cot).sum(), ref_leaves)
    for g, r in zip(grads, ref):
        assert rel_err(g, r) < 1e-12


def test_fused_mode_gradients_flow_through_the_primal():
    q, k, v, dq, dk, dv = qkv(T=20)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = torch.func.jvp(attention, tuple(leaves), (dq, dk, dv))
    assert_gradients_match_math(out, leaves)


def test_gradient_of_the_tangent_itself():
    # MMF-style objectives back-propagate through du/dt: the rule is made of differentiable ops
    q, k, v, dq, dk, dv = qkv(B=1, H=1, T=6, d=4)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    _, tangent = torch.func.jvp(attention, tuple(leaves), (dq, dk, dv))
    grads = torch.autograd.grad(tangent.square().sum(), leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    _, ref_tangent = torch.func.jvp(attention_math, tuple(ref_leaves), (dq, dk, dv))
    ref = torch.autograd.grad(ref_tangent.square().sum(), ref_leaves)
    for g, r in zip(grads, ref):
        assert rel_err(g, r) < 1e-10


def test_jacfwd_vmaps_the_rule():
    q, k, v = qkv(B=1, H=1, T=5, d=3, n=3)
    jac = torch.func.jacfwd(attention, argnums=(0, 1, 2))(q, k, v)
    ref = torch.func.jacfwd(attention_math, argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(jac, ref):
        assert rel_err(a, b) < 1e-12


def test_compiled_jvp_equals_eager():
    # Dynamo drops custom forward-mode rules (pytorch#192985); while tracing, the dispatch uses
    # plain blockwise ops whose default rules are exact.
    q, k, v, dq, dk, dv = qkv(T=24, dtype=torch.float32)
    eager = torch.func.jvp(attention, (q, k, v), (dq, dk, dv))
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: torch.func.jvp(attention, a[:3], a[3:]), backend="aot_eager", fullgraph=True)
    out, tangent = compiled(q, k, v, dq, dk, dv)
    assert rel_err(out, eager[0]) < 1e-6
    assert rel_err(tangent, eager[1]) < 1e-6


@pytest.mark.parametrize("restricted", [False, True])
def test_fused_primal_kernels_keep_what_their_backward_needs(monkeypatch, restricted):
    """On CUDA the fused-mode primal runs with flash or math only (the memory-efficient and cuDNN
    kernels drop their softmax statistics inside torch.func.jvp and their backward then fails).
    The same restriction applied on the CPU must be in force during the call, leave the other
    calls alone and keep the gradients exact."""
    if restricted:
        monkeypatch.setitem(A.FUSED_PRIMAL_BACKENDS, "cpu", A.FUSED_PRIMAL_BACKENDS["cuda"])
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy_sdpa(*a, **kw):
        seen.append((torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled(),
                     torch.backends.cuda.math_sdp_enabled()))
        return sdpa(*a, **kw)

    monkeypatch.setattr(A.F, "scaled_dot_product_attention", spy_sdpa)
    q, k, v, dq, dk, dv = qkv(T=20)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, _ = torch.func.jvp(attention, tuple(leaves), (dq, dk, dv))
    attention(q, k, v)  # outside forward AD: never restricted
    before = (torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled(), True)
    assert seen == [(False, False, True) if restricted else before, before]
    assert_gradients_match_math(out, leaves)


def test_math_primal_at_long_sequences_says_so(monkeypatch):
    monkeypatch.setitem(A.FUSED_PRIMAL_BACKENDS, "cpu", A.FUSED_PRIMAL_BACKENDS["cuda"])
    monkeypatch.setattr(A, "MATH_PRIMAL_WARN_T", 16)
    monkeypatch.setattr(A, "_warned_math_primal", False)
    q, k, v, dq, dk, dv = (t.float() for t in qkv(T=20))
    leaves = tuple(t.clone().requires_grad_() for t in (q, k, v))
    with pytest.warns(UserWarning, match="score matrix"):
        torch.func.jvp(attention, leaves, (dq, dk, dv))


def test_attention_without_tangents_inside_a_jvp_is_restricted_too(monkeypatch):
    """q, k and v without tangents inside torch.func.jvp, gradients on: the call still cannot see
    that they require gradients, so it takes the same kernels as the fused primal."""
    monkeypatch.setitem(A.FUSED_PRIMAL_BACKENDS, "cpu", A.FUSED_PRIMAL_BACKENDS["cuda"])
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy_sdpa(*a, **kw):
        seen.append(torch.backends.cuda.mem_efficient_sdp_enabled())
        return sdpa(*a, **kw)

    monkeypatch.setattr(A.F, "scaled_dot_product_attention", spy_sdpa)
    q, k, v, x, dx, _ = qkv(T=12)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, tangent = torch.func.jvp(lambda x_: attention(*leaves) + x_, (x,), (dx,))
    assert seen == [False] and torch.equal(tangent, dx)
    assert_gradients_match_math(out, leaves)
