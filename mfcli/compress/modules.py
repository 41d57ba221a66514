"""The MeanFlow module that replaces a ResNet stage (MFI-ResNet, Sun et al., arXiv 2511.12422).

A stage maps its input features ``x`` (B, C_in, H, W) to its output ``y`` (B, C, H/s, W/s).
The module replaces it by

    z_1 = align(x)                      Conv(k×k, stride s) → BN → ReLU, to the output's shape
    z_0 = flow(z_1)                     the MeanFlow sampler from t = 1 to t = 0

where the aligned input is the t = 1 end of a straight path and the stage output the t = 0
end (METHODS §0 and §5.2: ``z_out = z_align - u(z_align, r=0, t=1)``). With K steps on the
schedule 1 = t_0 > t_1 > ... > t_K = 0 (MeanFlow §1.5)

    z_{t_{i+1}} = z_{t_i} - (t_i - t_{i+1}) u(z_{t_i}, r=t_{i+1}, t=t_i).

The velocity net u is one of two kinds (``net``); both follow the backbone call
``net(z, t, h, cond)`` of ``mfcli.api`` (h = t - r), so the registered MeanFlow objective
trains them unchanged:

* ``"mlp"`` (default, as released, METHODS §5.2): pointwise over pixels. A linear time
  embedding of the raw (r, t), concatenated to each pixel's C channels, then an MLP
  C + d_t → H → H → C with ReLUs.
* ``"conv"``: the same three layers as 3×3 convolutions (C → H → H → C, ReLUs), the time
  embedding added to the first layer's output as a per-channel bias. A stage of residual
  blocks mixes neighbouring pixels, a pointwise net cannot: replacing the 8×8 stage 3 of
  the CIFAR ResNet-56, the pointwise net stalls at a relative endpoint error of about 0.55
  (73 % top-1 as a drop-in), the conv net reaches 0.31 (83 %) with the same training.

``per_step_nets`` gives each of the K steps its own velocity net (the released two-step
stage 4 chains two MeanFlow nets): net i then covers the segment [t_{i+1}, t_i] of the
path in its own time, so each is a one-step MeanFlow ``z - u_i(z, r=0, t=1)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mfcli.errors import MFError


@dataclass(frozen=True)
class ModuleSpec:
    """Everything needed to rebuild a module; stored in a compressed checkpoint's metadata."""

    in_channels: int
    out_channels: int
    stride: int
    align_kernel: int = 3  # 1 or 3
    time_dim: int = 32  # d_t
    hidden: int = 384  # H
    steps: int = 1  # sampler steps (NFE) from t = 1 to t = 0
    per_step_nets: bool = False  # one velocity net per step instead of one shared net
    net: str = "mlp"  # velocity net: "mlp" (pointwise, as released) or "conv" (3×3 convolutions)

    def validate(self) -> None:
        for name in ("in_channels", "out_channels", "stride", "time_dim", "hidden", "steps"):
            if getattr(self, name) < 1:
                raise MFError(f"MeanFlow module: {name} must be at least 1, got {getattr(self, name)}.")
        if self.align_kernel not in (1, 3):
            raise MFError(f"MeanFlow module: align_kernel must be 1 or 3 (Conv 1×1 or 3×3), got {self.align_kernel}.")
        if self.net not in VELOCITY_NETS:
            raise MFError(f"MeanFlow module: net must be one of {', '.join(VELOCITY_NETS)}, got {self.net!r}.")

    def to_json(self) -> dict:
        return asdict(self)


