"""With the exact average velocity of Gaussian data, the mf, imf and splitmf targets are unbiased.

For x ~ N(μ, σ² I) the flow is affine and u(z, r, t) is closed-form (helpers: GaussianExact).
Fixing z_t and drawing (x, e) from the posterior p(x, e | z_t), each objective's regression
target (evaluated by the objective's own code with the exact u as the "network") must average
to the exact u(z_t, r, t) within Monte-Carlo error.
"""

import math

import pytest
import torch
from helpers_objectives import GaussianExact

from mf_objectives.imf import IMFConfig, ImprovedMeanFlow
from mf_objectives.meanflow import MeanFlow, MFConfig
from mf_objectives.splitmf import SplitMeanFlow, SplitMFConfig

MU = torch.tensor([1.5, -0.5], dtype=torch.float64)
SIGMA = 0.6
POINTS = [(0.9, 0.2), (0.6, 0.0), (0.35, 0.3), (1.0, 0.0), (0.7, 0.7)]  # (t, r), r = t included
N = 20000


def _draws(exact, t, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.tensor([0.3, 0.8], dtype=torch.float64) + 0.5 * torch.randn(2, generator=g, dtype=torch.float64)
    x, e = exact.posterior(z, t, N, generator=g)
    torch.testing.assert_close((1 - t) * x + t * e, z.expand(N, 2))  # every draw sits at the same z_t
    return z, x, e


def _assert_mean(samples, expected, k=4.5):
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    err = (mean - expected).abs()
    assert (err <= k * se + 1e-10).all(), (mean, expected, se)


def test_exact_u_satisfies_its_definition():
    # u(z_t, r, t) = 1/(t-r) ∫_r^t v(z_τ, τ) dτ along the ODE (integrated numerically), and u(z, t, t) = v
    exact = GaussianExact(MU, SIGMA)
    z = torch.tensor([[0.4, -1.1]], dtype=torch.float64)
    t, r, steps = 0.9, 0.15, 4000
    zz, taus = z.clone(), torch.linspace(t, r, steps + 1, dtype=torch.float64)
    for a, b in zip(taus[:-1], taus[1:]):  # RK4 from t down to r
        f = lambda q, s: exact.v(q, torch.tensor([s], dtype=torch.float64))  # noqa: E731
        k1 = f(zz, a)
        k2 = f(zz + (b - a) / 2 * k1, (a + b) / 2)
        k3 = f(zz + (b - a) / 2 * k2, (a + b) / 2)
        k4 = f(zz + (b - a) * k3, b)
        zz = zz + (b - a) / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    tt = torch.tensor([t], dtype=torch.float64)
    torch.testing.assert_close(exact.u(z, tt, tt - r), (z - zz) / (t - r), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(exact.u(z, tt, 0 * tt), exact.v(z, tt))
    # and v is the conditional mean of e - x
    x, e = exact.posterior(z[0], t, 200000, generator=torch.Generator().manual_seed(0))
    _assert_mean(e - x, exact.v(z, tt)[0])


@pytest.mark.parametrize("t,r", POINTS)
def test_mf_target_is_unbiased(t, r):
    exact = GaussianExact(MU, SIGMA)
    z, x, e = _draws(exact, t, seed=int(100 * t + 10 * r))
    tt, rr = torch.full((N,), t, dtype=torch.float64), torch.full((N,), r, dtype=torch.float64)
    T = MeanFlow(MFConfig()).terms(exact, x, t=tt, r=rr, noise=e)
    u = exact.u(z[None], tt[:1], tt[:1] - r)[0]
    _assert_mean(T["target"], u)
    # power check: the target built with the tangent (v, 0, 0) instead of (v, 0, 1) is visibly biased
    if t > r:
        wrong = T["target"] + (t - r) * (exact.u(z[None], tt[:1] + 1e-6, tt[:1] + 1e-6 - r)
                                         - exact.u(z[None], tt[:1] - 1e-6, tt[:1] - 1e-6 - r))[0] / 2e-6
        assert ((wrong.mean(0) - u).abs() > 10 * wrong.std(0) / math.sqrt(N)).any()


@pytest.mark.parametrize("t,r", POINTS)
def test_imf_target_is_unbiased(t, r):
    # V = u + (t-r) du/dt along the predicted velocity equals v(z_t) exactly; E[v_g | z_t] = E[e - x | z_t] = v(z_t)
    exact = GaussianExact(MU, SIGMA)
    z, x, e = _draws(exact, t, seed=int(100 * t + 10 * r) + 1)
    tt, rr = torch.full((N,), t, dtype=torch.float64), torch.full((N,), r, dtype=torch.float64)
    for source in ("head", "boundary"):
        T = ImprovedMeanFlow(IMFConfig(v_source=source)).terms(exact, x, t=tt, r=rr, noise=e)
        V = T["V"][0]
        torch.testing.assert_close(T["V"], V.expand(N, 2), rtol=1e-10, atol=1e-12)  # deterministic given z_t
        _assert_mean(T["v_g"], V)
        # and the quantity V stands for: u + (t - r) du/dt = v
        torch.testing.assert_close(V, exact.v(z[None], tt[:1])[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("t,r", POINTS)
def test_splitmf_target_is_unbiased(t, r):
    exact = GaussianExact(MU, SIGMA)
    z, x, e = _draws(exact, t, seed=int(100 * t + 10 * r) + 2)
    tt, rr = torch.full((N,), t, dtype=torch.float64), torch.full((N,), r, dtype=torch.float64)
    T = SplitMeanFlow(SplitMFConfig()).terms(exact, x, t=tt, r=rr, noise=e)  # λ ~ U(0, 1) per draw
    u = exact.u(z[None], tt[:1], tt[:1] - r)[0]
    if t > r:  # the split target is exact for every λ, not just on average
        torch.testing.assert_close(T["target"], u.expand(N, 2), rtol=1e-9, atol=1e-10)
    else:
        _assert_mean(T["target"], u)
