"""The shared sampler against hand-worked cases."""

import pytest
import torch

from mfcli.errors import MFError
from mfcli.sampler import make_timesteps, sample


class Recorder(torch.nn.Module):
    """u(z, t, h) = a * z + b * t + c * h, recording every call."""

    def __init__(self, a=0.5, b=0.25, c=-1.0):
        super().__init__()
        self.a, self.b, self.c, self.calls = a, b, c, []

    def forward(self, z, t, h, cond=None):
        self.calls.append((z.shape[0], t.clone(), h.clone(), None if cond is None else {k: v.clone() for k, v in cond.items()}))
        return self.a * z + self.b * t[:, None] + self.c * h[:, None]


def test_one_step_is_x_equals_z_minus_u_at_t1_h1():
    net = Recorder()
    z = torch.randn(5, 3, dtype=torch.float64)
    x = sample(net, z, nfe=1)
    torch.testing.assert_close(x, z - (0.5 * z + 0.25 - 1.0))
    assert len(net.calls) == 1 and torch.all(net.calls[0][1] == 1) and torch.all(net.calls[0][2] == 1)


def test_explicit_schedule_is_followed_step_by_step():
    net = Recorder()
    z = torch.randn(4, 2, dtype=torch.float64)
    ts = [1.0, 0.7, 0.2, 0.0]
    x = sample(net, z, nfe=3, timesteps=ts)
    ref = z.clone()
    for t0, t1 in zip(ts[:-1], ts[1:]):
        ref = ref - (t0 - t1) * (0.5 * ref + 0.25 * t0 - 1.0 * (t0 - t1))
    torch.testing.assert_close(x, ref)
    assert [float(c[1][0]) for c in net.calls] == pytest.approx(ts[:-1])
    assert [float(c[2][0]) for c in net.calls] == pytest.approx([0.3, 0.5, 0.2])


def test_default_schedule_is_linspace():
    assert make_timesteps(4).tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_classic_cfg_is_one_batched_call_per_step_and_mixes_outputs():
    class Cond(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, z, t, h, cond):
            self.calls += 1
            return z * 0 + cond["y"].double()[:, None]  # u = label: 3 for class 3, 10 for the null class

    net = Cond()
    z = torch.zeros(2, 1, dtype=torch.float64)
    x = sample(net, z, nfe=2, cond={"y": torch.tensor([3, 3])}, cfg_scale=2.0, null_class=10)
    # u = u(∅) + w (u(y) - u(∅)) = 10 + 2 (3 - 10) = -4 per unit time; integrated over [1, 0]
    torch.testing.assert_close(x, torch.full((2, 1), 4.0, dtype=torch.float64))
    assert net.calls == 2


@pytest.mark.parametrize("nfe, ts, msg", [(0, None, "at least 1"), (2, [1.0, 0.0], "need 3"), (2, [1.0, 0.5, 0.1], "start at 1 and end at 0"), (2, [1.0, 1.0, 0.0], "decrease strictly")])
def test_bad_schedules(nfe, ts, msg):
    with pytest.raises(MFError, match=msg):
        make_timesteps(nfe, ts)
