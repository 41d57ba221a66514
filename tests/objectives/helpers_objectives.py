"""Test helpers for the objectives: a tiny float64 network, finite differences, the exact
average velocity of Gaussian data, private 2-D toy data, a small training loop and a
sample-to-data distance. Private to the tests."""

from __future__ import annotations

import math

import torch
from torch import nn

# ---------------------------------------------------------------------------------------
# a tiny network with every condition the objectives use
# ---------------------------------------------------------------------------------------


class TinyNet(nn.Module):
    """u(z, t, h, cond) (and an optional v head) of a small tanh MLP, smooth in every input."""

    def __init__(self, shape=(2, 3), hidden=24, num_classes=0, v_head=False, dropout=0.0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.shape, self.num_classes, self.has_v_head = tuple(shape), num_classes, v_head
        self.conditions = frozenset({"y", "omega", "t_min", "t_max"}) if num_classes else frozenset()
        d = math.prod(shape)
        self.inp = nn.Linear(d + 7, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out_u = nn.Linear(hidden, d)
        self.out_v = nn.Linear(hidden, d) if v_head else None
        self.emb = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.drop = nn.Dropout(dropout)
        for p in self.parameters():  # deterministic, O(1) weights so that nothing is tiny
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * (0.8 / math.sqrt(p.shape[-1])))
        self.double()

    def forward(self, z, t, h, cond=None):
        cond = cond or {}
        n = z.shape[0]
        one = torch.ones_like(t)
        omega = cond.get("omega", one)
        feats = [z.flatten(1), t[:, None], h[:, None], (t * h)[:, None], torch.sin(3 * t)[:, None],
                 (1 - 1 / omega)[:, None], cond.get("t_min", 0 * one)[:, None], cond.get("t_max", one)[:, None]]
        a = torch.tanh(self.inp(torch.cat(feats, 1)))
        if self.emb is not None:
            y = cond.get("y")
            if y is None:
                y = torch.full((n,), self.num_classes, dtype=torch.long, device=z.device)
            a = a + self.emb(y)
        a = self.drop(torch.tanh(self.mid(a)))
        u = self.out_u(a).view(n, *self.shape)
        if cond.get("return_v"):
            return u, self.out_v(a).view(n, *self.shape)
        return u


def fd_dudt(f, z, t, h, tangent, eps=1e-5):
    """Central finite difference of f along (tangent, 1, 1) at (z, t, h)."""
    with torch.no_grad():
        plus = f(z + eps * tangent, t + eps, h + eps)
        minus = f(z - eps * tangent, t - eps, h - eps)
    return (plus - minus) / (2 * eps)


# ---------------------------------------------------------------------------------------
# Gaussian data: the exact velocity and average velocity
# ---------------------------------------------------------------------------------------


class GaussianExact(nn.Module):
    """Exact u(z, r, t) and v(z, t) for x ~ N(μ, σ² I), e ~ N(0, I), z_t = (1-t) x + t e.

    z_t ~ N(m_t, s_t² I) with m_t = (1-t) μ and s_t² = (1-t)² σ² + t², so the marginal flow is
    affine: z_τ = m_τ + (s_τ / s_t)(z_t - m_t). Hence
        v(z, t)     = -μ + (t - (1-t) σ²) / s_t² · (z - (1-t) μ)
        u(z, r, t)  = (z - z_r) / (t - r),   z_r = (1-r) μ + (s_r / s_t)(z - (1-t) μ).
    """

    has_v_head = True

    def __init__(self, mu: torch.Tensor, sigma: float):
        super().__init__()
        self.mu, self.sigma, self.num_classes, self.conditions = mu, sigma, 0, frozenset()

    def s(self, t):
        return torch.sqrt((1 - t) ** 2 * self.sigma**2 + t**2)

    def v(self, z, t):
        t = t[:, None]
        return -self.mu + (t - (1 - t) * self.sigma**2) / self.s(t) ** 2 * (z - (1 - t) * self.mu)

    def u(self, z, t, h):
        r = t - h
        hs = torch.where(h > 0, h, torch.ones_like(h))[:, None]
        z_r = (1 - r[:, None]) * self.mu + (self.s(r) / self.s(t))[:, None] * (z - (1 - t[:, None]) * self.mu)
        return torch.where((h > 0)[:, None], (z - z_r) / hs, self.v(z, t))

    def forward(self, z, t, h, cond=None):
        u = self.u(z, t, h)
        if (cond or {}).get("return_v"):
            return u, self.v(z, t)
        return u

    def posterior(self, z, t, n, generator=None):
        """n draws of (x, e) from p(x, e | z_t = z) for one point z (shape (d,)) and scalar t."""
        a, s2 = 1 - t, (1 - t) ** 2 * self.sigma**2 + t**2
        mean = self.mu + a * self.sigma**2 / s2 * (z - a * self.mu)
        std = math.sqrt(self.sigma**2 * t**2 / s2)
        x = mean + std * torch.randn(n, z.shape[0], dtype=z.dtype, generator=generator)
        e = (z - a * x) / t
        return x, e


# ---------------------------------------------------------------------------------------
# 2-D toy data, training and a sample-to-data distance
# ---------------------------------------------------------------------------------------


def toy_data(name: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 2) points of a standard 2-D toy distribution, scaled to roughly unit spread."""
    if name == "checkerboard":
        x1 = torch.rand(n, generator=generator) * 4 - 2
        x2 = torch.rand(n, generator=generator) - torch.randint(0, 2, (n,), generator=generator) * 2.0
        x2 = x2 + (torch.floor(x1) % 2)
        return torch.stack([x1, x2], 1) * 1.0
    if name == "8gaussians":
        k = torch.randint(0, 8, (n,), generator=generator).double()
        centers = torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], 1) * 1.5
        return (centers + 0.1 * torch.randn(n, 2, generator=generator, dtype=torch.float64)).float()
    if name == "moons":
        upper = torch.rand(n, generator=generator) < 0.5
        a = torch.rand(n, generator=generator) * math.pi
        x = torch.where(upper, torch.cos(a), 1 - torch.cos(a))
        y = torch.where(upper, torch.sin(a), 0.5 - torch.sin(a))
        pts = torch.stack([x - 0.5, y - 0.25], 1) * 1.2
        return pts + 0.05 * torch.randn(n, 2, generator=generator)
    raise ValueError(name)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between two equal-size point clouds (exact per projection)."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], n_proj, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa = torch.sort(a.double() @ theta, dim=0).values
    pb = torch.sort(b.double() @ theta, dim=0).values
    return float((pa - pb).abs().mean())


def train_toy(objective, recipe: dict, *, seed: int = 0):
    """Adam on the MLP backbone with a recipe's [data], [backbone] and [train] values; returns the EMA net."""
    import copy

    from mf_backbones.mlp import MLP, MLPConfig

    data, bb, tr = recipe["data"], recipe["backbone"], recipe["train"]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    net = MLP(MLPConfig(width=bb["width"], depth=bb["depth"]), shape=(2,), num_classes=0)
    ema_net = copy.deepcopy(net).requires_grad_(False)
    decay = tr["ema_decays"][0]
    opt = torch.optim.Adam(net.parameters(), lr=tr["lr"], betas=tuple(tr["betas"]))
    for step in range(tr["steps"]):
        x = toy_data(data["distribution"], data["batch_size"], g)
        loss, _ = objective.loss(net, x, step=step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), tr["grad_clip"])
        opt.step()
        with torch.no_grad():
            for pe, p in zip(ema_net.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
    return ema_net


@torch.no_grad()
def sample_1nfe(net, n: int, seed: int = 123) -> torch.Tensor:
    """x̂ = z_1 - u(z_1, t=1, h=1), z_1 ~ N(0, I) (METHODS §1.5)."""
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    one = torch.ones(n)
    return z - net(z, one, one, {})
