"""The custom forward-mode rules of jvp_ops: exact (vs finite differences and PyTorch's own rules),
exact backward for the "fused" JVP mode, vmap-able, and used only where they are safe."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import pytest

from mf_backbones import jvp_ops
from mf_backbones.jvp_ops import custom_jvp_rules

from helpers_backbones import central_fd, rel_err

D64 = torch.float64


def _cases():
    g = torch.Generator().manual_seed(1)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=D64)

    filt = torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=D64)
    filt = (torch.outer(filt, filt) / filt.sum() ** 2).expand(3, 1, 4, 4).contiguous()
    return {
        # name: (fn(x, *params), x, params)
        "linear": (lambda x, w, b: jvp_ops.linear(x, w, b), r(2, 5, 7), (r(4, 7), r(4))),
        "linear_nobias": (lambda x, w: jvp_ops.linear(x, w), r(3, 7), (r(4, 7),)),
        "conv2d": (lambda x, w, b: jvp_ops.conv2d(x, w, b, 1, 1, 1, 1), r(2, 3, 6, 6), (r(5, 3, 3, 3), r(5))),
        "conv2d_stride_groups": (lambda x, w, b: jvp_ops.conv2d(x, w, b, 2, 0, 1, 3), r(2, 6, 8, 8), (r(6, 2, 2, 2), r(6))),
        "down_fir": (lambda x: jvp_ops.fixed_filter_conv(x, filt, transposed=False, stride=2, padding=1, groups=3), r(2, 3, 8, 8), ()),
        "up_fir": (lambda x: jvp_ops.fixed_filter_conv(x, 4 * filt, transposed=True, stride=2, padding=1, groups=3), r(2, 3, 4, 4), ()),
        "layer_norm": (lambda x: jvp_ops.layer_norm(x, (6,), None, None, 1e-6), r(2, 4, 6), ()),
        "layer_norm_affine": (lambda x, w, b: jvp_ops.layer_norm(x, (6,), w, b, 1e-5), r(2, 4, 6), (r(6), r(6))),
        "layer_norm_2d": (lambda x, w, b: jvp_ops.layer_norm(x, (4, 6), w, b, 1e-5), 3 + r(2, 4, 6), (r(4, 6), r(4, 6))),
        "group_norm": (lambda x: jvp_ops.group_norm(x, 2, None, None, 1e-6), r(2, 4, 3, 3), ()),
        "group_norm_affine": (lambda x, w, b: jvp_ops.group_norm(x, 2, w, b, 1e-6), 2 + r(2, 6, 3, 3), (r(6), r(6))),
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_tangent_matches_finite_differences_and_default_rule(name):
    fn, x, params = CASES[name]
    dx = torch.randn_like(x)
    f = lambda a: fn(a, *params)  # noqa: E731
    _, tangent = torch.func.jvp(f, (x,), (dx,))
    fd = central_fd(f, (x,), (dx,))
    assert rel_err(tangent, fd) < 1e-8
    with custom_jvp_rules(False):
        _, reference = torch.func.jvp(f, (x,), (dx,))
    assert rel_err(tangent, reference) < 1e-12


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n][2]])
def test_tangent_through_parameters(name):
    # tangents on weights and biases too (e.g. a JVP over parameters with functional_call)
    fn, x, params = CASES[name]
    primals = (x, *params)
    tangents = tuple(torch.randn_like(p) for p in primals)
    _, tangent = torch.func.jvp(fn, primals, tangents)
    fd = central_fd(fn, primals, tangents)
    assert rel_err(tangent, fd) < 1e-8


@pytest.mark.parametrize("name", list(CASES))
def test_fused_mode_backward_is_exact(name):
    # In "fused" JVP mode the primal output of torch.func.jvp carries gradients to x and the weights.
    fn, x, params = CASES[name]
    leaves = [t.clone().requires_grad_() for t in (x, *params)]
    cot = torch.randn_like(fn(x, *params))
    out, _ = torch.func.jvp(lambda a: fn(a, *leaves[1:]), (leaves[0],), (torch.randn_like(x),))
    grads = torch.autograd.grad((out * cot).sum(), leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (x, *params)]
    with custom_jvp_rules(False):
        ref = torch.autograd.grad((fn(*ref_leaves) * cot).sum(), ref_leaves)
    for g, r in zip(grads, ref):
        assert rel_err(g, r) < 1e-12


@pytest.mark.parametrize("name", ["linear", "conv2d", "up_fir", "layer_norm_affine", "group_norm_affine"])
def test_jacfwd_vmaps_the_rule(name):
    # jacfwd = vmap over jvp: needs the vmap rule of the autograd.Functions
    fn, x, params = CASES[name]
    x = x[:1]
    jac = torch.func.jacfwd(lambda a: fn(a, *params))(x)
    with custom_jvp_rules(False):
        ref = torch.func.jacfwd(lambda a: fn(a, *params))(x)
    assert rel_err(jac, ref) < 1e-12


def test_classic_dual_tensor_api_uses_the_rules():
    import torch.autograd.forward_ad as fwAD

    fn, x, params = CASES["group_norm_affine"]
    dx = torch.randn_like(x)
    with fwAD.dual_level():
        out = fn(fwAD.make_dual(x, dx), *params)
        tangent = fwAD.unpack_dual(out).tangent
    assert rel_err(tangent, central_fd(lambda a: fn(a, *params), (x,), (dx,))) < 1e-8


def test_rules_are_used_only_under_eager_forward_ad(monkeypatch):
    calls = []
    original = jvp_ops._Linear.jvp

    def spy(ctx, *tangents):
        calls.append(1)
        return original(ctx, *tangents)

    monkeypatch.setattr(jvp_ops._Linear, "jvp", staticmethod(spy))
    x, w = torch.randn(3, 4), torch.randn(2, 4)
    assert not jvp_ops.custom_jvp_active()
    jvp_ops.linear(x, w)  # plain call: no Function, nothing to spy on
    torch.func.jvp(lambda a: jvp_ops.linear(a, w), (x,), (x,))
    assert calls == [1]
    with custom_jvp_rules(False):
        torch.func.jvp(lambda a: jvp_ops.linear(a, w), (x,), (x,))
    assert calls == [1]


def test_default_linear_rule_wastes_a_matmul():
    """Why the custom linear rule exists: PyTorch's rule multiplies by a materialised zero weight tangent.

    Counted with a dispatch mode (not timed): the default rule issues more matmul calls than ours.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMM(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
                self.n += 1
            return func(*args, **(kwargs or {}))

    x, w = torch.randn(8, 16), torch.randn(32, 16)
    counts = {}
    for custom in (True, False):
        with custom_jvp_rules(custom), CountMM() as mode:
            torch.func.jvp(lambda a: F.linear(a, w) if not custom else jvp_ops.linear(a, w), (x,), (x,))
        counts[custom] = mode.n
    assert counts[True] == 2  # primal + one tangent matmul
    assert counts[False] > counts[True]
