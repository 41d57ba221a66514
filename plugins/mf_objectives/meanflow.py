"""MeanFlow (Geng, Deng, Bai, Kolter, He; arXiv 2505.13447), with CFG folded into training
and the optional time-gap curriculum of Kim et al. (arXiv 2511.19065).

The network predicts the average velocity u(z_t, r, t) = 1/(t-r) ∫_r^t v(z_τ, τ) dτ. Along the
trajectory it satisfies the MeanFlow identity (Eq. 6)

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),   d/dt u = v·∂_z u + ∂_t u,

so the regression target is u_tgt = sg(ṽ - (t - r) d/dt u_θ) (Eq. 10), with d/dt u_θ a JVP
of the network along (ṽ, dt = 1, dr = 0). The loss per sample is the adaptively weighted
sum of squares ||Δ||² / sg(||Δ||² + c)^p (adaptive loss weighting). METHODS §1 is the exact spec.
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
class MFConfig:
    # (t, r) sampler, METHODS §1.3
    time_sampler: str = "imagenet"  # "imagenet" | "cifar_paper" | "cifar_improved" | "uniform"
    ratio_r_neq_t: float = 0.25  # fraction of samples with r != t (official JAX data_proportion = 1 - this)
    t_mean: float | None = None  # logit-normal mean of t (None: the named sampler's value)
    t_std: float | None = None  # logit-normal std of t (None: the named sampler's value)
    r_mean: float | None = None  # logit-normal mean of r (None: the named sampler's value)
    r_std: float | None = None  # logit-normal std of r (None: the named sampler's value)
    # loss, §1.1
    norm_p: float = 1.0  # adaptive-weight power p (ImageNet 1.0, CIFAR 0.75; 0 = plain L2)
    norm_eps: float = 0.01  # adaptive-weight constant c (ImageNet 0.01, CIFAR 1e-3)
    clip_gap: bool = True  # clip (t - r) to [0, 1] in the target, as the JAX code does
    # classifier-free guidance folded into training, §1.4 (class-conditional data only)
    cfg_omega: float = 1.0  # ω; 1.0 with κ = 0 disables the folded guidance
    cfg_kappa: float = 0.0  # κ (Eq. 21): mixes in the model's own conditional velocity; effective scale ω/(1-κ)
    cfg_t_min: float = 0.0  # guidance interval: ω, κ act only for t in [cfg_t_min, cfg_t_max]
    cfg_t_max: float = 1.0
    label_drop_prob: float = 0.1  # labels -> null class; those samples regress the plain velocity
    # performance
    # "split": gradient forward + no-grad jvp (RNG restored); "fused": one jvp whose primal carries the gradient.
    # benchmarks/RESULTS.md: fused is usually a few % faster but holds the tangent's graph (up to 1.6-2.1x fm
    # memory at ratio 0.25); split stays within 1.2x, so it is the default. Fused whenever gradients flow through du/dt.
    jvp_mode: str = "split"
    # time-gap curriculum, METHODS §6: weight β(Δt, s) = 1 - s + λ s (1 - Δt) on the r != t samples
    gap_curriculum: bool = False  # enable the curriculum
    gap_curriculum_steps: int = 0  # steps T over which s = 1 - (step/T)^k goes from 1 to 0 (set to the run length)
    gap_curriculum_power: float = 1.0  # k (1 = linear, the paper's best)


class MeanFlow:
    """MeanFlow loss. See the module docstring; ``loss`` follows ``mfcli.api.Objective``."""

    def __init__(self, cfg: MFConfig | None = None, *, num_classes: int = 0):
        self.cfg = cfg = cfg or MFConfig()
        self.num_classes = num_classes
        self.sampler = TimeSampler(cfg.time_sampler, cfg.ratio_r_neq_t, cfg.t_mean, cfg.t_std, cfg.r_mean, cfg.r_std)
        if cfg.jvp_mode not in JVP_MODES:
            raise MFError(f"unknown jvp_mode {cfg.jvp_mode!r}; choose one of {', '.join(JVP_MODES)}")
        if not 0.0 <= cfg.cfg_t_min <= cfg.cfg_t_max <= 1.0:
            raise MFError(f"need 0 <= cfg_t_min <= cfg_t_max <= 1, got [{cfg.cfg_t_min}, {cfg.cfg_t_max}]")
        if cfg.cfg_kappa < 0 or cfg.cfg_kappa >= 1 or cfg.cfg_omega <= 0:
            raise MFError(f"need cfg_omega > 0 and 0 <= cfg_kappa < 1, got ω={cfg.cfg_omega}, κ={cfg.cfg_kappa}")
        if not 0.0 <= cfg.label_drop_prob < 1.0:
            raise MFError(f"label_drop_prob must lie in [0, 1), got {cfg.label_drop_prob}")
        self.guided = bool(num_classes) and (cfg.cfg_omega != 1.0 or cfg.cfg_kappa != 0.0)
        if self.guided:
            # the model learns the guided field of effective scale ω' = ω / (1 - κ) (Eq. 21):
            # sample with 1 NFE and no external CFG
            self.guidance, self.cfg_scale = "folded", cfg.cfg_omega / (1.0 - cfg.cfg_kappa)
        else:
            self.guidance = "cfg" if num_classes and cfg.label_drop_prob > 0 else "none"
            self.cfg_scale = None
        self.gap_lambda = None
        if cfg.gap_curriculum:
            if cfg.gap_curriculum_steps <= 0:
                raise MFError("gap_curriculum needs gap_curriculum_steps > 0 (the number of training steps)")
            self.gap_lambda = self._gap_normaliser()

    # -- random draws ---------------------------------------------------------------------

    def sample_tr(self, n: int, *, device, dtype):
        return self.sampler(n, device=device, dtype=dtype)

    def drop_labels(self, y: torch.Tensor | None, n: int, device):
        """Labels fed to the net and the mask of null-label samples (these regress the plain velocity).

        As in the official code, n_drop ~ Binomial(B, p) and the FIRST n_drop samples are dropped;
        with the "imagenet" sampler these are r = t samples (the unconditional field is then only
        trained at h = 0, which is all the guidance target needs). Labels already equal to the
        null class count as dropped.
        """
        if not self.num_classes:
            return None, torch.zeros(n, dtype=torch.bool, device=device)
        if y is None:
            y = null_labels(n, self.num_classes, device)
        n_drop = int((torch.rand(n, device=device) < self.cfg.label_drop_prob).sum())
        y = torch.where(torch.arange(n, device=device) < n_drop, null_labels(n, self.num_classes, device), y)
        return y, y == self.num_classes

    # -- guidance target, §1.4 -----------------------------------------------------------

    @torch.no_grad()
    def guided_velocity(self, net, z, t, v, y, dropped, extra=None):
        """ṽ = ω v + κ v_c + (1 - ω - κ) v_u inside the guidance interval; ṽ = v outside and on dropped samples.

        v_u = u_θ(z_t, t, h=0, ∅) and v_c = u_θ(z_t, t, h=0, y) are the model's own instantaneous
        velocities (eval mode, no gradient). MeanFlow Eq. 19 (κ = 0) and Eq. 21.
        """
        if not self.guided:
            return v
        cfg = self.cfg
        act = ~dropped & (t >= cfg.cfg_t_min) & (t <= cfg.cfg_t_max)
        if not act.any():
            return v
        i = act.nonzero().squeeze(1)
        zi, ti, vi = z[i], t[i], v[i]
        m = len(i)
        null = null_labels(m, self.num_classes, z.device)
        with eval_mode(net):
            if cfg.cfg_kappa == 0:
                v_u = net(zi, ti, torch.zeros_like(ti), with_extra({"y": null}, extra, i, len(z)))
                g = v_u + cfg.cfg_omega * (vi - v_u)
            else:  # one pass over [∅; y] instead of two
                zero = torch.zeros(2 * m, dtype=ti.dtype, device=ti.device)
                out = net(torch.cat([zi, zi]), torch.cat([ti, ti]), zero,
                          with_extra({"y": torch.cat([null, y[i]])}, extra, i, len(z), repeat=2))
                v_u, v_c = out[:m], out[m:]
                g = cfg.cfg_omega * vi + cfg.cfg_kappa * v_c + (1 - cfg.cfg_omega - cfg.cfg_kappa) * v_u
        return v.index_copy(0, i, g.to(v.dtype))  # the forwards may have run under autocast

    # -- curriculum, §6 ----------------------------------------------------------------------

    def _gap_normaliser(self) -> float:
        """λ = 1 / E[1 - Δt] over the r != t samples of the sampler, so β averages 1 at s = 1.

        Estimated once from 2^18 draws with a fixed seed (the global RNG is left untouched).
        """
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            t, r = self.sampler(1 << 18, dtype=torch.float64)
        gap = (t - r)[t > r]
        if gap.numel() == 0:
            return 1.0
        return float(1.0 / (1.0 - gap).mean())

    def gap_weight(self, gap: torch.Tensor, step: int) -> torch.Tensor:
        """β(Δt, s) = 1 - s + λ s (1 - Δt), s = 1 - (step / T)^k (Kim et al., METHODS §6); 1 when disabled."""
        if self.gap_lambda is None:
            return torch.ones_like(gap)
        cfg = self.cfg
        s = 1.0 - min(1.0, max(0.0, step / cfg.gap_curriculum_steps)) ** cfg.gap_curriculum_power
        return 1.0 - s + self.gap_lambda * s * (1.0 - gap)

    # -- the loss ------------------------------------------------------------------------

    def lam(self, step: int) -> float:
        """Gradient fraction through d/dt u (0 for MeanFlow; Modular MeanFlow overrides)."""
        return 0.0

    def tangent(self, net, z, t, h, v_tilde, cond):
        """The z-tangent of the JVP: the (guided) conditional velocity ṽ (MeanFlow Eq. 8)."""
        return v_tilde

    def terms(self, net, x, y=None, *, step=0, t=None, r=None, noise=None, cond=None):
        """Prediction u, target u_tgt and their parts for the batch (all per sample).

        ``cond``: per-sample conditioning from the caller (augmentation labels), passed to
        every network call with the rows of the samples that call sees."""
        n = x.shape[0]
        if t is None:
            t, r = self.sample_tr(n, device=x.device, dtype=x.dtype)
        elif r is None:
            r = t
        e = torch.randn_like(x) if noise is None else noise
        z = (1 - expand(t, x)) * x + expand(t, x) * e
        v = e - x
        y_in, dropped = self.drop_labels(y, n, x.device)
        extra = dict(cond or {})
        cond = with_extra({} if y_in is None else {"y": y_in}, extra)
        v_tilde = self.guided_velocity(net, z, t, v, y_in, dropped, extra)
        lam = self.lam(step)
        h = t - r
        tangent = self.tangent(net, z, t, h, v_tilde, cond)
        u, dudt = u_and_dudt(net, z, t, h, cond, tangent, mode=self.cfg.jvp_mode, differentiable=lam > 0)
        gap = h.clamp(0.0, 1.0) if self.cfg.clip_gap else h
        # Δ = u - sg(ṽ - gap·du/dt) for λ = 0; Modular MeanFlow lets a fraction λ of the gradient through du/dt
        dudt_mod = dudt.detach() if lam == 0 else lam * dudt + (1 - lam) * dudt.detach()
        delta = u + expand(gap, x) * dudt_mod - v_tilde
        target = (v_tilde - expand(gap, x) * dudt).detach()
        return {"u": u, "target": target, "delta": delta, "v": v, "v_tilde": v_tilde, "gap": gap, "t": t, "r": r}

    def loss(self, net, x, y=None, *, step=0, t=None, r=None, noise=None, cond=None):
        T = self.terms(net, x, y, step=step, t=t, r=r, noise=noise, cond=cond)
        sq = sum_sq(T["delta"])
        w = adaptive_weight(sq, self.cfg.norm_p, self.cfg.norm_eps)
        gap = T["gap"]
        w = w * torch.where(gap > 0, self.gap_weight(gap, step), torch.ones_like(gap))
        loss = (w * sq).mean()
        d = math.prod(x.shape[1:])
        logs = {
            "loss": loss.detach(),
            "mse": sq.detach().mean() / d,
            "u_v_mse": sum_sq(T["u"].detach() - T["v"]).mean() / d,
        }
        return loss, logs


COMPONENTS = {"mf": (MeanFlow, MFConfig, "MeanFlow: JVP target, adaptive weight, CFG folded into training")}
