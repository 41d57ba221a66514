"""Layer primitives with cheap, exact forward-mode (JVP) rules.

A MeanFlow step differentiates the network forward along a tangent (``torch.func.jvp``),
so the cost of every op's forward-mode rule matters. PyTorch's default rules waste work
in exactly the layers a backbone is made of (measured on CPU, torch 2.15, fp32):

* ``linear``: the rule of ``mm``/``addmm`` is ``dx @ W + x @ dW`` and materialises
  ``dW`` as a zero tensor when the weight has no tangent, so the tangent costs two
  matmuls instead of one (JVP ≈ 3.3× a forward instead of 2×).
* ``conv2d`` and the fixed-filter resampling convolutions: the same, ≈ 2.5–6×.
* ``layer_norm`` and ``group_norm``: their rules are composite and cost 28× and 46×
  the forward.

How the rules are attached. Inside ``torch.func.jvp`` every tensor is a dual number at
the current forward-AD level, so an op can split its inputs with
``forward_ad.unpack_dual``, run the primal (a fused kernel, differentiable by ordinary
autograd) and the tangent (only the terms whose tangents exist) itself, and join them
with ``forward_ad.make_dual``. Unlike an ``autograd.Function`` with a ``jvp`` staticmethod,
this costs about a built-in op per call (an ``autograd.Function`` goes through
functorch's Python machinery under ``torch.func``: 0.6–0.8 ms per call measured here),
needs no hand-written backward (the primal and the tangent are ordinary differentiable
ops, so "fused" JVP mode and gradients *of* the tangent are exact), keeps nothing alive
under ``torch.no_grad()``, and composes with ``vmap`` (``jacfwd``) and the classic
dual-tensor API. Outside forward-mode AD the plain ``torch.nn.functional`` op runs.

Under ``torch.compile`` these ops use the plain ops (whose default rules are exact):
Dynamo silently drops custom forward-mode rules of ``autograd.Function`` (pytorch#192985),
and cannot trace ``F.group_norm`` inside ``torch.func.jvp`` at all (torch 2.15), so the
traced path never relies on either.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

__all__ = [
    "custom_jvp_active",
    "forward_ad_active",
    "custom_jvp_rules",
    "unpack",
    "linear",
    "addcmul",
    "conv2d",
    "fixed_filter_conv",
    "layer_norm",
    "group_norm",
    "group_norm_reference",
]

_ENABLED = True


class custom_jvp_rules:
    """``with custom_jvp_rules(False):`` runs every op with PyTorch's default rules (baselines, tests)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __enter__(self):
        global _ENABLED
        self.prev, _ENABLED = _ENABLED, self.enabled

    def __exit__(self, *exc):
        global _ENABLED
        _ENABLED = self.prev


def forward_ad_active() -> bool:
    """True inside ``torch.func.jvp`` or a ``forward_ad.dual_level`` (also while being traced by Dynamo)."""
    return fwAD._current_level >= 0


def custom_jvp_active() -> bool:
    """Whether the custom rules are used now: eager forward-mode AD only (see the module docstring)."""
    if torch.compiler.is_compiling():
        return False
    return _ENABLED and fwAD._current_level >= 0


def unpack(x):
    """(primal, tangent or None) of a tensor at the current forward-AD level; (x, None) for non-tensors."""
    if not isinstance(x, torch.Tensor):
        return x, None
    primal, tangent = fwAD.unpack_dual(x)
    return primal, tangent


