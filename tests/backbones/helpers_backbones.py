"""Helpers shared by the backbone tests: finite differences, relative errors, randomised weights, data paths."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def shared_data() -> Path:
    """The shared real data (CIFAR-10, pretrained ResNets): $MF_SHARED_DATA or <repo>/../shared/data."""
    env = os.environ.get("MF_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over all elements (b is the reference)."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def central_fd(f, primals, tangents, eps: float = 1e-6):
    """(f(x + εv) - f(x - εv)) / 2ε, the O(ε²) central difference, for a tensor- or tuple-valued f."""
    with torch.no_grad():
        plus = f(*[p + eps * t for p, t in zip(primals, tangents)])
        minus = f(*[p - eps * t for p, t in zip(primals, tangents)])
    if isinstance(plus, tuple):
        return tuple((a - b) / (2 * eps) for a, b in zip(plus, minus))
    return (plus - minus) / (2 * eps)


def randomize_(model: torch.nn.Module, scale: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter so zero-initialised gates and output layers do not make tests trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype.is_floating_point:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return model


def backbone_inputs(model, batch: int = 2, dtype=torch.float64, seed: int = 0):
    """Primals (z, t, h) with 0 <= h <= t <= 1 and random tangents for all three."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn((batch, *model.shape), generator=g, dtype=dtype)
    t = 0.2 + 0.7 * torch.rand(batch, generator=g, dtype=dtype)
    h = t * torch.rand(batch, generator=g, dtype=dtype)
    tangents = (torch.randn_like(z), torch.randn(batch, generator=g, dtype=dtype), torch.randn(batch, generator=g, dtype=dtype))
    return (z, t, h), tangents


def assert_backbone_jvp_exact(model, cond=None, batch: int = 2):
    """JVP through (z, t, h): float64 vs central differences, float32 vs PyTorch's default rules on plain-ops attention."""
    import copy

    from mf_backbones.attention import attention_backend
    from mf_backbones.jvp_ops import custom_jvp_rules

    m64 = copy.deepcopy(model).double().eval()
    f64 = lambda z, t, h: m64(z, t, h, cond)  # noqa: E731
    primals, tangents = backbone_inputs(m64, batch)
    out, tangent = torch.func.jvp(f64, primals, tangents)
    fd = central_fd(f64, primals, tangents)
    for a, b in zip(_tuple(tangent), _tuple(fd)):
        assert rel_err(a, b) < 1e-7, rel_err(a, b)

    m32 = copy.deepcopy(model).float().eval()
    f32 = lambda z, t, h: m32(z, t, h, cond)  # noqa: E731
    p32, t32 = [tuple(x.float() for x in xs) for xs in (primals, tangents)]
    out, tangent = torch.func.jvp(f32, p32, t32)
    with attention_backend("math"), custom_jvp_rules(False):
        ref_out, ref_tangent = torch.func.jvp(f32, p32, t32)
    for a, b in zip(_tuple(out) + _tuple(tangent), _tuple(ref_out) + _tuple(ref_tangent)):
        assert rel_err(a, b) < 1e-5, rel_err(a, b)


def assert_compiled_jvp_equals_eager(model, cond=None):
    """torch.compile of the whole JVP gives the eager tangent (custom rules can be dropped silently under compile)."""
    model = model.float().eval()
    primals, tangents = backbone_inputs(model, dtype=torch.float32)
    f = lambda z, t, h: model(z, t, h, cond)  # noqa: E731
    eager = torch.func.jvp(f, primals, tangents)
    torch._dynamo.reset()
    # fullgraph: the whole JVP is traced, so the compile-time paths (not an eager fallback) are tested
    compiled = torch.compile(lambda p, tg: torch.func.jvp(f, p, tg), fullgraph=True)(primals, tangents)
    for a, b in zip(_tuple(compiled[0]) + _tuple(compiled[1]), _tuple(eager[0]) + _tuple(eager[1])):
        assert rel_err(a, b) < 1e-5, rel_err(a, b)


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)
