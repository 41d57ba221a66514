"""The CIFAR-10 U-Net of MeanFlow: EDM's DDPM++ ``SongUNet`` conditioned on (t, h).

Architecture (Karras et al. 2022, EDM, "DDPM++" config; MeanFlow §1.7): 128 base
channels, channel multipliers [2, 2, 2], 4 residual blocks per resolution, self-attention
at 16×16 (and in the first decoder block), dropout 0.2, FIR resampling filter [1, 3, 3, 1],
skip scale 1/√2, GroupNorm(min(32, C/4)) with ε = 1e-6, about 55.9M parameters.

Time conditioning (MeanFlow §1.2): t and h each get a 256-channel positional embedding
(``endpoint=True``, [sin, cos] order), and the two are *concatenated* (512 channels)
before the two-layer mapping MLP, whose output is added to every block's features.
Optional class labels add an embedding (with a null class) to the concatenated time
embedding; optional augmentation labels (EDM AugmentPipe, dimension 6) do the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from mfcli.errors import MFError

from . import jvp_ops
from .attention import attention
from .layers import Conv2d, GroupNorm, Linear, null_or, pick, resolve_variant

UNet_models = {
    # MeanFlow CIFAR-10 (EDM DDPM++ widths), ≈55.9M parameters
    "UNet-CIFAR10": dict(channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,), dropout=0.2),
    # reduced widths and depths that train on a CPU (MNIST 28×28, CIFAR 32×32)
    "UNet-S": dict(channels=64, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(16,), dropout=0.1),
    "UNet-XS": dict(channels=32, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(), dropout=0.0),
}


@dataclass
class UNetConfig:
    variant: str = "UNet-CIFAR10"  # named size, see UNet_models
    channels: int | None = None  # base channel count (None = from the variant)
    channel_mult: list[int] | None = None  # channel multiplier per resolution level (None = from the variant)
    num_blocks: int | None = None  # residual blocks per resolution (None = from the variant)
    attn_resolutions: list[int] | None = None  # resolutions with self-attention (None = from the variant)
    dropout: float | None = None  # dropout before each block's second conv (None = from the variant)
    noise_mult: int = 2  # positional-embedding channels for each of t and h = channels * noise_mult
    emb_mult: int = 4  # width of the conditioning vector = channels * emb_mult
    resample_filter: tuple[int, ...] = (1, 3, 3, 1)  # FIR filter of the up/down-sampling
    heads: int = 1  # attention heads
    augment_dim: int = 0  # augmentation-label conditioning size (EDM AugmentPipe: 6; 0 = none)


def positional_embedding(t: torch.Tensor, channels: int, max_positions: float = 10000.0) -> torch.Tensor:
    """EDM/DDPM++ embedding with endpoint=True, in MeanFlow's [sin, cos] order. (B,) -> (B, channels).

    Frequencies run from 1 to 1/max_positions inclusive; t is fed unscaled.
    """
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    half = channels // 2
    freqs = (1.0 / max_positions) ** (torch.arange(half, device=t.device, dtype=dtype) / (half - 1))
    args = t.to(dtype)[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


def _groups(channels: int) -> int:
    return min(32, channels // 4)


class Resample(nn.Module):
    """2× FIR up- or down-sampling with a fixed separable filter (depthwise; EDM ``Conv2d`` with kernel 0)."""

    def __init__(self, channels: int, filt, up: bool):
        super().__init__()
        f = torch.as_tensor(filt, dtype=torch.float64)
        f = torch.outer(f, f) / f.sum() ** 2 * (4 if up else 1)  # up: keep the mean after zero insertion
        self.up, self.channels, self.pad = up, channels, (f.shape[-1] - 1) // 2
        self.register_buffer("filt", f.float().expand(channels, 1, *f.shape).contiguous(), persistent=False)

    def forward(self, x):
        return jvp_ops.fixed_filter_conv(
            x, self.filt.to(x.dtype), transposed=self.up, stride=2, padding=self.pad, groups=self.channels
        )


class UNetBlock(nn.Module):
    """Residual block: GN-SiLU-(resample)-conv, + affine(emb), GN-SiLU-dropout-conv, skip, then optional attention."""

    def __init__(self, cin, cout, emb_ch, *, up=False, down=False, attention=False, heads=1, dropout=0.0, filt=(1, 1)):
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.heads = heads if attention else 0
        self.skip_scale = math.sqrt(0.5)
        self.norm0 = GroupNorm(_groups(cin), cin, eps=1e-6)
        self.resample = Resample(cin, filt, up) if (up or down) else None
        self.conv0 = Conv2d(cin, cout, 3, padding=1)
        self.affine = Linear(emb_ch, cout)
        self.norm1 = GroupNorm(_groups(cout), cout, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = Conv2d(cout, cout, 3, padding=1)
        self.skip = Conv2d(cin, cout, 1) if (cout != cin or up or down) else None
        if self.heads:
            self.norm2 = GroupNorm(_groups(cout), cout, eps=1e-6)
            self.qkv = Conv2d(cout, 3 * cout, 1)
            self.proj = Conv2d(cout, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = F.silu(self.norm0(x))
        if self.resample is not None:
            x, orig = self.resample(x), self.resample(orig)
        x = self.conv0(x)
        x = F.silu(self.norm1(x + self.affine(emb)[:, :, None, None]))
        x = self.conv1(self.dropout(x))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.heads:
            B, C, H, W = x.shape
            qkv = self.qkv(self.norm2(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
            q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, ch)
            a = attention(q, k, v).transpose(-1, -2).reshape(B, C, H, W)
            x = (self.proj(a) + x) * self.skip_scale
        return x


class UNet(nn.Module):
    """u_θ(z, t, h[, y, augment]) on (C, H, W) images. ``forward(z, t, h, cond)`` -> same shape as z."""

    has_v_head = False

    def __init__(self, cfg: UNetConfig, *, shape: tuple[int, ...], num_classes: int = 0):
        super().__init__()
        v = resolve_variant("U-Net", UNet_models, cfg.variant)
        ch = pick(cfg.channels, v["channels"])
        mults = list(pick(cfg.channel_mult, v["channel_mult"]))
        num_blocks = pick(cfg.num_blocks, v["num_blocks"])
        attn_res = set(pick(cfg.attn_resolutions, v["attn_resolutions"]))
        dropout = pick(cfg.dropout, v["dropout"])
        if len(shape) != 3:
            raise MFError(f"The U-Net needs image-shaped data (C, H, W); got shape {tuple(shape)}.")
        C, H, W = shape
        for level in range(len(mults) - 1):
            if (H >> level) % 2 or (W >> level) % 2:
                raise MFError(
                    f"The U-Net cannot halve {H >> level}x{W >> level} (input {H}x{W}) at level {level + 1} of "
                    f"{len(mults)}; use fewer levels in channel_mult (e.g. {mults[: level + 1]}) or a size divisible by "
                    f"{2 ** (len(mults) - 1)}."
                )
        if ch * min(mults) < 4 or cfg.noise_mult * ch % 2:
            raise MFError(f"The U-Net needs at least 4 channels per level; got channels={ch}, channel_mult={mults}.")
        self.cfg, self.shape, self.num_classes = cfg, tuple(shape), num_classes
        self.conditions = frozenset(({"y"} if num_classes else set()) | ({"augment"} if cfg.augment_dim else set()))
        self.noise_ch = ch * cfg.noise_mult
        emb_ch = ch * cfg.emb_mult
        filt = tuple(cfg.resample_filter)
        kw = dict(emb_ch=emb_ch, heads=cfg.heads, dropout=dropout, filt=filt)

        # mapping: [pos(t), pos(h)] (+ label, + augment) -> two SiLU layers
        self.map_label = nn.Embedding(num_classes + 1, 2 * self.noise_ch) if num_classes else None
        self.map_augment = Linear(cfg.augment_dim, 2 * self.noise_ch, bias=False) if cfg.augment_dim else None
        self.map_layer0 = Linear(2 * self.noise_ch, emb_ch)
        self.map_layer1 = Linear(emb_ch, emb_ch)

        self.enc = nn.ModuleDict()
        cout = C
        for level, mult in enumerate(mults):
            name = f"{H >> level}x{W >> level}"
            if level == 0:
                self.enc[f"{name}_conv"] = Conv2d(cout, ch, 3, padding=1)
                cout = ch
            else:
                self.enc[f"{name}_down"] = UNetBlock(cout, cout, down=True, **kw)
            for i in range(num_blocks):
                cin, cout = cout, ch * mult
                self.enc[f"{name}_block{i}"] = UNetBlock(cin, cout, attention=(H >> level) in attn_res, **kw)
        skips = [m.out_channels for m in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(mults))):
            name = f"{H >> level}x{W >> level}"
            if level == len(mults) - 1:
                self.dec[f"{name}_in0"] = UNetBlock(cout, cout, attention=True, **kw)
                self.dec[f"{name}_in1"] = UNetBlock(cout, cout, **kw)
            else:
                self.dec[f"{name}_up"] = UNetBlock(cout, cout, up=True, **kw)
            for i in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), ch * mult
                attn = i == num_blocks and (H >> level) in attn_res
                self.dec[f"{name}_block{i}"] = UNetBlock(cin, cout, attention=attn, **kw)
        self.out_norm = GroupNorm(_groups(cout), cout, eps=1e-6)
        self.out_conv = Conv2d(cout, C, 3, padding=1)
        self.initialize_weights()

    def initialize_weights(self):
        """EDM initialisation: Xavier-uniform weights, zero biases; the last conv of each residual branch and
        the output ×1e-5, the qkv projection ×√0.2."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, UNetBlock):
                m.conv1.weight.data.mul_(1e-5)
                if m.heads:
                    m.qkv.weight.data.mul_(math.sqrt(0.2))
                    m.proj.weight.data.mul_(1e-5)
        self.out_conv.weight.data.mul_(1e-5)
        if self.map_label is not None:
            nn.init.normal_(self.map_label.weight)

    def forward(self, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        emb = torch.cat([positional_embedding(t, self.noise_ch), positional_embedding(h, self.noise_ch)], dim=1)
        emb = emb.to(self.map_layer0.weight.dtype)  # (B, 2 * noise_ch)
        if self.map_label is not None:
            y = null_or(cond, "y", torch.full((z.shape[0],), self.num_classes, device=z.device, dtype=torch.long))
            emb = emb + self.map_label(y)
        if self.map_augment is not None and (cond or {}).get("augment") is not None:
            emb = emb + self.map_augment(cond["augment"].to(emb.dtype))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))  # (B, emb_ch)

        x, skips = z, []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


def build_unet(cfg: UNetConfig, *, shape, num_classes: int = 0) -> UNet:
    return UNet(cfg, shape=shape, num_classes=num_classes)


COMPONENTS = {"unet": (build_unet, UNetConfig, "EDM DDPM++ U-Net with concatenated (t, h) embeddings (MeanFlow CIFAR-10)")}