class VelocityNet(nn.Module):
    """u(z, r, t) applied to every pixel independently (METHODS §5.2).

    ``time`` is Linear(2 → d_t) on the raw (r, t); ``fc1`` is Linear(C + d_t → H) on the
    concatenation [z_pixel, emb]. The concatenation is never materialised: fc1's weight is
    split into its z and emb columns, which is the same function and the same parameters.
    """

    def __init__(self, channels: int, time_dim: int, hidden: int):
        super().__init__()
        self.channels = channels
        self.time = nn.Linear(2, time_dim)
        self.fc1 = nn.Linear(channels + time_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, channels)
        # u = 0 at the start: the module begins as its alignment layer, a well-defined map,
        # instead of adding a random pointwise transform to the features.
        nn.init.zeros_(self.fc3.weight)
        nn.init.zeros_(self.fc3.bias)

    def forward(self, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        """z (B, C, H, W), t and h = t - r of shape (B,) -> u (B, C, H, W)."""
        r = t - h
        emb = self.time(torch.stack([r, t], dim=1).to(z.dtype))  # (B, d_t)
        c = self.channels
        w1 = self.fc1.weight
        x = z.permute(0, 2, 3, 1)  # (B, H, W, C): the MLP acts on the channel vector of each pixel
        a = F.linear(x, w1[:, :c]) + F.linear(emb, w1[:, c:], self.fc1.bias)[:, None, None, :]
        a = F.relu(self.fc2(F.relu(a)))
        return self.fc3(a).permute(0, 3, 1, 2)


class ConvVelocityNet(nn.Module):
    """u(z, r, t) with 3×3 convolutions C → H → H → C (ReLUs), so that pixels exchange information.

    ``time`` is Linear(2 → d_t) on the raw (r, t), as in :class:`VelocityNet`; ``time_proj``
    (SiLU, then Linear(d_t → H)) turns it into a per-channel bias of the first layer.
    """

    def __init__(self, channels: int, time_dim: int, hidden: int):
        super().__init__()
        self.channels = channels
        self.time = nn.Linear(2, time_dim)
        self.time_proj = nn.Linear(time_dim, hidden)
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.conv3 = nn.Conv2d(hidden, channels, 3, padding=1)
        nn.init.zeros_(self.conv3.weight)  # u = 0 at the start, as in VelocityNet
        nn.init.zeros_(self.conv3.bias)

    def forward(self, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor, cond: dict | None = None) -> torch.Tensor:
        r = t - h
        emb = self.time_proj(F.silu(self.time(torch.stack([r, t], dim=1).to(z.dtype))))  # (B, H)
        a = F.relu(self.conv1(z) + emb[:, :, None, None])
        return self.conv3(F.relu(self.conv2(a)))


VELOCITY_NETS = {"mlp": VelocityNet, "conv": ConvVelocityNet}


class AlignLayer(nn.Sequential):
    """Conv(k×k, stride s, no bias: BN follows) → BN → ReLU: the stage input in the output's shape."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=False)


class MeanFlowModule(nn.Module):
    """align → K-step MeanFlow sampler; a drop-in replacement of one ResNet stage."""

    def __init__(self, spec: ModuleSpec):
        super().__init__()
        spec.validate()
        self.spec = spec
        self.align = AlignLayer(spec.in_channels, spec.out_channels, spec.align_kernel, spec.stride)
        n_nets = spec.steps if spec.per_step_nets else 1
        net_cls = VELOCITY_NETS[spec.net]
        self.nets = nn.ModuleList(net_cls(spec.out_channels, spec.time_dim, spec.hidden) for _ in range(n_nets))
        # linspace(1, 0, K + 1), the schedule of MeanFlow's K-NFE sampler (METHODS §1.5)
        self.register_buffer("schedule", torch.linspace(1.0, 0.0, spec.steps + 1), persistent=False)

    def segment_ends(self, z1: torch.Tensor, y: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The two ends (x at t = 0, e at t = 1) that velocity net ``i`` is trained between.

        One shared net covers the whole path: (y, z1). With per-step nets, net i covers
        [t_{i+1}, t_i] of the straight path z_t = (1 - t) y + t z1, rescaled to its own [0, 1].
        """
        if not self.spec.per_step_nets:
            return y, z1
        hi, lo = float(self.schedule[i]), float(self.schedule[i + 1])
        return (1 - lo) * y + lo * z1, (1 - hi) * y + hi * z1

    def flow(self, z: torch.Tensor) -> torch.Tensor:
        """The K-step sampler from the aligned input (t = 1) to the predicted output (t = 0)."""
        n = z.shape[0]
        for i in range(self.spec.steps):
            if self.spec.per_step_nets:
                one = z.new_ones(n)
                z = z - self.nets[i](z, one, one)  # r = 0, t = 1 in the net's own time
            else:
                t_i, t_next = self.schedule[i], self.schedule[i + 1]
                t = z.new_full((n,), float(t_i))
                gap = float(t_i - t_next)
                z = z - gap * self.nets[0](z, t, z.new_full((n,), gap))
        return z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flow(self.align(x))


def count_params(module: nn.Module) -> int:
    """sum(p.numel()) over the module's parameters (BN running statistics are buffers, not counted)."""
    return sum(p.numel() for p in module.parameters())


def velocity_net_params(channels: int, time_dim: int, hidden: int, net: str = "mlp") -> int:
    """Closed form of count_params of a velocity net.

    mlp:  3 d_t + (C + d_t + 1) H + (H + 1) H + (H + 1) C
    conv: 3 d_t + (d_t + 1) H + (9 C + 1) H + (9 H + 1) H + (9 H + 1) C
    """
    if net == "conv":
        return 3 * time_dim + (time_dim + 1) * hidden + (9 * channels + 1) * hidden + (9 * hidden + 1) * hidden + (9 * hidden + 1) * channels
    return 3 * time_dim + (channels + time_dim + 1) * hidden + (hidden + 1) * hidden + (hidden + 1) * channels


def module_params(spec: ModuleSpec) -> int:
    """Closed form of count_params(MeanFlowModule(spec)), for budgeting a recipe without building it."""
    align = spec.align_kernel**2 * spec.in_channels * spec.out_channels + 2 * spec.out_channels
    nets = spec.steps if spec.per_step_nets else 1
    return align + nets * velocity_net_params(spec.out_channels, spec.time_dim, spec.hidden, spec.net)
