"""Geometric augmentation with conditioning labels, after EDM's AugmentPipe (Karras et al. 2022).

MeanFlow's CIFAR-10 setup (METHODS §1.7) augments with probability p = 0.12 per
transformation: x-flips, isotropic scaling, anisotropic scaling and fractional translation
(no y-flips, no rotation), and feeds the transformation's parameters to the network as
"augmentation labels" so that it can tell augmented images apart; sampling passes no
labels (all zero: no augmentation), so generated images follow the un-augmented data.

Per image, on the device, in one batched resampling:

* x-flip: with probability ``xflip_prob`` (1 by default: every image is eligible) a fair
  coin w ∈ {0, 1} decides the flip. Label: w.
* isotropic scale 2^s, s ~ N(0, scale_std²), with probability p. Label: s.
* anisotropic scale 2^a along a uniform angle θ and 2^-a across it, a ~ N(0, aniso_std²),
  with probability p. Labels: a cos 2θ, a sin 2θ (the map is π-periodic in θ, and (a, θ)
  and (-a, θ + π/2) are the same map: the double angle gives both the same label).
* translation by (tx, ty) ~ N(0, translate_std²) in units of the image size, with
  probability p. Labels: tx, ty.

The labels are zero where a transformation was not drawn: 6 numbers per image, the size
the U-Net's ``augment_dim`` expects. The scalings and the translation form one affine map
from output to input coordinates, applied with bilinear ``grid_sample`` and reflection at
the borders (EDM pads by reflection too; it resamples with a wavelet filter instead of
bilinear interpolation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mfcli.data import flip_where

AUGMENT_DIM = 6
KINDS = ("none", "edm")


class EDMAugment:
    def __init__(self, p: float = 0.12, *, xflip_prob: float = 1.0, scale_std: float = 0.2, aniso_std: float = 0.2,
                 translate_std: float = 0.125):
        if not 0.0 <= p <= 1.0 or not 0.0 <= xflip_prob <= 1.0:
            raise ValueError(f"augmentation probabilities must lie in [0, 1], got p={p}, xflip_prob={xflip_prob}")
        self.p, self.xflip_prob = p, xflip_prob
        self.scale_std, self.aniso_std, self.translate_std = scale_std, aniso_std, translate_std

    def draw(self, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """The labels (n, 6) of n random augmentations: [flip, s, a cos 2θ, a sin 2θ, tx, ty]."""
        def rand(*shape):
            return torch.rand(*shape, device=device, generator=generator)

        def randn(*shape):
            return torch.randn(*shape, device=device, generator=generator)

        flip = ((rand(n) < 0.5) & (rand(n) < self.xflip_prob)).float()
        s = randn(n) * self.scale_std * (rand(n) < self.p)
        theta = rand(n) * math.pi
        a = randn(n) * self.aniso_std * (rand(n) < self.p)
        t = randn(n, 2) * self.translate_std * (rand(n, 1) < self.p)
        return torch.stack([flip, s, a * torch.cos(2 * theta), a * torch.sin(2 * theta), t[:, 0], t[:, 1]], dim=1)

    @staticmethod
    def apply(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) transformed as ``labels`` (N, 6) say; zero labels leave an image unchanged."""
        x = flip_where(x, labels[:, 0] > 0.5)
        s, ac, as_, tx, ty = labels[:, 1], labels[:, 2], labels[:, 3], labels[:, 4], labels[:, 5]
        geo = (s != 0) | (ac != 0) | (as_ != 0) | (tx != 0) | (ty != 0)
        if not bool(geo.any()):
            return x
        # forward map of image coordinates (normalised to [-1, 1]): p_out = M p_in + 2 t, with
        # M = 2^s R(θ) diag(2^a, 2^-a) R(θ)ᵀ; grid_sample needs the inverse, p_in = M⁻¹ (p_out - 2 t)
        a = torch.hypot(ac, as_)  # the label (a cos 2θ, a sin 2θ) read back as a ≥ 0 along θ
        theta = torch.atan2(as_, ac) / 2
        c, si = torch.cos(theta), torch.sin(theta)
        rot = torch.stack([torch.stack([c, -si], -1), torch.stack([si, c], -1)], -2)  # (N, 2, 2)
        # inverse of the anisotropic scaling: 2^-a along θ, 2^a across; of the isotropic one: 2^-s
        diag = torch.diag_embed(torch.stack([torch.exp2(-a), torch.exp2(a)], -1))
        m_inv = torch.exp2(-s)[:, None, None] * (rot @ diag @ rot.transpose(1, 2))
        shift = torch.stack([tx, ty], -1) * 2  # image-size units -> normalised units
        affine = torch.cat([m_inv, -(m_inv @ shift[:, :, None])], dim=2).to(x.dtype)  # (N, 2, 3)
        grid = F.affine_grid(affine, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return torch.where(geo[:, None, None, None], out, x)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        labels = self.draw(x.shape[0], x.device, generator)
        return self.apply(x, labels), labels.to(x.dtype)
