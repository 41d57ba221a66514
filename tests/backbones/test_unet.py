"""The MeanFlow CIFAR-10 U-Net (EDM DDPM++): parameter count, small CPU variants, conditioning, exact JVP."""

from __future__ import annotations

import pytest
import torch

from mfcli.errors import MFError
from mf_backbones.unet import UNet, UNetConfig, positional_embedding

from helpers_backbones import assert_backbone_jvp_exact, assert_compiled_jvp_equals_eager, backbone_inputs, randomize_


def songunet_formula(ch=128, mults=(2, 2, 2), blocks=4, attn_res=(16,), res=32, C=3, noise_mult=2, emb_mult=4) -> int:
    """Parameters of EDM's SongUNet (standard encoder/decoder) written out from its description:
    block = GN, 3×3 conv, affine(emb), GN, 3×3 conv, [1×1 skip], [GN, 1×1 qkv, 1×1 proj]."""
    emb = ch * emb_mult

    def block(cin, cout, attn=False, resample=False):
        n = 2 * cin + (9 * cin * cout + cout) + (emb * cout + cout) + 2 * cout + (9 * cout * cout + cout)
        if cin != cout or resample:
            n += cin * cout + cout
        if attn:
            n += 2 * cout + (cout * 3 * cout + 3 * cout) + (cout * cout + cout)
        return n

    total = (2 * ch * noise_mult) * emb + emb + emb * emb + emb  # map_layer0, map_layer1
    total += 9 * C * ch + ch  # input conv
    skips, cout = [ch], ch
    for level, m in enumerate(mults):
        r = res >> level
        if level:
            total += block(cout, cout, resample=True)
            skips.append(cout)
        for _ in range(blocks):
            total += block(cout, ch * m, attn=r in attn_res)
            cout = ch * m
            skips.append(cout)
    for level, m in reversed(list(enumerate(mults))):
        r = res >> level
        if level == len(mults) - 1:
            total += block(cout, cout, attn=True) + block(cout, cout)
        else:
            total += block(cout, cout, resample=True)
        for i in range(blocks + 1):
            total += block(cout + skips.pop(), ch * m, attn=(i == blocks and r in attn_res))
            cout = ch * m
    return total + 2 * cout + 9 * cout * C + C  # output GN + conv


def test_cifar10_network_parameter_count():
    with torch.device("meta"):
        model = UNet(UNetConfig(), shape=(3, 32, 32))
    n = sum(p.numel() for p in model.parameters())
    assert n == songunet_formula() == 55_929_347
    # "≈55M" in the MeanFlow paper; the (t, h) mapping takes 2 x 256 channels instead of EDM's 128
    assert 55e6 < n < 56e6
    with torch.device("meta"):
        aug = UNet(UNetConfig(augment_dim=6), shape=(3, 32, 32))
    assert sum(p.numel() for p in aug.parameters()) == n + 6 * 512  # bias-free augment-label map


def test_positional_embedding_is_edm_endpoint_sin_cos():
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    e = positional_embedding(t, 8)
    freqs = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3), 1e-4], dtype=torch.float64)
    assert torch.allclose(e, torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], 1))


@pytest.mark.parametrize("variant", ["UNet-S", "UNet-XS"])
def test_small_variants_run_on_mnist_and_cifar_sizes(variant):
    for shape in ((1, 28, 28), (3, 32, 32)):
        model = UNet(UNetConfig(variant=variant), shape=shape)
        z = torch.randn(2, *shape)
        assert model(z, torch.rand(2), torch.rand(2)).shape == z.shape
    assert sum(p.numel() for p in model.parameters()) < 8e6


def tiny(num_classes=0, **kw) -> UNet:
    cfg = UNetConfig(variant="UNet-XS", channels=8, attn_resolutions=[8], dropout=0.0, **kw)
    return randomize_(UNet(cfg, shape=(1, 16, 16), num_classes=num_classes)).eval()


def test_attention_where_configured():
    model = tiny()
    with_attn = [name for name, block in list(model.enc.items()) + list(model.dec.items()) if getattr(block, "heads", 0)]
    # 8x8 encoder block, the first decoder block at the lowest resolution, the last 8x8 decoder block
    assert with_attn == ["8x8_block0", "4x4_in0", "8x8_block1"]


def test_conditioning():
    model = tiny(num_classes=4, augment_dim=6)
    assert model.conditions == frozenset({"y", "augment"})
    (z, t, h), _ = backbone_inputs(model, dtype=torch.float32)
    base = model(z, t, h, {"y": torch.tensor([0, 1])})
    assert not torch.allclose(base, model(z, t, h, {"y": torch.tensor([2, 1])}))
    assert not torch.allclose(base, model(z, t, h * 0.5, {"y": torch.tensor([0, 1])}))
    assert torch.equal(model(z, t, h), model(z, t, h, {"y": torch.full((2,), 4)}))  # null class
    assert not torch.allclose(base, model(z, t, h, {"y": torch.tensor([0, 1]), "augment": torch.randn(2, 6)}))


def test_jvp_exact():
    assert_backbone_jvp_exact(tiny())


def test_jvp_exact_class_conditional():
    assert_backbone_jvp_exact(tiny(num_classes=3), {"y": torch.tensor([2, 3])})


def test_resolution_that_cannot_be_halved_is_a_clear_error():
    with pytest.raises(MFError, match="cannot halve 15x15"):
        UNet(UNetConfig(variant="UNet-XS"), shape=(1, 30, 30))
    with pytest.raises(MFError, match="UNet-CIFAR10"):
        UNet(UNetConfig(variant="UNet-cifar"), shape=(3, 32, 32))


@pytest.mark.slow
def test_compiled_jvp_equals_eager():
    assert_compiled_jvp_equals_eager(tiny())
