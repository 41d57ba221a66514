"""mmf: λ really moves the gradient through the JVP (METHODS §4)."""

import pytest
import torch
from helpers_objectives import TinyNet
from test_meanflow import K, _grads, _pinned

from mf_objectives.meanflow import MeanFlow, MFConfig
from mf_objectives.mmf import MMFConfig, ModularMeanFlow


def hand_mmf(net, x, y, t, r, e, lam, *, omega=1.0, p=1.0, c=0.01):
    """L_λ with d/dt u from the double-backward JVP (torch.autograd.functional.jvp, create_graph=True),
    an autograd path independent of torch.func; the adaptive weight is stop-gradiented."""
    ex = lambda a: a.view(-1, 1, 1)  # noqa: E731
    z, v = (1 - ex(t)) * x + ex(t) * e, e - x
    cond = {"y": y} if y is not None else {}
    vt = v
    if y is not None and omega != 1:
        with torch.no_grad():
            v_u = net(z, t, 0 * t, {"y": torch.full_like(y, K)})
        vt = torch.where(ex(y == K), v, v_u + omega * (v - v_u))
    f = lambda a, b, h: net(a, b, h, cond)  # noqa: E731
    u, dudt = torch.autograd.functional.jvp(f, (z, t, t - r), (vt, torch.ones_like(t), torch.ones_like(t)),
                                            create_graph=True)
    mod = lam * dudt + (1 - lam) * dudt.detach()
    sq = ((u + ex(t - r) * mod - vt) ** 2).sum((1, 2))
    return (sq / (sq.detach() + c) ** p).mean()


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("conditional", [False, True])
def test_mmf_loss_and_gradient_match_hand_evaluation(lam, conditional):
    nc = K if conditional else 0
    net = TinyNet(num_classes=nc)
    x, y, t, r, e = _pinned()
    y = y if conditional else None
    omega = 2.0 if conditional else 1.0
    obj = ModularMeanFlow(MMFConfig(lambda_schedule="fixed", lambda_value=lam, cfg_omega=omega, label_drop_prob=0.0),
                          num_classes=nc)
    loss, logs = obj.loss(net, x, y, t=t, r=r, noise=e)
    hand = hand_mmf(net, x, y, t, r, e, lam, omega=omega)
    torch.testing.assert_close(loss, hand, rtol=1e-10, atol=0)
    for a, b in zip(_grads(loss, net), _grads(hand, net)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)
    assert float(logs["lambda"]) == pytest.approx(lam)


def test_mmf_lambda_zero_is_meanflow_and_lambda_changes_the_gradient():
    net = TinyNet()
    x, _, t, r, e = _pinned()
    mf_loss, _ = MeanFlow(MFConfig()).loss(net, x, t=t, r=r, noise=e)
    g_mf = _grads(mf_loss, net)
    grads = {}
    for lam in (0.0, 0.5, 1.0):
        loss, _ = ModularMeanFlow(MMFConfig(lambda_schedule="fixed", lambda_value=lam)).loss(net, x, t=t, r=r, noise=e)
        torch.testing.assert_close(loss, mf_loss, rtol=1e-12, atol=0)  # the value never depends on λ
        grads[lam] = _grads(loss, net)
    for a, b in zip(grads[0.0], g_mf):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    flat = {k: torch.cat([g.flatten() for g in v]) for k, v in grads.items()}
    assert (flat[1.0] - flat[0.0]).norm() > 0.05 * flat[0.0].norm()
    # the gradient is affine in λ: g(½) = (g(0) + g(1)) / 2
    torch.testing.assert_close(flat[0.5], (flat[0.0] + flat[1.0]) / 2, rtol=1e-9, atol=1e-12)


def test_mmf_lambda_curriculum():
    obj = ModularMeanFlow(MMFConfig(lambda_warmup_steps=100))
    assert [obj.lam(s) for s in (0, 25, 100, 1000)] == [0.0, 0.25, 1.0, 1.0]
    assert ModularMeanFlow(MMFConfig(lambda_warmup_steps=0)).lam(0) == 1.0
    assert ModularMeanFlow(MMFConfig(lambda_schedule="fixed", lambda_value=0.4)).lam(10**6) == 0.4
    with pytest.raises(Exception, match="lambda_schedule"):
        ModularMeanFlow(MMFConfig(lambda_schedule="cosine"))


