"""Improved MeanFlow, iMF (Geng, Lu, Wu, Shechtman, Kolter, He; arXiv 2512.02012). METHODS §2.

iMF regresses the compound function V = u + (t - r) sg(du/dt) on the (guided) velocity, a
v-loss, where du/dt is a JVP along the network's OWN predicted velocity instead of e - x:

    (u, du/dt) = jvp(u_θ(·, t, h=t-r, Ω, y), (z_t, t, r), (v_θ^Ω, 1, 0))
    loss       = w(||V - sg(v_g)||²) + w(||v - sg(v_g)||²)                    (w: adaptive weight)

v_θ is an auxiliary head of the network (or, head-free, the boundary value u_θ(z, t, h=0)).
Guidance is an input: the network is conditioned on Ω = (ω, t_min, t_max), with ω drawn from
p(ω) ∝ ω^-β on [1, ω_max] and the interval from U(0, ½) × U(½, 1); the guided target is

    v_g = (e - x) + (1 - 1/ω_eff)(v_θ(z_t | ω_eff, y) - v_θ(z_t | ω=1, ∅)),
    ω_eff = ω inside [t_min, t_max] (always for r = t samples), 1 outside,

which is unbiased for the ω-guided field because the ω-conditioned net itself predicts it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mfcli.errors import MFError

from .common import (
    JVP_MODES,
    TimeSampler,
    adaptive_weight,
    eval_mode,
    expand,
    null_labels,
    sum_sq,
    u_and_dudt,
    with_extra,
)


@dataclass
class IMFConfig:
    # (t, r) sampler: LN(-0.4, 1.0) twice, sorted, first half r = t (official iMF)
    time_sampler: str = "imagenet"  # "imagenet" | "cifar_paper" | "cifar_improved" | "uniform"
    ratio_r_neq_t: float = 0.5  # fraction of samples with r != t
    t_mean: float | None = None  # logit-normal mean of t (None: the named sampler's value)
    t_std: float | None = None
    r_mean: float | None = None
    r_std: float | None = None
    # loss
    norm_p: float = 1.0  # adaptive-weight power p
    norm_eps: float = 0.01  # adaptive-weight constant c
    v_source: str = "auto"  # "head": auxiliary v head; "boundary": v = u(z, t, h=0); "auto": head if the net has one
    # guidance conditions (class-conditional data only)
    omega_max: float = 8.0  # ω ∈ [1, omega_max] (s_max = omega_max - 1 = 7)
    omega_beta: float = 1.0  # p(ω) ∝ ω^-β; β = 1 is log-uniform
    label_drop_prob: float = 0.1  # labels -> null class (Bernoulli per sample); those samples regress e - x
    # performance
    jvp_mode: str = "split"  # "split" or "fused" (see mf)


class ImprovedMeanFlow:
    """iMF loss; ``loss`` follows ``mfcli.api.Objective`` and also accepts pinned ω, t_min, t_max."""

    def __init__(self, cfg: IMFConfig | None = None, *, num_classes: int = 0):
        self.cfg = cfg = cfg or IMFConfig()
        self.num_classes = num_classes
        self.sampler = TimeSampler(cfg.time_sampler, cfg.ratio_r_neq_t, cfg.t_mean, cfg.t_std, cfg.r_mean, cfg.r_std)
        if cfg.jvp_mode not in JVP_MODES:
            raise MFError(f"unknown jvp_mode {cfg.jvp_mode!r}; choose one of {', '.join(JVP_MODES)}")
        if cfg.v_source not in ("auto", "head", "boundary"):
            raise MFError(f"imf: v_source must be 'auto', 'head' or 'boundary', got {cfg.v_source!r}")
        if cfg.omega_max < 1:
            raise MFError(f"imf: omega_max must be >= 1, got {cfg.omega_max}")
        if not 0.0 <= cfg.label_drop_prob < 1.0:
            raise MFError(f"label_drop_prob must lie in [0, 1), got {cfg.label_drop_prob}")
        self.guidance = "input" if num_classes else "none"
        self.cfg_scale = None

    # -- random draws ------------------------------------------------------------------------

    def sample_omega(self, n: int, *, device, dtype) -> torch.Tensor:
        """ω ~ p(ω) ∝ ω^-β on [1, ω_max] by inverting the CDF (ω = ω_max^U when β = 1)."""
        u = torch.rand(n, device=device, dtype=dtype)
        w_max, b = self.cfg.omega_max, self.cfg.omega_beta
        if b == 1.0:
            return torch.exp(u * math.log(w_max))
        return (1 + u * (w_max ** (1 - b) - 1)) ** (1 / (1 - b))

    def sample_interval(self, n: int, *, device, dtype):
        return 0.5 * torch.rand(n, device=device, dtype=dtype), 0.5 + 0.5 * torch.rand(n, device=device, dtype=dtype)

    # -- pieces ------------------------------------------------------------------------------

    def uses_head(self, net) -> bool:
        has = bool(getattr(net, "has_v_head", False))
        if self.cfg.v_source == "head" and not has:
            raise MFError("imf: v_source = 'head' needs a backbone with a v head (has_v_head); use 'boundary'")
        return has if self.cfg.v_source == "auto" else self.cfg.v_source == "head"

    def velocity(self, net, z, t, cond, head: bool):
        """v_θ(z, t | cond) at h = 0 and the interval [0, 1]: the v head, or the boundary u(z, t, t)."""
        one = torch.ones_like(t)
        cond = dict(cond, **({"t_min": 0 * one, "t_max": one} if "omega" in cond else {}))
        if head:
            return net(z, t, 0 * t, dict(cond, return_v=True))[1]
        return net(z, t, 0 * t, cond)

    # -- the loss ----------------------------------------------------------------------------

    def terms(self, net, x, y=None, *, step=0, t=None, r=None, noise=None, omega=None, t_min=None, t_max=None, cond=None):
        n, dev, dt = x.shape[0], x.device, x.dtype
        extra = dict(cond or {})  # per-sample conditioning from the caller (augmentation labels)
        if t is None:
            t, r = self.sampler(n, device=dev, dtype=dt)
        elif r is None:
            r = t
        e = torch.randn_like(x) if noise is None else noise
        z = (1 - expand(t, x)) * x + expand(t, x) * e
        v_t = e - x
        head = self.uses_head(net)
        fm = r == t
        with torch.no_grad(), eval_mode(net):
            if self.num_classes:
                conds = getattr(net, "conditions", None)
                if conds is not None and not {"omega", "t_min", "t_max"} <= set(conds):
                    raise MFError("imf on class-conditional data needs a backbone conditioned on omega, t_min, t_max")
                y = null_labels(n, self.num_classes, dev) if y is None else y
                omega = self.sample_omega(n, device=dev, dtype=dt) if omega is None else omega
                if t_min is None:
                    t_min, t_max = self.sample_interval(n, device=dev, dtype=dt)
                one = torch.ones_like(t)
                t_min, t_max = torch.where(fm, 0 * one, t_min), torch.where(fm, one, t_max)
                w_eff = torch.where(fm | ((t >= t_min) & (t <= t_max)), omega, one)
                # v_c and v_u in one pass over [(ω_eff, y); (1, ∅)]
                both = self.velocity(net, torch.cat([z, z]), torch.cat([t, t]),
                                     with_extra({"y": torch.cat([y, null_labels(n, self.num_classes, dev)]),
                                                 "omega": torch.cat([w_eff, one])}, extra, repeat=2), head)
                v_c, v_u = both[:n], both[n:]
                v_g = v_t + expand(1 - 1 / w_eff, x) * (v_c - v_u)
                drop = torch.rand(n, device=dev) < self.cfg.label_drop_prob
                y = torch.where(drop, null_labels(n, self.num_classes, dev), y)
                v_g = torch.where(expand(drop, x), v_t, v_g)
                cond = with_extra({"y": y, "omega": omega, "t_min": t_min, "t_max": t_max}, extra)
            else:
                cond = with_extra({}, extra)
                v_c, v_g = self.velocity(net, z, t, cond, head), v_t
        # the tangent is the model's guided velocity v_c (computed before the label drop, as the official code)
        h = t - r
        if head:
            cond = dict(cond, return_v=True)
            if "v_tangent" in getattr(net, "conditions", ()):
                cond["v_tangent"] = False  # the loss never reads dv/dt: let the backbone skip it
            (u, v), dudt = u_and_dudt(net, z, t, h, cond, v_c, mode=self.cfg.jvp_mode)
        else:
            (u, dudt), v = u_and_dudt(net, z, t, h, cond, v_c, mode=self.cfg.jvp_mode), None
        V = u + expand(h, x) * dudt
        return {"V": V, "u": u, "v": v, "v_g": v_g, "v_t": v_t, "v_c": v_c}

    def loss(self, net, x, y=None, *, step=0, t=None, r=None, noise=None, omega=None, t_min=None, t_max=None, cond=None):
        T = self.terms(net, x, y, step=step, t=t, r=r, noise=noise, omega=omega, t_min=t_min, t_max=t_max, cond=cond)
        p, c, d = self.cfg.norm_p, self.cfg.norm_eps, math.prod(x.shape[1:])
        sq_u = sum_sq(T["V"] - T["v_g"])
        per_sample = adaptive_weight(sq_u, p, c) * sq_u
        logs = {"mse": sq_u.detach().mean() / d, "u_v_mse": sum_sq(T["u"].detach() - T["v_t"]).mean() / d}
        if T["v"] is not None:  # the auxiliary head regresses the same guided velocity
            sq_v = sum_sq(T["v"] - T["v_g"])
            per_sample = per_sample + adaptive_weight(sq_v, p, c) * sq_v
            logs["mse_v"] = sq_v.detach().mean() / d
        loss = per_sample.mean()
        logs["loss"] = loss.detach()
        return loss, logs


COMPONENTS = {"imf": (ImprovedMeanFlow, IMFConfig, "improved MeanFlow: v-loss on u + (t-r) du/dt, guidance as input")}
