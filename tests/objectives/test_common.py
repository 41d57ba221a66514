"""The shared pieces: the JVP against finite differences, the r != t subset path against the
full batch, fused against split, and the (t, r) samplers."""

import math

import pytest
import torch
from torch import nn
from helpers_objectives import TinyNet, fd_dudt

from mf_objectives.common import TIME_SAMPLERS, TimeSampler, adaptive_weight, jvp_u, u_and_dudt


def _batch(n=7, shape=(2, 3), num_classes=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.8 + 0.1
    h = t * torch.rand(n, generator=g, dtype=torch.float64)
    tan = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    cond = {"y": torch.randint(0, num_classes + 1, (n,), generator=g)} if num_classes else {}
    return z, t, h, tan, cond


@pytest.mark.parametrize("mode", ["fused", "split"])
def test_jvp_matches_central_differences(mode):
    net = TinyNet(num_classes=3)
    z, t, h, tan, cond = _batch(num_classes=3)
    u, dudt = jvp_u(net, z, t, h, cond, tan, mode=mode)
    fd = fd_dudt(lambda a, b, c: net(a, b, c, cond), z, t, h, tan)
    torch.testing.assert_close(u, net(z, t, h, cond), rtol=0, atol=1e-13)
    torch.testing.assert_close(dudt, fd, rtol=1e-7, atol=1e-9)
    assert not dudt.requires_grad and u.requires_grad


def test_jvp_tangent_is_along_t_and_h_together():
    # (v, 1, 1) over (z, t, h) is (v, 0, 1) over (z, r, t): moving t with r fixed moves h too.
    net = TinyNet()
    z, t, h, tan, cond = _batch()
    _, dudt = jvp_u(net, z, t, h, cond, tan)
    wrong = fd_dudt(lambda a, b, c: net(a, b, c - (b - t)), z, t, h, tan)  # h held fixed instead
    assert (dudt - wrong).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["fused", "split"])
def test_subset_path_equals_full_batch(mode):
    net = TinyNet(num_classes=3)
    z, t, h, tan, cond = _batch(n=9, num_classes=3)
    h[::3] = 0  # a third of the samples with r = t
    u_sub, d_sub = u_and_dudt(net, z, t, h, cond, tan, mode=mode)
    u_all, d_all = jvp_u(net, z, t, h, cond, tan, mode=mode)
    torch.testing.assert_close(u_sub, u_all, rtol=1e-12, atol=1e-13)
    need = h > 0
    torch.testing.assert_close(d_sub[need], d_all[need], rtol=1e-12, atol=1e-13)
    assert (d_sub[~need] == 0).all()
    w = torch.randn_like(u_sub)
    g_sub = torch.autograd.grad((u_sub * w).sum(), list(net.parameters()))
    g_all = torch.autograd.grad((u_all * w).sum(), list(net.parameters()))
    for a, b in zip(g_sub, g_all):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_subset_path_with_aux_v_head():
    net = TinyNet(num_classes=3, v_head=True)
    z, t, h, tan, cond = _batch(n=8, num_classes=3)
    h[:4] = 0
    cond["return_v"] = True
    (u, v), d = u_and_dudt(net, z, t, h, cond, tan)
    u_ref, v_ref = net(z, t, h, cond)
    torch.testing.assert_close(u, u_ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(v, v_ref, rtol=1e-12, atol=1e-13)
    fd = fd_dudt(lambda a, b, c: net(a, b, c, {k: x for k, x in cond.items() if k != "return_v"}), z, t, h, tan)
    torch.testing.assert_close(d[4:], fd[4:], rtol=1e-7, atol=1e-9)


def test_split_restores_rng_so_dropout_masks_match():
    net = TinyNet(dropout=0.5).train()
    z, t, h, tan, cond = _batch(n=16)
    torch.manual_seed(5)
    u_f, d_f = jvp_u(net, z, t, h, cond, tan, mode="fused")
    torch.manual_seed(5)
    u_s, d_s = jvp_u(net, z, t, h, cond, tan, mode="split")
    torch.testing.assert_close(u_s, u_f, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(d_s, d_f, rtol=1e-12, atol=1e-13)
    # without the restore, the tangent sees other masks (shows the check has power)
    torch.manual_seed(5)
    net(z, t, h, cond)
    _, d_other = jvp_u(net, z, t, h, cond, tan, mode="fused")
    assert (d_other - d_f).abs().max() > 1e-3


def test_differentiable_jvp_gradient_matches_finite_differences():
    # d/dθ of <w, du/dt> through the tangent (needed by Modular MeanFlow), checked along a random direction
    net = TinyNet()
    z, t, h, tan, cond = _batch(n=5)
    w = torch.randn_like(z)
    _, d = jvp_u(net, z, t, h, cond, tan, differentiable=True)
    grads = torch.autograd.grad((d * w).sum(), list(net.parameters()), allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, net.parameters())]
    dirs = [torch.randn_like(p) for p in net.parameters()]
    analytic = sum((g * q).sum() for g, q in zip(grads, dirs))
    eps, vals = 1e-5, []
    for sgn in (1, -1):
        with torch.no_grad():
            for p, q in zip(net.parameters(), dirs):
                p.add_(sgn * eps * q)
        vals.append((fd_dudt(lambda a, b, c: net(a, b, c), z, t, h, tan, eps=1e-4) * w).sum())
        with torch.no_grad():
            for p, q in zip(net.parameters(), dirs):
                p.sub_(sgn * eps * q)
    numeric = (vals[0] - vals[1]) / (2 * eps)
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-7)


