"""Modular MeanFlow, MMF (You, Liu, He; arXiv 2508.17426). METHODS §4.

MeanFlow with a gradient-modulated JVP term:

    L_λ = E w ||u_θ(z_t, r, t) + (t - r) SG_λ[d/dt u_θ(z_t, r, t)] - ṽ||²,
    SG_λ[a] = λ a + (1 - λ) sg(a),

so that λ = 0 is exactly MeanFlow (same value and gradient) and λ = 1 backpropagates through
the JVP. The value of the loss does not depend on λ; only its gradient does. λ follows the
curriculum λ(step) = min(1, step / T_warmup), or is held fixed. Unlike ports that wrap the
whole target in a stop-gradient (where λ has no effect), the tangent here is computed with
its graph whenever λ > 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mfcli.errors import MFError

from .common import eval_mode, take
from .meanflow import MeanFlow, MFConfig


@dataclass
class MMFConfig(MFConfig):
    lambda_schedule: str = "warmup"  # "warmup": λ = min(1, step / lambda_warmup_steps); "fixed": λ = lambda_value
    lambda_value: float = 1.0  # λ for the "fixed" schedule, in [0, 1]
    lambda_warmup_steps: int = 5000  # T_warmup of the curriculum (0: λ = 1 from the start)
    jvp_tangent: str = "velocity"  # "velocity": ṽ (METHODS §4); "model": the model's own u_θ(z_t, t, h=0) (no grad)


class ModularMeanFlow(MeanFlow):
    """MMF loss; everything but the gradient through d/dt u is MeanFlow's (see ``meanflow.MeanFlow``)."""

    def __init__(self, cfg: MMFConfig | None = None, *, num_classes: int = 0):
        cfg = cfg or MMFConfig()
        super().__init__(cfg, num_classes=num_classes)
        if cfg.lambda_schedule not in ("warmup", "fixed"):
            raise MFError(f"mmf: lambda_schedule must be 'warmup' or 'fixed', got {cfg.lambda_schedule!r}")
        if not 0.0 <= cfg.lambda_value <= 1.0:
            raise MFError(f"mmf: lambda_value must lie in [0, 1], got {cfg.lambda_value}")
        if cfg.jvp_tangent not in ("velocity", "model"):
            raise MFError(f"mmf: jvp_tangent must be 'velocity' or 'model', got {cfg.jvp_tangent!r}")

    def lam(self, step: int) -> float:
        cfg = self.cfg
        if cfg.lambda_schedule == "fixed":
            return float(cfg.lambda_value)
        if cfg.lambda_warmup_steps <= 0:
            return 1.0
        return min(1.0, max(0.0, step / cfg.lambda_warmup_steps))

    def tangent(self, net, z, t, h, v_tilde, cond):
        """ṽ, or the model's own velocity u_θ(z_t, t, h=0 | y) where r != t.

        With λ > 0 and the tangent ṽ = e - x, the loss gains the θ-dependent variance term
        E||((t-r) ∂_z u - I)(ṽ - E[ṽ | z_t])||², whose minimiser is biased towards ∂_z u = I/(t-r)
        (at t = 1, r = 0 the one-step map x̂ = z - u collapses). A tangent that is a function of
        z_t alone (the model's velocity, as iMF does) has no such term. With CFG folded in, the
        model at h = 0 already predicts the guided velocity.
        """
        if self.cfg.jvp_tangent == "velocity":
            return v_tilde
        need = h > 0
        if not need.any():
            return v_tilde
        i = need.nonzero().squeeze(1)
        with torch.no_grad(), eval_mode(net):
            v_model = net(z[i], t[i], torch.zeros_like(t[i]), take(cond, i, z.shape[0]))
        return v_tilde.index_copy(0, i, v_model)

    def loss(self, net, x, y=None, *, step=0, t=None, r=None, noise=None, cond=None):
        loss, logs = super().loss(net, x, y, step=step, t=t, r=r, noise=noise, cond=cond)
        logs["lambda"] = torch.tensor(self.lam(step))
        return loss, logs


COMPONENTS = {"mmf": (ModularMeanFlow, MMFConfig, "Modular MeanFlow: gradient through the JVP scaled by λ")}
