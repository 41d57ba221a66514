"""Flow matching (Lipman et al. 2023; rectified flow, Liu et al. 2023): the r = t case of MeanFlow.

The network is called with h = 0 and regresses the conditional velocity v = e - x, whose
conditional mean is the marginal velocity v(z_t, t) (METHODS §0). Used as the baseline and
as the teacher of SplitMeanFlow's boundary term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mfcli.errors import MFError

from .common import adaptive_weight, expand, logit_normal, null_labels, sum_sq


@dataclass
class FMConfig:
    time_sampler: str = "logit_normal"  # "logit_normal" (t ~ sigmoid(N(t_mean, t_std²))) or "uniform"
    t_mean: float = -0.4  # logit-normal mean of t
    t_std: float = 1.0  # logit-normal std of t
    label_drop_prob: float = 0.1  # labels replaced by the null class, for classifier-free guidance at sampling
    norm_p: float = 0.0  # adaptive-weight power p (0 = plain squared error)
    norm_eps: float = 0.01  # adaptive-weight constant c


class FlowMatching:
    """L = E ||u_θ(z_t, t, h=0, y) - (e - x)||², summed over dims, averaged over the batch."""

    def __init__(self, cfg: FMConfig | None = None, *, num_classes: int = 0):
        self.cfg = cfg = cfg or FMConfig()
        if cfg.time_sampler not in ("logit_normal", "uniform"):
            raise MFError(f"fm: unknown time_sampler {cfg.time_sampler!r}; choose 'logit_normal' or 'uniform'")
        if not 0.0 <= cfg.label_drop_prob < 1.0:
            raise MFError(f"fm: label_drop_prob must lie in [0, 1), got {cfg.label_drop_prob}")
        self.num_classes = num_classes
        # a conditional model trained with label dropout is guided at sampling by classic CFG
        self.guidance = "cfg" if num_classes and cfg.label_drop_prob > 0 else "none"
        self.cfg_scale = None

    def sample_t(self, n: int, *, device, dtype) -> torch.Tensor:
        if self.cfg.time_sampler == "uniform":
            return torch.rand(n, device=device, dtype=dtype)
        return logit_normal(n, self.cfg.t_mean, self.cfg.t_std, device=device, dtype=dtype)

    def loss(self, net, x, y=None, *, step=0, t=None, r=None, noise=None, cond=None):
        n = x.shape[0]
        t = self.sample_t(n, device=x.device, dtype=x.dtype) if t is None else t
        if r is not None and not torch.equal(r, t):
            raise MFError("fm trains only the r = t case; got r != t")
        e = torch.randn_like(x) if noise is None else noise
        z = (1 - expand(t, x)) * x + expand(t, x) * e
        v = e - x
        cond = dict(cond or {})  # per-sample conditioning from the caller (augmentation labels)
        if self.num_classes and y is not None:
            drop = torch.rand(n, device=x.device) < self.cfg.label_drop_prob
            cond["y"] = torch.where(drop, null_labels(n, self.num_classes, x.device), y)
        u = net(z, t, torch.zeros_like(t), cond)
        sq = sum_sq(u - v)
        loss = (adaptive_weight(sq, self.cfg.norm_p, self.cfg.norm_eps) * sq).mean()
        mse = sq.detach().mean() / v[0].numel()
        return loss, {"loss": loss.detach(), "mse": mse}


COMPONENTS = {"fm": (FlowMatching, FMConfig, "flow matching (r = t), baseline and SplitMeanFlow teacher")}
