"""The MeanFlow module: shapes, exact parameter counts, the sampler, the JVP and the gradient routing."""

import math

import pytest
import torch
from torch import nn

from mfcli.compress.modules import (ConvVelocityNet, MeanFlowModule, ModuleSpec, VelocityNet, count_params, module_params,
                                    velocity_net_params)
from mfcli.compress.pipeline import meanflow_step
from mfcli.errors import MFError
from mfcli.plugins import registry


@pytest.mark.parametrize("cin,cout,stride,kernel,hw", [(16, 16, 1, 3, 8), (16, 32, 2, 3, 8), (32, 64, 2, 1, 8), (8, 8, 1, 1, 5)])
def test_module_maps_stage_input_to_output_shape(cin, cout, stride, kernel, hw):
    m = MeanFlowModule(ModuleSpec(cin, cout, stride, kernel, time_dim=4, hidden=8, steps=2))
    y = m(torch.randn(3, cin, hw, hw))
    assert y.shape == (3, cout, (hw - 1) // stride + 1, (hw - 1) // stride + 1)


@pytest.mark.parametrize("spec", [
    ModuleSpec(16, 16, 1, 3, 16, 64, 1),
    ModuleSpec(32, 64, 2, 3, 32, 256, 2),
    ModuleSpec(32, 64, 2, 1, 8, 50, 3, per_step_nets=True),
    ModuleSpec(1024, 2048, 2, 1, 32, 433, 2),
    ModuleSpec(32, 64, 2, 3, 32, 128, 2, net="conv"),
    ModuleSpec(16, 16, 1, 1, 5, 7, 2, per_step_nets=True, net="conv"),
])
def test_parameter_count_closed_form_equals_numel(spec):
    m = MeanFlowModule(spec)
    assert count_params(m) == sum(p.numel() for p in m.parameters()) == module_params(spec)
    assert count_params(m.nets[0]) == velocity_net_params(spec.out_channels, spec.time_dim, spec.hidden, spec.net)


def test_conv_velocity_net_by_hand():
    """u = conv3(relu(conv2(relu(conv1(z) + proj(silu(time(r, t))))))) with 3×3 convolutions, zero padding."""
    torch.manual_seed(0)
    net = ConvVelocityNet(3, 4, 5).double()
    nn.init.normal_(net.conv3.weight)  # the zero init would hide conv1/conv2 from the comparison
    z, t = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    r = t * torch.rand(2, dtype=torch.float64)

    def conv_by_hand(x, conv):  # direct sum over the 3×3 window of the zero-padded input
        w, b = conv.weight, conv.bias
        xp = torch.nn.functional.pad(x, (1, 1, 1, 1))
        out = torch.zeros(x.shape[0], w.shape[0], x.shape[2], x.shape[3], dtype=x.dtype)
        for i in range(x.shape[2]):
            for j in range(x.shape[3]):
                out[:, :, i, j] = torch.einsum("ocuv,bcuv->bo", w, xp[:, :, i:i + 3, j:j + 3]) + b
        return out

    emb = net.time_proj(torch.nn.functional.silu(net.time(torch.stack([r, t], 1))))
    a = torch.relu(conv_by_hand(z, net.conv1) + emb[:, :, None, None])
    ref = conv_by_hand(torch.relu(conv_by_hand(a, net.conv2)), net.conv3)
    torch.testing.assert_close(net(z, t, t - r), ref, rtol=1e-10, atol=1e-10)


def test_conv_net_mixes_pixels_and_the_mlp_does_not():
    """Changing one input pixel changes only that output pixel for the pointwise net, and its
    3×3 ... 7×7 neighbourhood (three 3×3 layers) for the conv net."""
    torch.manual_seed(0)
    z, t = torch.randn(1, 4, 9, 9), torch.full((1,), 0.8)
    z2 = z.clone()
    z2[0, :, 4, 4] += 1.0
    for kind, radius in (("mlp", 0), ("conv", 3)):
        m = _randomise(MeanFlowModule(ModuleSpec(4, 4, 1, 1, 3, 8, 1, net=kind)))
        net = m.nets[0]
        changed = (net(z2, t, t) - net(z, t, t)).abs().sum(1)[0] > 1e-6
        rows, cols = torch.nonzero(changed, as_tuple=True)
        assert changed[4, 4]
        assert int((rows - 4).abs().max()) == radius and int((cols - 4).abs().max()) == radius, kind


def test_velocity_net_is_the_released_pointwise_mlp():
    """u = fc3(relu(fc2(relu(fc1([z_pixel, time(r, t)]))))) on every pixel (METHODS §5.2)."""
    torch.manual_seed(0)
    net = VelocityNet(6, 4, 10)
    nn.init.normal_(net.fc3.weight)  # the zero init would hide fc1/fc2 from the comparison
    z, t = torch.randn(2, 6, 3, 5), torch.rand(2)
    r = t * torch.rand(2)
    out = net(z, t, t - r)
    for b in range(2):
        emb = net.time(torch.stack([r[b], t[b]]))
        for i in range(3):
            for j in range(5):
                a = torch.relu(net.fc1(torch.cat([z[b, :, i, j], emb])))
                ref = net.fc3(torch.relu(net.fc2(a)))
                torch.testing.assert_close(out[b, :, i, j], ref, rtol=1e-5, atol=1e-6)


def test_module_starts_as_its_alignment_layer():
    m = MeanFlowModule(ModuleSpec(8, 16, 2, 3, 4, 8, 2)).eval()
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(m(x), m.align(x))


def _randomise(m):
    for p in m.parameters():
        nn.init.normal_(p, std=0.3)
    return m


def test_one_step_is_z_minus_u_at_r0_t1():
    m = _randomise(MeanFlowModule(ModuleSpec(4, 4, 1, 1, 3, 8, 1))).eval()
    z = torch.randn(2, 4, 3, 3)
    one = torch.ones(2)
    torch.testing.assert_close(m.flow(z), z - m.nets[0](z, one, one))


def test_two_steps_follow_the_meanflow_schedule():
    m = _randomise(MeanFlowModule(ModuleSpec(4, 4, 1, 1, 3, 8, 2))).eval()
    z = torch.randn(2, 4, 3, 3)
    half, one = torch.full((2,), 0.5), torch.ones(2)
    z_half = z - 0.5 * m.nets[0](z, one, half)  # u(z, r=0.5, t=1): h = 0.5
    ref = z_half - 0.5 * m.nets[0](z_half, half, half)  # u(z, r=0, t=0.5)
    torch.testing.assert_close(m.flow(z), ref)


def test_per_step_nets_chain_one_step_maps_on_path_segments():
    m = _randomise(MeanFlowModule(ModuleSpec(4, 4, 1, 1, 3, 8, 2, per_step_nets=True))).eval()
    assert len(m.nets) == 2
    z = torch.randn(2, 4, 3, 3)
    one = torch.ones(2)
    z_mid = z - m.nets[0](z, one, one)
    torch.testing.assert_close(m.flow(z), z_mid - m.nets[1](z_mid, one, one))
    z1, y = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    x0, e1 = m.segment_ends(z1, y, 0)  # net 0 covers t in [0.5, 1]
    torch.testing.assert_close(e1, z1)
    torch.testing.assert_close(x0, 0.5 * y + 0.5 * z1)
    x0, e1 = m.segment_ends(z1, y, 1)  # net 1 covers t in [0, 0.5]
    torch.testing.assert_close(e1, 0.5 * y + 0.5 * z1)
    torch.testing.assert_close(x0, y)


@pytest.mark.parametrize("cls", [VelocityNet, ConvVelocityNet])
def test_velocity_net_jvp_matches_finite_difference(cls):
    """d/dt u along (v, dt=1, dr=0) through the velocity net, as the MeanFlow target needs."""
    torch.manual_seed(1)
    net = _randomise(cls(5, 3, 7)).double()
    z, v = torch.randn(2, 5, 2, 3, dtype=torch.float64), torch.randn(2, 5, 2, 3, dtype=torch.float64)
    t, r = torch.tensor([0.7, 0.4], dtype=torch.float64), torch.tensor([0.2, 0.1], dtype=torch.float64)
    ones = torch.ones_like(t)
    _, dudt = torch.func.jvp(lambda z_, t_, h_: net(z_, t_, h_), (z, t, t - r), (v, ones, ones))
    eps = 1e-6

    def u_at(s):
        return net(z + s * v, t + s, t + s - r)

    fd = (u_at(eps) - u_at(-eps)) / (2 * eps)
    torch.testing.assert_close(dudt, fd, rtol=1e-6, atol=1e-8)


def _objective():
    from mfcli.config import build_dataclass

    comp = registry().get("objectives", "mf")
    cfg = build_dataclass(comp.config, {"time_sampler": "uniform", "ratio_r_neq_t": 0.5, "norm_p": 0.75, "norm_eps": 1e-3}, "test")
    return comp.factory(cfg, num_classes=0)


def test_meanflow_loss_trains_only_the_velocity_net_and_endpoint_only_the_alignment():
    """The design that keeps the alignment from collapsing (pipeline docstring): no gradient of
    the stop-gradiented MeanFlow target reaches the alignment; the endpoint loss reaches nothing else."""
    torch.manual_seed(0)
    m = MeanFlowModule(ModuleSpec(4, 6, 1, 3, 3, 8, 1))
    nn.init.normal_(m.nets[0].fc3.weight, std=0.1)
    x, y = torch.randn(4, 4, 5, 5), torch.rand(4, 6, 5, 5)
    align = list(m.align.parameters())

    def grads(weight):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # the same (t, r) draws in both calls
        meanflow_step(m, _objective(), align_weight=weight, align_params=align)((x, y))
        return [p.grad for p in align], [p.grad.clone() for p in m.nets.parameters()]

    align_mf, nets_mf = grads(0.0)
    assert all(g is None for g in align_mf)
    assert all(g.abs().sum() > 0 for g in nets_mf)
    align_both, nets_both = grads(1.0)
    assert all(g is not None and g.abs().sum() > 0 for g in align_both)
    for a, b in zip(nets_mf, nets_both):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the endpoint term adds nothing to the velocity net


def test_meanflow_module_learns_a_pointwise_map():
    """Phase 3 on a synthetic stage (y = a fixed pointwise nonlinear map of x): the one-step map
    must get much closer to y than the alignment alone does."""
    torch.manual_seed(0)
    w = torch.randn(6, 4) / 2
    x = torch.randn(512, 4, 4, 4)
    y = torch.relu(torch.einsum("oc,bchw->bohw", w, x) + 0.3)
    m = MeanFlowModule(ModuleSpec(4, 6, 1, 1, 8, 64, 1))
    step = meanflow_step(m, _objective(), align_weight=1.0, align_params=list(m.align.parameters()))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    for i in range(300):
        idx = torch.randint(0, 512, (64,))
        opt.zero_grad(set_to_none=True)
        logs = step((x[idx], y[idx]))
        opt.step()
    m.eval()
    with torch.no_grad():
        rel = ((m(x) - y).pow(2).mean() / y.pow(2).mean()).item()
    assert math.isfinite(float(logs["loss"]))
    assert rel < 0.05, rel


def test_bad_specs_are_errors():
    with pytest.raises(MFError, match="align_kernel must be 1 or 3"):
        MeanFlowModule(ModuleSpec(4, 4, 1, 5))
    with pytest.raises(MFError, match="hidden must be at least 1"):
        MeanFlowModule(ModuleSpec(4, 4, 1, 3, 8, 0))
    with pytest.raises(MFError, match="net must be one of mlp, conv"):
        MeanFlowModule(ModuleSpec(4, 4, 1, 3, 8, 8, net="transformer"))
