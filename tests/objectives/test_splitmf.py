"""splitmf against a hand-written float64 evaluation of Algorithm 1 (METHODS §3)."""

import pytest
import torch
from helpers_objectives import TinyNet
from test_meanflow import K, _grads, _pinned

from mf_objectives.splitmf import SplitMeanFlow, SplitMFConfig


def hand_splitmf(net, x, y, t, r, e, lam, *, teacher=None, scale=1.0, p=0.0, c=0.01):
    total = 0.0
    for i in range(x.shape[0]):
        xi, ei, ti, ri, li = x[i:i + 1], e[i:i + 1], t[i:i + 1], r[i:i + 1], lam[i:i + 1]
        z, v = (1 - ti) * xi + ti * ei, ei - xi
        cond = {"y": y[i:i + 1]} if y is not None else {}
        with torch.no_grad():
            if ti == ri:
                if teacher is None:
                    target = v
                else:
                    zero = torch.zeros_like(ti)
                    v_c = teacher(z, ti, zero, cond)
                    v_u = teacher(z, ti, zero, {"y": torch.tensor([K])} if y is not None else {})
                    target = v_u + scale * (v_c - v_u) if int(y[i]) != K else v_u
            else:
                s = (1 - li) * ti + li * ri  # r <= s <= t
                u_st = net(z, ti, ti - s, cond)  # u(z_t, s, t)
                z_s = z - (ti - s) * u_st
                u_rs = net(z_s, s, s - ri, cond)  # u(z_s, r, s)
                # (t - r) u = (s - r) u_rs + (t - s) u_st, divided by (t - r)
                target = ((s - ri) * u_rs + (ti - s) * u_st) / (ti - ri)
        u = net(z, ti, ti - ri, cond)
        sq = ((u - target) ** 2).sum()
        total = total + sq / (sq.detach() + c) ** p
    return total / x.shape[0]


@pytest.mark.parametrize("teacher_scale", [None, 1.0, 3.0])
@pytest.mark.parametrize("p", [0.0, 1.0])
def test_splitmf_loss_and_gradient_match_hand_evaluation(teacher_scale, p):
    net = TinyNet(num_classes=K)
    x, y, t, r, e = _pinned()
    lam = torch.linspace(0.1, 0.9, 8, dtype=torch.float64)
    if teacher_scale is None:
        cfg, teacher = SplitMFConfig(label_drop_prob=0.0, norm_p=p), None
    else:
        cfg = SplitMFConfig(label_drop_prob=0.0, norm_p=p, boundary_target="teacher", teacher_cfg_scale=teacher_scale)
        teacher = TinyNet(num_classes=K, seed=7)
    obj = SplitMeanFlow(cfg, num_classes=K, teacher=teacher)
    loss, logs = obj.loss(net, x, y, t=t, r=r, noise=e, split=lam)
    hand = hand_splitmf(net, x, y, t, r, e, lam, teacher=teacher, scale=teacher_scale or 1.0, p=p)
    torch.testing.assert_close(loss, hand, rtol=1e-10, atol=0)
    for a, b in zip(_grads(loss, net), _grads(hand, net)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)
    assert {"loss", "mse", "u_v_mse", "mse_boundary"} <= set(logs)
    if teacher is not None:
        assert all(not q.requires_grad for q in teacher.parameters())


def test_splitmf_teacher_setter_and_missing_teacher():
    x, y, t, r, e = _pinned()
    obj = SplitMeanFlow(SplitMFConfig(boundary_target="teacher", teacher_cfg_scale=2.0), num_classes=K)
    assert obj.guidance == "folded" and obj.cfg_scale == 2.0
    with pytest.raises(Exception, match="no teacher"):
        obj.loss(TinyNet(num_classes=K), x, y, t=t, r=r, noise=e)
    obj.set_teacher(TinyNet(num_classes=K, seed=3))
    obj.loss(TinyNet(num_classes=K), x, y, t=t, r=r, noise=e)[0].backward()
    with pytest.raises(Exception, match="teacher_cfg_scale"):
        SplitMeanFlow(SplitMFConfig(teacher_cfg_scale=2.0))


def test_splitmf_warmup_is_flow_matching():
    net = TinyNet()
    x, _, t, r, e = _pinned()
    obj = SplitMeanFlow(SplitMFConfig(fm_warmup_steps=10))
    T = obj.terms(net, x, t=t, r=r, noise=e, step=9)
    assert T["boundary"].all() and torch.equal(T["target"], e - x)
    T = obj.terms(net, x, t=t, r=r, noise=e, step=10)
    assert not T["boundary"].all()


def test_splitmf_defaults():
    obj = SplitMeanFlow()
    assert 1 - obj.cfg.ratio_r_neq_t >= 0.5 and obj.guidance == "none"
    assert SplitMeanFlow(num_classes=K).guidance == "cfg"
