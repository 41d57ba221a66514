"""The one sampler shared by every objective of the family (METHODS §1.5, §2.2).

``z <- z - (t_i - t_{i+1}) * u(z, t_i, h = t_i - t_{i+1}, cond)`` over a schedule from 1 to 0;
one network evaluation per step, two where classic classifier-free guidance is asked for.
"""

from __future__ import annotations

from typing import Any

import torch

from mfcli.errors import MFError


def make_timesteps(nfe: int, timesteps: list[float] | None = None) -> torch.Tensor:
    """The schedule [1 = t_0 > t_1 > ... > t_K = 0]: linspace by default, or an explicit one."""
    if nfe < 1:
        raise MFError(f"--nfe must be at least 1, got {nfe}.")
    if timesteps:
        ts = [float(v) for v in timesteps]
        if len(ts) != nfe + 1:
            raise MFError(f"--timesteps has {len(ts)} values; {nfe} NFE need {nfe + 1} (from 1 down to 0).")
        if ts[0] != 1.0 or ts[-1] != 0.0:
            raise MFError(f"--timesteps must start at 1 and end at 0, got {ts}.")
        if any(a <= b for a, b in zip(ts, ts[1:])):
            raise MFError(f"--timesteps must decrease strictly, got {ts}.")
        return torch.tensor(ts, dtype=torch.float64)
    return torch.linspace(1.0, 0.0, nfe + 1, dtype=torch.float64)


@torch.no_grad()
def sample(
    net: torch.nn.Module,
    noise: torch.Tensor,
    *,
    nfe: int = 1,
    timesteps: list[float] | None = None,
    cond: dict[str, Any] | None = None,
    cfg_scale: float | None = None,
    null_class: int | None = None,
) -> torch.Tensor:
    """Integrate from z_1 = noise to z_0 with the average-velocity network.

    Args:
        net: ``net(z, t, h, cond) -> u``.
        noise: (B, ...) standard normal draws, the t = 1 end.
        cond: conditions passed through to the network (labels, omega, interval).
        cfg_scale: classic CFG on the output, ``u = u(∅) + w (u(y) - u(∅))``: two evaluations per step,
            batched into one call. None: one evaluation per step.
        null_class: the label index of the unconditional class (needed with ``cfg_scale``).
    """
    ts = make_timesteps(nfe, timesteps).tolist()
    z = noise
    b = z.shape[0]
    use_cfg = cfg_scale is not None and cfg_scale != 1.0
    if use_cfg:
        if cond is None or cond.get("y") is None or null_class is None:
            raise MFError("classifier-free guidance needs class labels and a null class.")
        cond2 = {k: (torch.cat([v, v]) if torch.is_tensor(v) and v.shape[:1] == (b,) else v) for k, v in cond.items()}
        cond2["y"] = torch.cat([cond["y"], torch.full_like(cond["y"], null_class)])
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        t = torch.full((b,), t_cur, device=z.device, dtype=z.dtype)
        h = torch.full((b,), t_cur - t_next, device=z.device, dtype=z.dtype)
        if use_cfg:
            u_both = net(torch.cat([z, z]), torch.cat([t, t]), torch.cat([h, h]), cond2)
            u_c, u_u = u_both[:b], u_both[b:]
            u = u_u + cfg_scale * (u_c - u_u)
        else:
            u = net(z, t, h, cond)
        z = z - (t_cur - t_next) * u
    return z
