"""On a CUDA device (skipped elsewhere): the fused-mode JVP through attention and its backward,
as `jvp_mode = "fused"` runs them. Inside torch.func.jvp the memory-efficient and cuDNN kernels
drop the softmax statistics their backward reads: a DiT step in fused mode failed on an H200 with
"LSE is not correctly aligned (strideH)" before the fused primal was restricted to flash and math
on CUDA. These tests are written to catch that on a GPU (fp32 inputs of head size 64 are what
the memory-efficient kernel takes)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mf_backbones.attention import attention, attention_math

from helpers_backbones import rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@contextlib.contextmanager
def no_tf32():
    """fp32 matmuls in full precision (mf train turns TF32 on for its run)."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_fused_mode_jvp_and_backward_on_cuda(dtype, tol):
    with no_tf32():
        check_fused_mode_jvp_and_backward(dtype, tol)


def check_fused_mode_jvp_and_backward(dtype, tol):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dq, dk, dv = (torch.randn(4, 12, 256, 64, device="cuda", generator=g).to(dtype) for _ in range(6))  # DiT-B/2 heads
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, tangent = torch.func.jvp(attention, tuple(leaves), (dq, dk, dv))
    cot = torch.randn_like(out)
    grads = torch.autograd.grad((out.float() * cot.float()).sum(), leaves)

    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_tangent = torch.func.jvp(attention_math, tuple(ref_leaves), tuple(t.double() for t in (dq, dk, dv)))
    ref_grads = torch.autograd.grad((ref_out * cot.double()).sum(), ref_leaves)
    assert rel_err(out.double(), ref_out) < tol
    assert rel_err(tangent.double(), ref_tangent) < tol
    for a, b in zip(grads, ref_grads):
        assert rel_err(a.double(), b) < tol


def test_meanflow_fused_step_with_a_dit_on_cuda():
    """A MeanFlow step of a small DiT under bf16 autocast, as mf train runs it on a GPU, in both JVP
    modes: both backward passes run, and their gradients agree (they differ only in where the
    r != t samples' primal comes from: the fp32 JVP or the bf16 forward)."""
    from mf_backbones.dit import DiT, DiTConfig
    from mf_objectives.meanflow import MeanFlow, MFConfig

    torch.manual_seed(0)
    net = DiT(DiTConfig(variant="DiT-S/2", depth=2), shape=(3, 32, 32), num_classes=0).cuda()
    x = torch.randn(16, 3, 32, 32, device="cuda")
    grads = {}
    for mode in ("fused", "split"):
        net.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same (t, r) and noise in both modes
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = MeanFlow(MFConfig(ratio_r_neq_t=0.5, jvp_mode=mode)).loss(net, x)
        loss.backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
        assert torch.isfinite(loss) and grads[mode].numel() > 0 and torch.isfinite(grads[mode]).all()
    cos = torch.nn.functional.cosine_similarity(grads["fused"].double(), grads["split"].double(), dim=0)
    assert cos > 0.99