# -- samplers -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TIME_SAMPLERS))
@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_time_sampler_fraction_and_order(name, ratio):
    s = TimeSampler(name, ratio)
    t, r = s(20000, dtype=torch.float64)
    assert ((0 <= r) & (r <= t) & (t <= 1)).all()
    frac = (r != t).double().mean().item()
    expected = ratio
    if name == "cifar_improved":
        # r = min(t, r) turns the draws with r' > t' into r = t as well (py-meanflow v1):
        # P(r' < t') = P(N(-4, 1.6²) < N(-0.6, 1.6²)) = Φ(3.4 / (1.6 √2))
        expected = ratio * 0.5 * (1 + math.erf(3.4 / (1.6 * math.sqrt(2)) / math.sqrt(2)))
    assert abs(frac - expected) < 4 * math.sqrt(expected * (1 - expected) / 20000) + 1e-4


def test_imagenet_sampler_puts_r_eq_t_first_as_the_official_code():
    t, r = TimeSampler("imagenet", 0.25)(512)
    assert (r[:384] == t[:384]).all() and (r[384:] < t[384:]).all()


def test_logit_normal_parameters():
    # t' and r' ~ sigmoid(N(-0.4, 1)); max/min of two iid draws: median of logit(min) = m - 0.545 s ...
    # Simpler invariant: the mean of logit(t) + logit(r) over r != t samples is 2 * mean.
    t, r = TimeSampler("imagenet", 1.0)(200000, dtype=torch.float64)
    lt, lr = torch.logit(t), torch.logit(r)
    assert abs((lt + lr).mean().item() / 2 - (-0.4)) < 0.01
    assert abs(((lt + lr) / 2).var().item() - 0.5) < 0.01  # var of the mean of two iid N(., 1)
    t, r = TimeSampler("cifar_improved", 1.0)(200000, dtype=torch.float64)
    # r ~ LN(-4, 1.6) then min(t, r): the t-marginal is untouched
    lt = torch.logit(t)
    assert abs(lt.mean().item() + 0.6) < 0.02 and abs(lt.std().item() - 1.6) < 0.02


def test_adaptive_weight():
    sq = torch.tensor([0.0, 1.0, 3.0], requires_grad=True)
    w = adaptive_weight(sq, 0.75, 1e-3)
    torch.testing.assert_close(w, (sq.detach() + 1e-3) ** -0.75)
    assert not w.requires_grad
    assert (adaptive_weight(sq, 0.0, 1e-3) == 1).all()


def test_jvp_runs_in_fp32_under_autocast():
    # the engine may wrap the step in bf16 autocast; the tangent must still be fp32-accurate
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 64), nn.SiLU(), nn.Linear(64, 2))

    def f(z, t, h, cond=None):
        return net(torch.cat([z, t[:, None], h[:, None]], 1))

    g = torch.Generator().manual_seed(0)
    z, tan = torch.randn(16, 2, generator=g), torch.randn(16, 2, generator=g)
    t = torch.rand(16, generator=g) * 0.9 + 0.1
    h = t * torch.rand(16, generator=g)
    h[:8] = 0
    u_ref, d_ref = u_and_dudt(f, z, t, h, {}, tan)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u, d = u_and_dudt(f, z, t, h, {}, tan)
        plain = f(z, t, h)
    assert plain.dtype == torch.bfloat16 and u.dtype == d.dtype == torch.float32
    torch.testing.assert_close(d, d_ref, rtol=1e-6, atol=1e-6)  # fp32 tangent
    torch.testing.assert_close(u[8:], u_ref[8:], rtol=1e-6, atol=1e-6)
    assert (u[:8] - u_ref[:8]).abs().max() > 1e-5  # the r = t forwards did run in bf16


@pytest.mark.parametrize("norm", ["layer_norm", "layer_norm_affine", "group_norm"])
def test_differentiable_jvp_through_normalisation_layers(norm):
    # torch's forward-mode rule of layer_norm is not backpropagated correctly; the differentiable
    # JVP must still give the true gradient of <w, du/dt> (central differences in parameter space)
    torch.manual_seed(0)
    layer = {"layer_norm": nn.LayerNorm(8, elementwise_affine=False), "layer_norm_affine": nn.LayerNorm(8),
             "group_norm": nn.GroupNorm(2, 8)}[norm]
    inp, out = nn.Linear(10, 8), nn.Linear(8, 2)
    seq = nn.Sequential(inp, layer, nn.SiLU(), out).double()
    if norm != "layer_norm":
        with torch.no_grad():
            layer.weight.add_(0.3 * torch.randn_like(layer.weight))

    def net(z, t, h, cond=None):
        return seq(torch.cat([z, t[:, None].expand(-1, 4), h[:, None].expand(-1, 4)], 1))

    z, t, h, tan, _ = _batch(n=5, shape=(2,))
    w = torch.randn(5, 2, dtype=torch.float64)
    params = list(seq.parameters())
    _, d = jvp_u(net, z, t, h, {}, tan, differentiable=True)
    grads = torch.autograd.grad((d * w).sum(), params, allow_unused=True)
    dirs = [torch.randn_like(p) for p in params]
    analytic = sum((g * q).sum() for g, q in zip(grads, dirs) if g is not None)
    eps, vals = 1e-6, []
    for sgn in (1, -1):
        with torch.no_grad():
            for p, q in zip(params, dirs):
                p.add_(sgn * eps * q)
            vals.append((jvp_u(net, z, t, h, {}, tan)[1] * w).sum())
            for p, q in zip(params, dirs):
                p.sub_(sgn * eps * q)
    torch.testing.assert_close(analytic, (vals[0] - vals[1]) / (2 * eps), rtol=1e-6, atol=1e-8)
    assert torch.nn.functional.layer_norm.__name__ == "layer_norm"  # restored after the JVP
