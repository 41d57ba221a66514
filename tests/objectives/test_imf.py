"""imf against a hand-written float64 evaluation of METHODS §2.1."""

import math

import pytest
import torch
from helpers_objectives import TinyNet, fd_dudt
from test_meanflow import K, _grads, _pinned

from mf_objectives.imf import IMFConfig, ImprovedMeanFlow


def hand_imf(net, x, y, t, r, e, omega, t_min, t_max, *, head, p=1.0, c=0.01):
    total = 0.0
    for i in range(x.shape[0]):
        xi, ei, ti, ri = x[i:i + 1], e[i:i + 1], t[i:i + 1], r[i:i + 1]
        z, v_t = (1 - ti) * xi + ti * ei, ei - xi
        one, zero = torch.ones_like(ti), torch.zeros_like(ti)
        fm = bool(ti == ri)
        lo, hi = (0.0, 1.0) if fm else (float(t_min[i]), float(t_max[i]))
        w = float(omega[i]) if lo <= float(ti) <= hi else 1.0

        def vel(label, om):  # v head (or u at h = 0), guidance interval [0, 1]
            c_ = {"y": label, "omega": om * one, "t_min": zero, "t_max": one, "return_v": head}
            with torch.no_grad():
                out = net(z, ti, zero, c_)
            return out[1] if head else out

        if y is not None:
            v_c, v_u = vel(y[i:i + 1], w), vel(torch.tensor([K]), 1.0)
            v_g = v_t + (1 - 1 / w) * (v_c - v_u)
            cond = {"y": y[i:i + 1], "omega": omega[i:i + 1], "t_min": lo * one, "t_max": hi * one}
        else:
            v_c = vel(None, 1.0) if head else net(z, ti, zero).detach()
            v_g, cond = v_t, {}
        if y is not None and int(y[i]) == K:
            v_g = v_t
        dudt = fd_dudt(lambda a, b, h_: net(a, b, h_, cond), z, ti, ti - ri, v_c)
        u = net(z, ti, ti - ri, cond)
        V = u + (ti - ri) * dudt
        sq = ((V - v_g) ** 2).sum()
        total = total + sq / (sq.detach() + c) ** p
        if head:
            v = net(z, ti, ti - ri, dict(cond, return_v=True))[1]
            sq = ((v - v_g) ** 2).sum()
            total = total + sq / (sq.detach() + c) ** p
    return total / x.shape[0]


@pytest.mark.parametrize("mode", ["fused", "split"])
@pytest.mark.parametrize("conditional", [True, False])
@pytest.mark.parametrize("head", [True, False])
def test_imf_loss_and_gradient_match_hand_evaluation(head, conditional, mode):
    nc = K if conditional else 0
    net = TinyNet(num_classes=nc, v_head=head)
    x, y, t, r, e = _pinned()
    y = y if conditional else None
    g = torch.Generator().manual_seed(3)
    omega = 1 + 7 * torch.rand(8, generator=g, dtype=torch.float64)
    t_min = 0.5 * torch.rand(8, generator=g, dtype=torch.float64)
    t_max = 0.5 + 0.5 * torch.rand(8, generator=g, dtype=torch.float64)
    t_min[1], t_max[3] = 0.75, 0.25  # t = 0.7 outside [0.75, .]; t = 0.3 outside [., 0.25]: ω_eff = 1 there
    obj = ImprovedMeanFlow(IMFConfig(label_drop_prob=0.0, jvp_mode=mode, v_source="head" if head else "boundary"),
                           num_classes=nc)
    loss, logs = obj.loss(net, x, y, t=t, r=r, noise=e, omega=omega, t_min=t_min, t_max=t_max)
    hand = hand_imf(net, x, y, t, r, e, omega, t_min, t_max, head=head)
    torch.testing.assert_close(loss, hand, rtol=1e-8, atol=0)
    for a, b in zip(_grads(loss, net), _grads(hand, net)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert {"loss", "mse", "u_v_mse"} <= set(logs) and (("mse_v" in logs) == head)


def test_imf_omega_power_law():
    from scipy import stats

    for beta in (1.0, 2.0, 0.5):
        obj = ImprovedMeanFlow(IMFConfig(omega_beta=beta))
        w = obj.sample_omega(20000, device="cpu", dtype=torch.float64).numpy()
        assert w.min() >= 1 and w.max() <= 8

        def cdf(a, b=beta):  # ∫_1^a ω^-β / ∫_1^8 ω^-β
            if b == 1.0:
                return math.log(a) / math.log(8) if a >= 1 else 0.0
            return (a ** (1 - b) - 1) / (8 ** (1 - b) - 1)

        import numpy as np

        assert stats.kstest(w, np.vectorize(cdf)).pvalue > 1e-3


def test_imf_defaults_and_guidance():
    obj = ImprovedMeanFlow(num_classes=10)
    assert obj.guidance == "input" and obj.cfg.ratio_r_neq_t == 0.5 and obj.cfg.norm_p == 1.0
    assert ImprovedMeanFlow(num_classes=0).guidance == "none"
    net = TinyNet(num_classes=K)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    with pytest.raises(Exception, match="v head"):
        ImprovedMeanFlow(IMFConfig(v_source="head"), num_classes=K).loss(net, x, torch.zeros(4, dtype=torch.long))


def test_imf_rejects_net_without_guidance_inputs():
    from mf_backbones.mlp import MLP, MLPConfig

    net = MLP(MLPConfig(width=8, depth=1), shape=(2,), num_classes=3)
    with pytest.raises(Exception, match="omega"):
        ImprovedMeanFlow(num_classes=3).loss(net, torch.randn(4, 2), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("num_classes", [0, 3])
def test_imf_on_the_in_context_dit_fused_equals_split(num_classes):
    dit_ic = pytest.importorskip("mf_backbones.dit_incontext")
    cfg = dit_ic.InContextDiTConfig(depth=2, hidden=32, heads=2, patch=2, head_depth=1, class_tokens=2,
                                    omega_tokens=1, interval_tokens=1, time_tokens=1)
    torch.manual_seed(0)
    net = dit_ic.build_dit_ic(cfg, shape=(2, 4, 4), num_classes=num_classes)
    with torch.no_grad():  # the zero-initialised output layers would make every tangent zero
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(6, 2, 4, 4)
    y = torch.randint(0, num_classes, (6,)) if num_classes else None
    t = torch.tensor([0.9, 0.8, 0.6, 0.5, 0.3, 0.95])
    r = torch.tensor([0.9, 0.1, 0.6, 0.2, 0.0, 0.5])
    e = torch.randn_like(x)
    pins = dict(omega=torch.full((6,), 3.0), t_min=torch.full((6,), 0.1), t_max=torch.full((6,), 0.9))
    out = {}
    for mode in ("fused", "split"):
        obj = ImprovedMeanFlow(IMFConfig(jvp_mode=mode, label_drop_prob=0.0), num_classes=num_classes)
        loss, _ = obj.loss(net, x, y, t=t, r=r, noise=e, **pins)
        out[mode] = (loss.detach(), torch.autograd.grad(loss, list(net.parameters())))
    torch.testing.assert_close(out["fused"][0], out["split"][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(out["fused"][1], out["split"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