def test_full_gradient_with_velocity_tangent_is_biased_and_model_tangent_is_not():
    # Gaussian data, u_θ = exact u + a z + b t: at θ = 0 the model is exact, so an unbiased loss has
    # zero expected gradient. With λ = 1 and tangent e - x the expected gradient in a is
    # 2h tr((h ∂_z u - I) Cov[e - x | z_t]) != 0; with the model's own velocity as tangent it is 0.
    import math

    from helpers_objectives import GaussianExact
    from torch import nn

    exact = GaussianExact(torch.tensor([1.5, -0.5], dtype=torch.float64), 0.6)

    class Perturbed(nn.Module):
        num_classes, conditions, has_v_head = 0, frozenset(), False

        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.zeros((), dtype=torch.float64))
            self.b = nn.Parameter(torch.zeros(2, dtype=torch.float64))

        def forward(self, z, t, h, cond=None):
            return exact.u(z, t, h) + self.a * z + self.b * t[:, None]

    t0, r0, n, k = 0.9, 0.1, 20000, 8
    z = torch.tensor([0.2, 0.9], dtype=torch.float64)
    tt, rr = torch.full((n,), t0, dtype=torch.float64), torch.full((n,), r0, dtype=torch.float64)
    objs = {
        "mf": MeanFlow(MFConfig(norm_p=0.0)),
        "mmf_velocity": ModularMeanFlow(MMFConfig(norm_p=0.0, lambda_schedule="fixed", lambda_value=1.0)),
        "mmf_model": ModularMeanFlow(MMFConfig(norm_p=0.0, lambda_schedule="fixed", lambda_value=1.0,
                                               jvp_tangent="model")),
    }
    g = torch.Generator().manual_seed(11)
    draws = [exact.posterior(z, t0, n, generator=g) for _ in range(k)]
    for name, obj in objs.items():
        net = Perturbed()
        grads = []
        for x, e in draws:
            loss, _ = obj.loss(net, x, t=tt, r=rr, noise=e)
            grads.append(torch.cat([q.flatten() for q in torch.autograd.grad(loss, list(net.parameters()))]))
        grads = torch.stack(grads)
        mean, se = grads.mean(0), grads.std(0) / math.sqrt(k)
        if name == "mmf_velocity":
            assert mean[0].abs() > 10 * se[0], (mean, se)
        else:
            assert (mean.abs() < 4.5 * se + 1e-12).all(), (name, mean, se)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_mmf_gradient_through_the_jvp_on_the_built_in_backbones(backbone):
    # the backbones' fast forward-mode rules are not differentiable a second time; the λ > 0
    # gradient must still be the true one: checked along a random direction by central differences
    from mf_objectives.common import jvp_u

    if backbone == "unet":
        mod = pytest.importorskip("mf_backbones.unet")
        net = mod.build_unet(mod.UNetConfig(variant="UNet-XS", channels=16, channel_mult=[1, 2], num_blocks=1,
                                            attn_resolutions=[]), shape=(2, 8, 8))
        shape = (2, 8, 8)
    else:
        mod = pytest.importorskip("mf_backbones.dit")
        net = mod.build_dit(mod.DiTConfig(variant="DiT-S/2", depth=2, hidden=32, heads=2, patch=2), shape=(2, 4, 4))
        shape = (2, 4, 4)
    torch.manual_seed(0)
    net = net.double()
    with torch.no_grad():  # move away from the zero-initialised output layers
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(4, *shape, dtype=torch.float64)
    e = torch.randn_like(x)
    t = torch.tensor([0.9, 0.8, 0.6, 0.5], dtype=torch.float64)
    r = torch.tensor([0.2, 0.1, 0.3, 0.2], dtype=torch.float64)
    ex = lambda a: a.view(-1, 1, 1, 1)  # noqa: E731
    params = list(net.parameters())
    direction = [torch.randn_like(p) for p in params]

    def full_loss():  # L_1 with the plain L2 weight: every term depends on θ
        z, v = (1 - ex(t)) * x + ex(t) * e, e - x
        with torch.no_grad():
            u, dudt = jvp_u(net, z, t, t - r, {}, v)
        return ((u + ex(t - r) * dudt - v) ** 2).flatten(1).sum(1).mean()

    eps, vals = 1e-6, []
    for sgn in (1, -1):
        with torch.no_grad():
            for p, q in zip(params, direction):
                p.add_(sgn * eps * q)
        vals.append(full_loss())
        with torch.no_grad():
            for p, q in zip(params, direction):
                p.sub_(sgn * eps * q)
    numeric = (vals[0] - vals[1]) / (2 * eps)
    obj = ModularMeanFlow(MMFConfig(lambda_schedule="fixed", lambda_value=1.0, norm_p=0.0))
    loss, _ = obj.loss(net, x, t=t, r=r, noise=e)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    analytic = sum((g * q).sum() for g, q in zip(grads, direction) if g is not None)
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)
