"""SplitMeanFlow (Guo et al.; arXiv 2507.16884), Algorithm 1. METHODS §3.

Interval-splitting consistency: for r <= s <= t the displacement is additive,

    (t - r) u(z_t, r, t) = (s - r) u(z_s, r, s) + (t - s) u(z_t, s, t),

so with s = (1 - λ) t + λ r, λ ~ U(0, 1), and z_s reached with the model's own step,

    u2 = u_θ(z_t, s, t),  z_s = z_t - (t - s) u2,  u1 = u_θ(z_s, r, s),
    L_split = ||u_θ(z_t, r, t) - sg((1 - λ) u1 + λ u2)||²,

with no JVP. The boundary samples (r = t) regress a velocity: e - x (teacher-free) or a
flow-matching teacher's velocity, optionally with a fixed CFG scale (the paper's two-stage
recipe). A warm-up of plain flow matching (all r = t) can precede the split loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mfcli.errors import MFError

from .common import TimeSampler, adaptive_weight, eval_mode, expand, null_labels, sum_sq, take, with_extra


@dataclass
class SplitMFConfig:
    time_sampler: str = "uniform"  # "uniform" (teacher-free reference) | "imagenet" | "cifar_paper" | "cifar_improved"
    ratio_r_neq_t: float = 0.5  # fraction of split samples; the boundary fraction 1 - this should be >= 0.5
    t_mean: float | None = None  # logit-normal overrides (None: the named sampler's value)
    t_std: float | None = None
    r_mean: float | None = None
    r_std: float | None = None
    norm_p: float = 0.0  # adaptive-weight power p (0: the paper's plain squared error)
    norm_eps: float = 0.01  # adaptive-weight constant c
    boundary_target: str = "velocity"  # "velocity": e - x (teacher-free); "teacher": a flow-matching teacher
    teacher_weights: str = ""  # weights file of the teacher backbone (loaded by the trainer, given via set_teacher)
    teacher_cfg_scale: float = 1.0  # fixed CFG scale of the teacher velocity (1 = no guidance)
    fm_warmup_steps: int = 0  # first steps are plain flow matching (every r = t), as the teacher-free reference
    label_drop_prob: float = 0.1  # labels -> null class (0 when distilling a guided teacher)


class SplitMeanFlow:
    """SplitMeanFlow loss; ``loss`` follows ``mfcli.api.Objective`` and also accepts a pinned ``split`` (λ)."""

    def __init__(self, cfg: SplitMFConfig | None = None, *, num_classes: int = 0, teacher: nn.Module | None = None):
        self.cfg = cfg = cfg or SplitMFConfig()
        self.num_classes = num_classes
        self.sampler = TimeSampler(cfg.time_sampler, cfg.ratio_r_neq_t, cfg.t_mean, cfg.t_std, cfg.r_mean, cfg.r_std)
        if cfg.boundary_target not in ("velocity", "teacher"):
            raise MFError(f"splitmf: boundary_target must be 'velocity' or 'teacher', got {cfg.boundary_target!r}")
        if cfg.teacher_cfg_scale != 1.0 and cfg.boundary_target != "teacher":
            raise MFError("splitmf: teacher_cfg_scale needs boundary_target = 'teacher'")
        if not 0.0 <= cfg.label_drop_prob < 1.0:
            raise MFError(f"label_drop_prob must lie in [0, 1), got {cfg.label_drop_prob}")
        self.teacher = None
        if teacher is not None:
            self.set_teacher(teacher)
        if num_classes and cfg.boundary_target == "teacher" and cfg.teacher_cfg_scale != 1.0:
            self.guidance, self.cfg_scale = "folded", cfg.teacher_cfg_scale
        else:
            self.guidance = "cfg" if num_classes and cfg.label_drop_prob > 0 else "none"
            self.cfg_scale = None

    def set_teacher(self, teacher: nn.Module) -> None:
        """A flow-matching backbone (called with h = 0) whose velocity is the boundary target. Frozen, eval mode."""
        self.teacher = teacher.eval().requires_grad_(False)

    # -- targets -----------------------------------------------------------------------------

    @torch.no_grad()
    def boundary_velocity(self, z, t, v, y, extra=None):
        """e - x, or the teacher's v_u + s (v_c - v_u) with its fixed CFG scale s."""
        if self.cfg.boundary_target == "velocity":
            return v
        if self.teacher is None:
            raise MFError("splitmf: boundary_target = 'teacher' but no teacher was given (set_teacher)")
        teacher = self.teacher
        p = next(teacher.parameters(), None)
        if p is not None and p.device != z.device:
            teacher.to(z.device)
        zero = torch.zeros_like(t)
        s = self.cfg.teacher_cfg_scale
        if y is None or s == 1.0:
            return teacher(z, t, zero, with_extra({} if y is None else {"y": y}, extra))
        n = z.shape[0]
        null = null_labels(n, self.num_classes, z.device)
        out = teacher(torch.cat([z, z]), torch.cat([t, t]), torch.cat([zero, zero]),
                      with_extra({"y": torch.cat([y, null])}, extra, repeat=2))
        v_c, v_u = out[:n], out[n:]
        # a dropped label is unconditional: its guided velocity is v_u
        return torch.where(expand(y == self.num_classes, z), v_u, v_u + s * (v_c - v_u))

    @torch.no_grad()
    def split_target(self, net, z, t, r, lam, cond):
        """(1 - λ) u_θ(z_s, r, s) + λ u_θ(z_t, s, t), z_s = z_t - (t - s) u_θ(z_t, s, t) (Algorithm 1)."""
        s = (1 - lam) * t + lam * r
        with eval_mode(net):  # a deterministic target, like the guidance forwards of mf
            u2 = net(z, t, t - s, cond)
            z_s = z - expand(t - s, z) * u2
            u1 = net(z_s, s, s - r, cond)
        return expand(1 - lam, z) * u1 + expand(lam, z) * u2

    # -- the loss ----------------------------------------------------------------------------

    def terms(self, net, x, y=None, *, step=0, t=None, r=None, noise=None, split=None, cond=None):
        n, dev, dt = x.shape[0], x.device, x.dtype
        if t is None:
            t, r = self.sampler(n, device=dev, dtype=dt)
        elif r is None:
            r = t
        if step < self.cfg.fm_warmup_steps:
            r = t
        e = torch.randn_like(x) if noise is None else noise
        z = (1 - expand(t, x)) * x + expand(t, x) * e
        v = e - x
        extra = dict(cond or {})  # per-sample conditioning from the caller (augmentation labels)
        cond = dict(extra)
        if self.num_classes:
            y = null_labels(n, self.num_classes, dev) if y is None else y
            drop = torch.rand(n, device=dev) < self.cfg.label_drop_prob
            cond["y"] = y = torch.where(drop, null_labels(n, self.num_classes, dev), y)
        else:
            y = None
        lam = torch.rand(n, device=dev, dtype=dt) if split is None else split
        u = net(z, t, t - r, cond)
        bnd = r == t
        target = torch.empty_like(x)
        if bnd.any():
            i = bnd.nonzero().squeeze(1)
            target[i] = self.boundary_velocity(z[i], t[i], v[i], None if y is None else y[i], take(extra, i, n))
        if not bnd.all():
            i = (~bnd).nonzero().squeeze(1)
            target[i] = self.split_target(net, z[i], t[i], r[i], lam[i], take(cond, i, n))
        return {"u": u, "target": target, "boundary": bnd, "v": v}

    def loss(self, net, x, y=None, *, step=0, t=None, r=None, noise=None, split=None, cond=None):
        T = self.terms(net, x, y, step=step, t=t, r=r, noise=noise, split=split, cond=cond)
        sq = sum_sq(T["u"] - T["target"])
        loss = (adaptive_weight(sq, self.cfg.norm_p, self.cfg.norm_eps) * sq).mean()
        d = math.prod(x.shape[1:])
        logs = {"loss": loss.detach(), "mse": sq.detach().mean() / d,
                "u_v_mse": sum_sq(T["u"].detach() - T["v"]).mean() / d}
        if T["boundary"].any():
            logs["mse_boundary"] = sq.detach()[T["boundary"]].mean() / d
        return loss, logs


COMPONENTS = {"splitmf": (SplitMeanFlow, SplitMFConfig, "SplitMeanFlow: interval-splitting target, no JVP")}
