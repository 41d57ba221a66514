"""Pieces shared by the MeanFlow-family objectives: (t, r) samplers, the adaptive
weight, label dropout, and the forward-mode derivative d/dt u along the path.

Notation (METHODS §0): t = 1 is noise, t = 0 is data, z_t = (1 - t) x + t e,
v = e - x, h = t - r. The network is called as ``net(z, t, h, cond)``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mfcli.errors import MFError

# ---------------------------------------------------------------------------------------
# (t, r) samplers (METHODS §1.3)
# ---------------------------------------------------------------------------------------

# name -> (t_mean, t_std, r_mean, r_std, how (t, r) are formed, how r = t is assigned)
#   "sorted":    t', r' drawn independently, then t = max, r = min
#   "min_after": t and r drawn from their own laws, r := t on the chosen samples, then r = min(t, r)
#   "first":     the first floor(B * (1 - ratio_r_neq_t)) samples get r = t (official JAX code)
#   "bernoulli": each sample independently gets r = t with probability 1 - ratio_r_neq_t (py-meanflow)
TIME_SAMPLERS: dict[str, tuple[float, float, float, float, str, str]] = {
    # official JAX ImageNet code: LN(-0.4, 1.0) twice, sorted
    "imagenet": (-0.4, 1.0, -0.4, 1.0, "sorted", "first"),
    # MeanFlow paper, CIFAR-10 (py-meanflow v0): LN(-2, 2) twice, sorted
    "cifar_paper": (-2.0, 2.0, -2.0, 2.0, "sorted", "bernoulli"),
    # py-meanflow v1 (repo default): t ~ LN(-0.6, 1.6), r ~ LN(-4.0, 1.6), r = min(t, r) last
    "cifar_improved": (-0.6, 1.6, -4.0, 1.6, "min_after", "bernoulli"),
    # t', r' ~ U(0, 1), sorted (the teacher-free SplitMeanFlow reference); the means/stds are unused
    "uniform": (0.0, 1.0, 0.0, 1.0, "sorted", "first"),
}


def logit_normal(n: int, mean: float, std: float, *, device, dtype) -> torch.Tensor:
    """sigmoid(N(mean, std^2)) samples of shape (n,)."""
    return torch.sigmoid(mean + std * torch.randn(n, device=device, dtype=dtype))


@dataclass
class TimeSampler:
    """Draws (t, r) with 0 <= r <= t <= 1 and a fraction ``ratio_r_neq_t`` of samples with r != t.

    ``ratio_r_neq_t`` is the fraction with r != t (the official JAX ``data_proportion`` is
    1 - ratio_r_neq_t; py-meanflow's ``ratio`` is ratio_r_neq_t). With "cifar_improved" the final
    r = min(t, r) also sets r = t where r' > t' (P ≈ 0.07), so the realised fraction is about
    0.93 × ratio_r_neq_t, exactly as in py-meanflow.
    """

    name: str = "imagenet"
    ratio_r_neq_t: float = 0.25
    t_mean: float | None = None
    t_std: float | None = None
    r_mean: float | None = None
    r_std: float | None = None

    def __post_init__(self):
        if self.name not in TIME_SAMPLERS:
            raise MFError(f"unknown time sampler {self.name!r}; choose one of {', '.join(TIME_SAMPLERS)}")
        if not 0.0 <= self.ratio_r_neq_t <= 1.0:
            raise MFError(f"ratio_r_neq_t must lie in [0, 1], got {self.ratio_r_neq_t}")
        d = TIME_SAMPLERS[self.name]
        self.params = tuple(d[i] if v is None else float(v) for i, v in enumerate(
            (self.t_mean, self.t_std, self.r_mean, self.r_std)))
        self.pairing, self.assignment = d[4], d[5]

    def num_r_eq_t(self, n: int) -> int:
        # the small epsilon keeps floor(n * 0.3) from becoming floor(29.999999...)
        return int(math.floor(n * (1.0 - self.ratio_r_neq_t) + 1e-9))

    def __call__(self, n: int, *, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        t_mean, t_std, r_mean, r_std = self.params
        if self.name == "uniform":
            t = torch.rand(n, device=device, dtype=dtype)
            r = torch.rand(n, device=device, dtype=dtype)
        else:
            t = logit_normal(n, t_mean, t_std, device=device, dtype=dtype)
            r = logit_normal(n, r_mean, r_std, device=device, dtype=dtype)
        if self.pairing == "sorted":
            t, r = torch.maximum(t, r), torch.minimum(t, r)
        if self.assignment == "first":
            eq = torch.arange(n, device=device) < self.num_r_eq_t(n)
        else:
            eq = torch.rand(n, device=device) >= self.ratio_r_neq_t
        r = torch.where(eq, t, r)
        if self.pairing == "min_after":
            r = torch.minimum(t, r)
        return t, r


# ---------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------


def sum_sq(delta: torch.Tensor) -> torch.Tensor:
    """Per-sample SUM of squares over all non-batch dims (the official code sums). (B, ...) -> (B,)."""
    return delta.pow(2).flatten(1).sum(1)


def adaptive_weight(sq: torch.Tensor, p: float, c: float) -> torch.Tensor:
    """w = 1 / sg(||Δ||² + c)^p, MeanFlow's adaptive loss weighting (METHODS §1.1). p = 0: plain squared error."""
    if p == 0:
        return torch.ones_like(sq)
    return (sq.detach() + c).pow(-p)


def expand(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast over a sample."""
    return a.view(-1, *([1] * (like.dim() - 1)))


# ---------------------------------------------------------------------------------------
# conditioning
# ---------------------------------------------------------------------------------------


def null_labels(n: int, num_classes: int, device) -> torch.Tensor:
    return torch.full((n,), num_classes, device=device, dtype=torch.long)


def take(cond: dict, idx: torch.Tensor, n: int) -> dict:
    """Restrict the per-sample entries of a cond dict to the samples ``idx``."""
    return {k: (v[idx] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v) for k, v in cond.items()}


def with_extra(cond: dict, extra: dict | None, idx: torch.Tensor | None = None, n: int = 0, repeat: int = 1) -> dict:
    """``cond`` plus the caller's per-sample conditioning ``extra`` (e.g. augmentation labels),
    restricted to the samples ``idx`` of a batch of ``n`` and repeated ``repeat`` times along
    the batch for calls that stack several copies of the samples."""
    if not extra:
        return cond
    part = take(extra, idx, n) if idx is not None else extra
    if repeat > 1:
        part = {k: (torch.cat([v] * repeat) if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in part.items()}
    return {**part, **cond}


def cat_cond(a: dict, b: dict) -> dict:
    """Concatenate two cond dicts with the same keys along the batch."""
    return {k: (torch.cat([a[k], b[k]]) if torch.is_tensor(a[k]) and a[k].dim() > 0 else a[k]) for k in a}


@contextlib.contextmanager
def eval_mode(net: torch.nn.Module):
    """Run the guidance forwards in eval mode (as the official code does), restoring each module's flag."""
    flags = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        yield
    finally:
        for m, f in flags:
            m.training = f


# ---------------------------------------------------------------------------------------
# u and du/dt
# ---------------------------------------------------------------------------------------

JVP_MODES = ("fused", "split")


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _layer_norm_composite(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """layer_norm from mean/var ops, whose forward-mode tangent backpropagates correctly."""
    n = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    dims = tuple(range(-n, 0))
    centred = input - input.mean(dims, keepdim=True)
    out = centred * torch.rsqrt(centred.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


@contextlib.contextmanager
def _second_order_jvp():
    """Make a du/dt whose own gradient is right (Modular MeanFlow, λ > 0).

    Two things break it silently, both checked against finite differences in float64:
    * the built-in backbones' cheap forward-mode rules are ``autograd.Function.jvp`` methods,
      and backpropagating through a tangent computed that way misses terms: PyTorch's own
      rules are used instead;
    * PyTorch's forward-mode rule of ``F.layer_norm`` (torch 2.15) is not differentiated
      correctly by backward: a composite layer norm stands in for it during the JVP.
    """
    with contextlib.ExitStack() as stack:
        try:
            from mf_backbones.jvp_ops import custom_jvp_rules
        except ImportError:
            pass
        else:
            stack.enter_context(custom_jvp_rules(False))
        saved = F.layer_norm
        F.layer_norm = _layer_norm_composite
        try:
            yield
        finally:
            F.layer_norm = saved


def jvp_u(net, z, t, h, cond, tangent, *, mode: str = "fused", differentiable: bool = False):
    """The network output at (z, t, h) and its total derivative along (tangent, dt = 1, dr = 0).

    With h = t - r and r held fixed, dh/dt = 1, so the JVP over (z, t, h) uses tangents
    (tangent, 1, 1) -- the (v, 0, 1) tangent over (z, r, t) of MeanFlow Eq. 8 / Table 1b.
    The parameters are closed over; ``net`` must be the bare module (no DDP wrapper).

    mode "fused": one ``torch.func.jvp`` whose primal output carries the gradient.
    mode "split": a gradient-carrying forward, then the tangent under ``no_grad`` with the
    RNG state restored in between so that dropout draws the same masks.
    ``differentiable`` keeps the graph of du/dt (Modular MeanFlow, λ > 0; fused only).

    Autocast is switched off here: the JVP runs in the inputs' precision (fp32), as the official
    PyTorch code does, since low-precision tangents are where MeanFlow training goes unstable.

    Returns ``(out, dudt)`` where ``out`` is u, or (u, v) when ``cond["return_v"]``.
    """
    with torch.autocast(z.device.type, enabled=False):
        return _jvp_u(net, z, t, h, cond, tangent.to(z.dtype), mode, differentiable)


def _jvp_u(net, z, t, h, cond, tangent, mode, differentiable):
    aux = bool(cond.get("return_v"))

    def f(z_, t_, h_):
        return net(z_, t_, h_, cond)

    ones = torch.ones_like(t)
    if mode == "fused" or differentiable:
        with _second_order_jvp() if differentiable else contextlib.nullcontext():
            res = torch.func.jvp(f, (z, t, h), (tangent, ones, ones), has_aux=aux)
        out = (res[0], res[2]) if aux else res[0]
        return out, (res[1] if differentiable else res[1].detach())
    if mode != "split":
        raise MFError(f"unknown jvp_mode {mode!r}; choose one of {', '.join(JVP_MODES)}")
    state = _rng_state(z.device)
    out = f(z, t, h)
    _set_rng_state(z.device, state)
    # the tangent of u alone, without the v head; u's dropout masks still match unless a backbone
    # draws the v head's masks before u's output
    cond_u = {k: v for k, v in cond.items() if k != "return_v"}
    with torch.no_grad():
        _, dudt = torch.func.jvp(lambda z_, t_, h_: net(z_, t_, h_, cond_u), (z, t, h), (tangent, ones, ones))
    return out, dudt


def _cast(out, dtype):
    return tuple(a.to(dtype) for a in out) if isinstance(out, tuple) else out.to(dtype)


def u_and_dudt(net, z, t, h, cond, tangent, *, mode: str = "fused", differentiable: bool = False):
    """u (with gradient) on the whole batch and du/dt only where h > 0.

    Samples with r = t contribute (t - r) du/dt = 0 to every target here, so they are plain
    forwards; only the fraction with r != t pays for the tangent (DESIGN §5).
    Returns ``(out, dudt)`` with ``dudt`` zero on the r = t samples; ``out`` as in :func:`jvp_u`.
    """
    n = z.shape[0]
    need = h > 0
    n_mf = int(need.sum())
    if n_mf == 0:  # the plain forwards may run under the caller's autocast; the loss is taken in z's dtype
        return _cast(net(z, t, h, cond), z.dtype), torch.zeros_like(z)
    if n_mf == n:
        return jvp_u(net, z, t, h, cond, tangent, mode=mode, differentiable=differentiable)
    i_mf = need.nonzero().squeeze(1)
    i_fm = (~need).nonzero().squeeze(1)
    out_fm = _cast(net(z[i_fm], t[i_fm], h[i_fm], take(cond, i_fm, n)), z.dtype)
    out_mf, dudt_mf = jvp_u(net, z[i_mf], t[i_mf], h[i_mf], take(cond, i_mf, n), tangent[i_mf],
                            mode=mode, differentiable=differentiable)

    def merge(a_fm, a_mf):
        return a_mf.new_zeros((n, *a_mf.shape[1:])).index_copy(0, i_fm, a_fm).index_copy(0, i_mf, a_mf)

    out = tuple(merge(a, b) for a, b in zip(out_fm, out_mf)) if isinstance(out_mf, tuple) else merge(out_fm, out_mf)
    dudt = dudt_mf.new_zeros((n, *dudt_mf.shape[1:])).index_copy(0, i_mf, dudt_mf)
    return out, dudt