def _join(primal: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    if tangent.shape != primal.shape:  # only a broadcast operand carried a tangent
        tangent = tangent.expand_as(primal).contiguous()
    return fwAD.make_dual(primal, tangent)


def _add(a, b):
    return b if a is None else (a if b is None else a + b)


def _exact_stats() -> bool:
    # The native norm kernels return mean and rstd as non-differentiable outputs. When a
    # gradient may flow through the tangent (e.g. a loss on du/dt), recompute them with
    # differentiable ops; a no-grad tangent pass uses the kernel's.
    return torch.is_grad_enabled()


# ---------------------------------------------------------------------------------------------
# linear: y = x Wᵀ + b,  dy = dx Wᵀ + x dWᵀ + db


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with a one-matmul tangent under forward-mode AD."""
    if custom_jvp_active():
        (xp, dx), (wp, dw), (bp, db) = unpack(x), unpack(weight), unpack(bias)
        if dx is not None or dw is not None or db is not None:
            out = F.linear(xp, wp, bp)
            tangent = F.linear(dx, wp) if dx is not None else None
            if dw is not None:
                tangent = _add(tangent, F.linear(xp, dw))
            return _join(out, _add(tangent, db))
    return F.linear(x, weight, bias)


# ---------------------------------------------------------------------------------------------
# a + b ∘ c (broadcasting): adaLN modulation x(1 + scale) + shift and gated residuals x + g ∘ y.
# The default rules spend four passes (two products, two sums) on da + db ∘ c + b ∘ dc;
# two fused multiply-adds suffice.


def addcmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a + b ∘ c with broadcasting, whose tangent takes two fused passes."""
    if custom_jvp_active():
        (ap, da), (bp, db), (cp, dc) = unpack(a), unpack(b), unpack(c)
        if da is not None or db is not None or dc is not None:
            out = torch.addcmul(ap, bp, cp)
            tangent = da
            if db is not None:
                tangent = db * cp if tangent is None else torch.addcmul(tangent, db, cp)
            if dc is not None:
                tangent = bp * dc if tangent is None else torch.addcmul(tangent, bp, dc)
            return _join(out, tangent)
    return torch.addcmul(a, b, c)


# ---------------------------------------------------------------------------------------------
# conv2d: bilinear in (x, W), so dy = conv(dx, W) + conv(x, dW) + db


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """``F.conv2d`` with a one-convolution tangent under forward-mode AD."""
    if custom_jvp_active():
        (xp, dx), (wp, dw), (bp, db) = unpack(x), unpack(weight), unpack(bias)
        if dx is not None or dw is not None or db is not None:
            out = F.conv2d(xp, wp, bp, stride, padding, dilation, groups)
            tangent = F.conv2d(dx, wp, None, stride, padding, dilation, groups) if dx is not None else None
            if dw is not None:
                tangent = _add(tangent, F.conv2d(xp, dw, None, stride, padding, dilation, groups))
            if db is not None:
                tangent = _add(tangent, db.view(1, -1, 1, 1))
            return _join(out, tangent)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


# ---------------------------------------------------------------------------------------------
# A fixed (non-learned) linear filter, e.g. the FIR up/down-sampling of EDM's U-Net:
# y = A x with A constant, so dy = A dx.


def fixed_filter_conv(x, filt, *, transposed: bool, stride: int, padding: int, groups: int) -> torch.Tensor:
    """Depthwise convolution (or transposed convolution) with a constant filter; the tangent is the same map."""
    op = F.conv_transpose2d if transposed else F.conv2d
    if custom_jvp_active():
        xp, dx = unpack(x)
        if dx is not None:
            out = op(xp, filt, None, stride=stride, padding=padding, groups=groups)
            return _join(out, op(dx, filt, None, stride=stride, padding=padding, groups=groups))
    return op(x, filt, None, stride=stride, padding=padding, groups=groups)


# ---------------------------------------------------------------------------------------------
# Normalisation over groups of n elements. With x̂ = (x - μ) r, r = (σ² + ε)^(-1/2):
#   dμ = mean(dx),  dσ² = 2 mean((x - μ) dx),  dr = -r³ mean((x - μ) dx) = -r² mean(x̂ dx)
#   dx̂ = r (dx - dμ) + (x - μ) dr = r (dx - mean(dx) - x̂ mean(x̂ dx))
# and y = x̂ w + b gives dy = w dx̂ + x̂ dw + db. The primal is the native kernel, which
# also returns μ and r, so the tangent does not recompute the statistics (torch.var_mean
# alone costs ~9x a layer norm on CPU).


def _norm_tangent(xhat_g, dx_g, rstd_g):
    """dx̂ = r (dx - mean(dx) - x̂ mean(x̂ dx)) over the last dim of (..., n) views; rstd_g (..., 1).

    Written as A dx + B x̂ + C with per-group coefficients: after the two reductions it
    costs two fused multiply-adds over the tensor.
    """
    m1 = dx_g.mean(-1, keepdim=True)
    m2 = torch.linalg.vecdot(xhat_g, dx_g).unsqueeze(-1) / dx_g.shape[-1]
    return torch.addcmul(torch.addcmul(-rstd_g * m1, xhat_g, -rstd_g * m2), dx_g, rstd_g)


def _stats(xg: torch.Tensor, eps: float):
    """Differentiable (mean, rstd) over the last dim, (..., 1) each."""
    mean = xg.mean(-1, keepdim=True)
    return mean, torch.rsqrt((xg - mean).square().mean(-1, keepdim=True) + eps)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm`` whose tangent costs a few elementwise passes instead of ≈28 forwards."""
    if custom_jvp_active():
        (xp, dx), (wp, dw), (bp, db) = unpack(x), unpack(weight), unpack(bias)
        n_dims = len(normalized_shape) if isinstance(normalized_shape, (tuple, list, torch.Size)) else 1
        if dx is not None or dw is not None or db is not None:
            lead = xp.shape[: xp.ndim - n_dims]
            out, mean, rstd = torch.native_layer_norm(xp, xp.shape[xp.ndim - n_dims :], wp, bp, eps)
            xg = xp.reshape(*lead, -1)
            if _exact_stats():
                mean, rstd = _stats(xg, eps)
            mean, rstd = mean.reshape(*lead, 1), rstd.reshape(*lead, 1)
            # x̂: without an affine map it is the output itself
            xhat_g = out.reshape(*lead, -1) if wp is None and bp is None and not _exact_stats() else (xg - mean) * rstd
            tangent = None
            if dx is not None:
                tangent = _norm_tangent(xhat_g, dx.reshape(*lead, -1), rstd).reshape(xp.shape)
                if wp is not None:
                    tangent = tangent * wp
            if dw is not None:
                tangent = _add(tangent, xhat_g.reshape(xp.shape) * dw)
            return _join(out, _add(tangent, db))
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


def group_norm_reference(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """GroupNorm in elementary ops (mean, centred second moment, rsqrt, affine)."""
    N, C = x.shape[:2]
    xg = x.reshape(N, num_groups, -1)
    mean, rstd = _stats(xg, eps)
    y = ((xg - mean) * rstd).reshape(x.shape)
    shape_c = (1, C) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * weight.reshape(shape_c)
    if bias is not None:
        y = y + bias.reshape(shape_c)
    return y


def group_norm(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """``F.group_norm`` whose tangent costs a few elementwise passes instead of ≈46 forwards."""
    if custom_jvp_active():
        (xp, dx), (wp, dw), (bp, db) = unpack(x), unpack(weight), unpack(bias)
        if dx is not None or dw is not None or db is not None:
            N, C, G = xp.shape[0], xp.shape[1], num_groups
            out, mean, rstd = torch.native_group_norm(xp, wp, bp, N, C, xp[0, 0].numel(), G, eps)
            xg = xp.reshape(N, G, -1)  # (N, G, C/G * spatial)
            mean, rstd = _stats(xg, eps) if _exact_stats() else (mean[..., None], rstd[..., None])
            xhat_g = torch.addcmul(-mean * rstd, xg, rstd)
            shape_c = (1, C) + (1,) * (xp.ndim - 2)
            tangent = None
            if dx is not None:
                # (N, G, C/G, spatial) views: group statistics broadcast over the channels and
                # the per-channel weight folds into the coefficients (no extra pass for ∘ w)
                cg = C // G
                w = wp.reshape(1, G, cg, 1) if wp is not None else None
                xh4, dx4 = xhat_g.reshape(N, G, cg, -1), dx.reshape(N, G, cg, -1)
                m1 = dx4.mean((2, 3), keepdim=True)
                m2 = torch.linalg.vecdot(xhat_g, dx.reshape(N, G, -1)).reshape(N, G, 1, 1) / xhat_g.shape[-1]
                A = rstd.reshape(N, G, 1, 1) if w is None else rstd.reshape(N, G, 1, 1) * w
                tangent = torch.addcmul(torch.addcmul(-A * m1, xh4, -A * m2), dx4, A).reshape(xp.shape)
            if dw is not None:
                tangent = _add(tangent, xhat_g.reshape(xp.shape) * dw.reshape(shape_c))
            if db is not None:
                tangent = _add(tangent, db.reshape(shape_c))
            return _join(out, tangent)
    if torch.compiler.is_compiling() and forward_ad_active():
        # Dynamo cannot trace F.group_norm under torch.func.jvp (torch 2.15: "Observed
        # exception" from an internal assert in _fw_primal); elementary ops trace and their
        # default rules are exact
        return group_norm_reference(x, num_groups, weight, bias, eps)
    return F.group_norm(x, num_groups, weight, bias, eps)
