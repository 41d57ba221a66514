"""DiT (adaLN-Zero) as MeanFlow uses it: published parameter counts, conditioning, exact JVP, compile."""

from __future__ import annotations

import pytest
import torch

from mfcli.errors import MFError
from mf_backbones.dit import DiT, DiT_models, DiTConfig

from helpers_backbones import assert_backbone_jvp_exact, assert_compiled_jvp_equals_eager, randomize_


def count_on_meta(cfg, shape=(4, 32, 32), num_classes=1000) -> int:
    with torch.device("meta"):
        model = DiT(cfg, shape=shape, num_classes=num_classes)
    return sum(p.numel() for p in model.parameters())


def dit_formula(depth, D, patch, C=4, H=32, classes=1000, freq=256, mlp_ratio=4) -> int:
    """Parameter count written out from the architecture description (DiT §3.2, MeanFlow §4)."""
    hidden = int(D * mlp_ratio)
    block = (D * 3 * D + 3 * D) + (D * D + D) + (D * hidden + hidden + hidden * D + D) + (D * 6 * D + 6 * D)
    patch_embed = C * patch * patch * D + D
    time_embedders = 2 * (freq * D + D + D * D + D)  # t and h
    labels = (classes + 1) * D  # + null class
    final = (D * 2 * D + 2 * D) + (D * patch * patch * C + patch * patch * C)
    return depth * block + patch_embed + time_embedders + labels + final


@pytest.mark.parametrize(
    "variant, published_millions",
    # MeanFlow Table 4 (M/2: Table 2; Table 4's 497.8M contradicts it, see METHODS §1.6)
    [("DiT-B/4", 131), ("DiT-B/2", 131), ("DiT-M/2", 308), ("DiT-L/2", 459), ("DiT-XL/2", 676)],
)
def test_parameter_counts_match_published(variant, published_millions):
    v = DiT_models[variant]
    n = count_on_meta(DiTConfig(variant=variant))
    assert n == dit_formula(v["depth"], v["hidden"], v["patch"])
    assert round(n / 1e6) == published_millions


def test_named_sizes_cover_s_b_m_l_xl_with_patches_2_4_8():
    assert set(DiT_models) == {f"DiT-{s}/{p}" for s in ("S", "B", "M", "L", "XL") for p in (2, 4, 8)}


def tiny(num_classes=5, **kw) -> DiT:
    cfg = DiTConfig(variant="DiT-S/2", depth=2, hidden=32, heads=4, **kw)
    return randomize_(DiT(cfg, shape=(3, 8, 8), num_classes=num_classes))


def test_overrides_and_output_shape():
    model = tiny(patch=4)
    assert (len(model.blocks), model.patch, model.grid) == (2, 4, (2, 2))
    z = torch.randn(3, 3, 8, 8)
    assert model(z, torch.rand(3), torch.rand(3)).shape == z.shape
    assert model.conditions == frozenset({"y"}) and model.num_classes == 5 and not model.has_v_head


def test_zero_init_output_then_conditioning_reaches_the_output():
    fresh = DiT(DiTConfig(variant="DiT-S/2", depth=1, hidden=32, heads=4), shape=(3, 8, 8), num_classes=5)
    z, t, h = torch.randn(2, 3, 8, 8), torch.rand(2), torch.rand(2)
    assert fresh(z, t, h).abs().max() == 0  # adaLN-Zero: the network starts at u = 0
    model = tiny().eval()
    base = model(z, t, h, {"y": torch.tensor([1, 2])})
    assert not torch.allclose(base, model(z, t, h, {"y": torch.tensor([3, 2])}))
    assert not torch.allclose(base, model(z, t + 0.1, h, {"y": torch.tensor([1, 2])}))
    assert not torch.allclose(base, model(z, t, h + 0.1, {"y": torch.tensor([1, 2])}))
    null = torch.full((2,), 5)
    assert torch.equal(model(z, t, h), model(z, t, h, {"y": null}))  # no label = the null class


def test_jvp_exact_conditional():
    assert_backbone_jvp_exact(tiny(), {"y": torch.tensor([0, 5])})


def test_jvp_exact_unconditional_patch4():
    model = tiny(num_classes=0, patch=4)
    assert model.conditions == frozenset()
    assert_backbone_jvp_exact(model)


def test_bad_configs_raise_clear_errors():
    with pytest.raises(MFError, match="DiT-B/2"):
        DiT(DiTConfig(variant="DiT-B2"), shape=(4, 32, 32))
    with pytest.raises(MFError, match="patch size 8 does not divide"):
        DiT(DiTConfig(variant="DiT-S/8", depth=1, hidden=32, heads=4), shape=(3, 12, 12))
    with pytest.raises(MFError, match="image-shaped"):
        DiT(DiTConfig(variant="DiT-S/2"), shape=(2,))


@pytest.mark.slow
def test_compiled_jvp_equals_eager():
    assert_compiled_jvp_equals_eager(tiny(), {"y": torch.tensor([1, 5])})
