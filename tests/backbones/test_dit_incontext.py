"""In-context DiT of improved MeanFlow: published counts, prefix-token conditioning, the v head, exact JVP."""

from __future__ import annotations

import pytest
import torch

from mfcli.errors import MFError
from mf_backbones.dit_incontext import InContextDiT, InContextDiTConfig, iMF_models

from helpers_backbones import assert_backbone_jvp_exact, assert_compiled_jvp_equals_eager, backbone_inputs, randomize_


def imf_formula(depth, D, heads, patch=2, C=4, classes=1000, freq=256, head_depth=8, v_head=False) -> int:
    """Parameter count written out from iMF §2.3: bias-free attention, QK-RMSNorm, SwiGLU 8/3, gates."""
    hidden = int(D * 8 / 3)
    block = 4 * D * D + 2 * (D // heads) + 2 * D + 3 * D * hidden + 2 * D  # attn, qk norms, norms, swiglu, gates
    final = D + D * patch * patch * C + patch * patch * C
    embedders = 4 * (freq * D + D + D * D + D) + (classes + 1) * D  # h, ω, t_min, t_max; labels (+ null)
    tokens = (8 + 4 + 2 + 2 + 4) * D
    n = depth * block + final + embedders + tokens + (C * patch * patch * D + D)
    return n + (head_depth * block + final if v_head else 0)


@pytest.mark.parametrize(
    "variant, published_millions",
    [("iMF-B/2", 89), ("iMF-L/2", 409), ("iMF-XL/2", 610)],  # iMF paper, parameters at inference
)
def test_inference_parameter_counts_match_published(variant, published_millions):
    v = iMF_models[variant]
    with torch.device("meta"):
        model = InContextDiT(InContextDiTConfig(variant=variant, v_head=False), shape=(4, 32, 32), num_classes=1000)
        train = InContextDiT(InContextDiTConfig(variant=variant), shape=(4, 32, 32), num_classes=1000)
    n = sum(p.numel() for p in model.parameters())
    assert n == imf_formula(v["depth"], v["hidden"], v["heads"])
    assert round(n / 1e6) == published_millions
    assert sum(p.numel() for p in train.parameters()) == imf_formula(v["depth"], v["hidden"], v["heads"], v_head=True)


def tiny(num_classes=5, **kw) -> InContextDiT:
    cfg = InContextDiTConfig(depth=3, head_depth=2, hidden=32, heads=4, **kw)
    return randomize_(InContextDiT(cfg, shape=(3, 8, 8), num_classes=num_classes)).eval()


def test_layout_and_attributes():
    model = tiny()
    assert model.num_prefix == 8 + 4 + 2 + 2 + 4
    assert (len(model.shared_blocks), len(model.u_blocks), len(model.v_blocks)) == (1, 2, 2)
    assert model.rope_cos.shape == (model.num_prefix + 16, 4)  # whole sequence, head_dim / 2
    assert model.has_v_head and {"y", "omega", "t_min", "t_max", "return_v"} <= model.conditions


def test_zero_initialised_gates_and_output():
    fresh = InContextDiT(InContextDiTConfig(depth=2, head_depth=1, hidden=32, heads=4), shape=(3, 8, 8), num_classes=5)
    for block in fresh.shared_blocks:
        assert block.attn_scale.abs().max() == 0 and block.mlp_scale.abs().max() == 0
    assert fresh(torch.randn(2, 3, 8, 8), torch.rand(2), torch.rand(2)).abs().max() == 0


def test_noise_unconditional_and_condition_defaults():
    model = tiny()
    (z, t, h), _ = backbone_inputs(model, dtype=torch.float32)
    y = torch.tensor([1, 3])
    base = model(z, t, h, {"y": y})
    assert torch.equal(base, model(z, torch.rand(2), h, {"y": y}))  # t is not read, only h
    assert not torch.allclose(base, model(z, t, h * 0.5, {"y": y}))
    explicit = {"y": y, "omega": torch.ones(2), "t_min": torch.zeros(2), "t_max": torch.ones(2)}
    assert torch.equal(base, model(z, t, h, explicit))  # defaults: ω = 1, interval [0, 1]
    for key, value in (("omega", torch.full((2,), 3.0)), ("t_min", torch.full((2,), 0.3)), ("t_max", torch.full((2,), 0.7))):
        assert not torch.allclose(base, model(z, t, h, {**explicit, key: value})), key
    assert torch.equal(model(z, t, h), model(z, t, h, {"y": torch.full((2,), 5)}))  # null class


def test_v_head_shares_the_trunk_and_can_drop_its_tangent():
    model = tiny()
    (z, t, h), (dz, dt, dh) = backbone_inputs(model, dtype=torch.float32)
    u_only = model(z, t, h)
    u, v = model(z, t, h, {"return_v": True})
    assert torch.equal(u, u_only) and v.shape == u.shape and not torch.allclose(u, v)

    def run(v_tangent):
        params = dict(model.named_parameters())
        f = lambda z: model(z, t, h, {"return_v": True, "v_tangent": v_tangent})  # noqa: E731
        (u, v), (du, dv) = torch.func.jvp(f, (z,), (dz,))
        grads = torch.autograd.grad(v.square().sum(), list(params.values()), allow_unused=True)
        return u, v, du, dv, grads

    u1, v1, du1, dv1, g1 = run(True)
    u2, v2, du2, dv2, g2 = run(False)
    assert torch.equal(u1, u2) and torch.equal(v1, v2) and torch.equal(du1, du2)
    assert dv1.abs().max() > 0 and dv2.abs().max() == 0  # v's tangent is skipped, not its value
    for a, b in zip(g1, g2):  # the v loss still trains the shared trunk
        assert (a is None and b is None) or torch.allclose(a, b)
    assert g2[0] is not None and g2[0].abs().max() > 0


def test_without_v_head_return_v_is_an_error():
    model = tiny(v_head=False)
    assert not model.has_v_head and "return_v" not in model.conditions
    with pytest.raises(MFError, match="without the v head"):
        model(torch.randn(1, 3, 8, 8), torch.rand(1), torch.rand(1), {"return_v": True})


def test_jvp_exact_u_and_v():
    cond = {"y": torch.tensor([2, 5]), "omega": torch.tensor([1.5, 4.0]), "t_min": torch.tensor([0.1, 0.2]),
            "t_max": torch.tensor([0.8, 0.6]), "return_v": True}
    assert_backbone_jvp_exact(tiny(), cond)


def test_jvp_exact_unconditional():
    assert_backbone_jvp_exact(tiny(num_classes=0))


def test_bad_configs_raise_clear_errors():
    with pytest.raises(MFError, match="iMF-B/2"):
        InContextDiT(InContextDiTConfig(variant="iMF-B"), shape=(4, 32, 32))
    with pytest.raises(MFError, match="head_depth"):
        InContextDiT(InContextDiTConfig(depth=2, head_depth=3, hidden=32, heads=4), shape=(3, 8, 8))


@pytest.mark.slow
def test_compiled_jvp_equals_eager():
    assert_compiled_jvp_equals_eager(tiny(), {"y": torch.tensor([1, 5]), "omega": torch.tensor([2.0, 1.0])})
