"""Layer primitives with cheap forward-mode (JVP) rules.

A MeanFlow step differentiates the network forward along a tangent (``torch.func.jvp``),
so the cost of every op's forward-mode rule matters. PyTorch's default rules waste work
in exactly the layers a backbone is made of (measured on CPU, torch 2.15, fp32):

* ``linear``: the rule of ``mm``/``addmm`` is ``dx @ W + x @ dW`` and materialises
  ``dW`` as a zero tensor when the weight has no tangent, so the tangent costs two
  matmuls instead of one (JVP ≈ 3.3× a forward instead of 2×).
* ``conv2d`` and the fixed-filter resampling convolutions: the same, ≈ 2.5–6×.
* ``layer_norm`` and ``group_norm``: their rules are composite and cost 28× and 46×
  the forward.

Each op below is an ``autograd.Function`` whose ``jvp`` computes only the terms whose
tangents exist (``ctx.set_materialize_grads(False)`` keeps absent tangents ``None``)
and whose ``backward`` is exact, so the same call serves the "fused" JVP mode in which
the primal output also carries gradients. Outside forward-mode AD the plain
``torch.nn.functional`` op runs, so ordinary training pays nothing.

Under ``torch.compile``, Dynamo inlines an ``autograd.Function``'s ``forward`` and drops
its ``jvp`` rule without a warning (pytorch/pytorch#192985). The dispatch therefore
uses the plain op whenever it is being traced: the default rules are exact, only
slower, and the tangent stays correct.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

__all__ = [
    "custom_jvp_active",
    "forward_ad_active",
    "linear",
    "conv2d",
    "fixed_filter_conv",
    "layer_norm",
    "group_norm",
    "custom_jvp_rules",
]

_ENABLED = True


class custom_jvp_rules:
    """Context manager: ``with custom_jvp_rules(False):`` runs every op with PyTorch's default rules (for baselines)."""

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
    """Whether the custom rules below would be used now: eager forward-mode AD only (see the module docstring)."""
    if torch.compiler.is_compiling():
        return False
    return _ENABLED and fwAD._current_level >= 0


def _add(a, b):
    return b if a is None else (a if b is None else a + b)


def _bcast_channel(p: torch.Tensor, ndim: int) -> torch.Tensor:
    return p.reshape(1, -1, *([1] * (ndim - 2)))


# ---------------------------------------------------------------------------------------------
# linear: y = x Wᵀ + b,  dy = dx Wᵀ + x dWᵀ + db


class _Linear(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.set_materialize_grads(False)
        ctx.has_bias = bias is not None
        ctx.save_for_forward(x, weight)
        ctx.save_for_backward(x, weight)

    @staticmethod
    def jvp(ctx, dx, dweight, dbias):
        x, weight = ctx.saved_tensors
        out = F.linear(dx, weight) if dx is not None else None
        if dweight is not None:
            out = _add(out, F.linear(x, dweight))
        if dbias is not None:
            out = dbias.expand(*x.shape[:-1], -1).clone() if out is None else out + dbias
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        if grad is None:
            return None, None, None
        gx = grad @ weight if ctx.needs_input_grad[0] else None
        g2 = grad.reshape(-1, grad.shape[-1])
        gw = g2.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        gb = g2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with a one-matmul tangent under forward-mode AD."""
    if custom_jvp_active():
        return _Linear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


# ---------------------------------------------------------------------------------------------
# conv2d: linear in (x, W) jointly, so dy = conv(dx, W) + conv(x, dW) + db


class _Conv2d(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, stride, padding, dilation, groups):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, stride, padding, dilation, groups = inputs
        ctx.set_materialize_grads(False)
        ctx.args = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        ctx.save_for_forward(x, weight)
        ctx.save_for_backward(x, weight)

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, *_):
        x, weight = ctx.saved_tensors
        out = F.conv2d(dx, weight, None, *ctx.args) if dx is not None else None
        if dweight is not None:
            out = _add(out, F.conv2d(x, dweight, None, *ctx.args))
        if dbias is not None:
            out = out + _bcast_channel(dbias, 4)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.args
        gx = gw = gb = None
        if grad is not None:
            if ctx.needs_input_grad[0]:
                gx = torch.nn.grad.conv2d_input(x.shape, weight, grad, stride, padding, dilation, groups)
            if ctx.needs_input_grad[1]:
                gw = torch.nn.grad.conv2d_weight(x, weight.shape, grad, stride, padding, dilation, groups)
            if ctx.has_bias and ctx.needs_input_grad[2]:
                gb = grad.sum((0, 2, 3))
        return gx, gw, gb, None, None, None, None


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> torch.Tensor:
    """``F.conv2d`` with a one-convolution tangent under forward-mode AD."""
    if custom_jvp_active():
        return _Conv2d.apply(x, weight, bias, stride, padding, dilation, groups)
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


# ---------------------------------------------------------------------------------------------
# A fixed (non-learned) linear filter, e.g. the FIR up/down-sampling of EDM's U-Net:
# y = A x with A constant, so dy = A dx and the backward is Aᵀ g.


class _FixedFilter(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, filt, transposed, stride, padding, groups):
        op = F.conv_transpose2d if transposed else F.conv2d
        return op(x, filt, None, stride=stride, padding=padding, groups=groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, filt, transposed, stride, padding, groups = inputs
        ctx.set_materialize_grads(False)
        ctx.args = (transposed, stride, padding, groups)
        ctx.in_shape = x.shape
        ctx.save_for_forward(filt)
        ctx.save_for_backward(filt)

    @staticmethod
    def jvp(ctx, dx, *_):
        (filt,) = ctx.saved_tensors
        transposed, stride, padding, groups = ctx.args
        op = F.conv_transpose2d if transposed else F.conv2d
        return op(dx, filt, None, stride=stride, padding=padding, groups=groups)

    @staticmethod
    def backward(ctx, grad):
        (filt,) = ctx.saved_tensors
        transposed, stride, padding, groups = ctx.args
        if grad is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        if transposed:  # the adjoint of a transposed convolution is the convolution
            gx = F.conv2d(grad, filt, None, stride=stride, padding=padding, groups=groups)
        else:
            gx = torch.nn.grad.conv2d_input(ctx.in_shape, filt, grad, stride, padding, 1, groups)
        return gx, None, None, None, None, None


def fixed_filter_conv(x, filt, *, transposed: bool, stride: int, padding: int, groups: int) -> torch.Tensor:
    """Depthwise convolution (or transposed convolution) with a constant filter; the tangent is the same map."""
    if custom_jvp_active():
        return _FixedFilter.apply(x, filt, transposed, stride, padding, groups)
    op = F.conv_transpose2d if transposed else F.conv2d
    return op(x, filt, None, stride=stride, padding=padding, groups=groups)


# ---------------------------------------------------------------------------------------------
# Normalisation over groups of n elements. With x̂ = (x - μ) r, r = (σ² + ε)^(-1/2):
#   dμ = mean(dx),  dσ² = 2 mean((x - μ) dx),  dr = -r³ mean((x - μ) dx) = -r² mean(x̂ dx)
#   dx̂ = r (dx - dμ) + (x - μ) dr = r (dx - mean(dx) - x̂ mean(x̂ dx))
# and y = x̂ w + b gives dy = dx̂ w + x̂ dw + db. The forward runs the native kernel, which
# also returns μ and r; they are extra outputs (not differentiable) so the tangent reuses
# them instead of recomputing the statistics (torch.var_mean alone is ~9x a layer norm).


def _norm_tangent(xhat_g: torch.Tensor, dx_g: torch.Tensor, rstd_g: torch.Tensor) -> torch.Tensor:
    """dx̂ = r (dx - mean(dx) - x̂ mean(x̂ dx)) for groups along the last dim of (..., n) views; rstd_g (..., 1).

    Written as r dx + (-r m1) + (-r m2) x̂ so that after the two reductions it costs two
    fused multiply-adds over the tensor.
    """
    m1 = dx_g.mean(-1, keepdim=True)
    m2 = torch.linalg.vecdot(xhat_g, dx_g).unsqueeze(-1) / dx_g.shape[-1]
    return torch.addcmul(torch.addcmul(-rstd_g * m1, xhat_g, -rstd_g * m2), dx_g, rstd_g)


class _LayerNorm(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, n_dims, eps):
        return torch.native_layer_norm(x, x.shape[x.ndim - n_dims :], weight, bias, eps)  # (y, mean, rstd)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, n_dims, eps = inputs
        y, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)
        ctx.n_dims, ctx.affine = n_dims, (weight is not None, bias is not None)
        ctx.save_for_forward(x, weight, y, mean, rstd)
        ctx.save_for_backward(x, weight, bias, mean, rstd)

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, *_):
        x, weight, y, mean, rstd = ctx.saved_tensors
        lead = x.shape[: x.ndim - ctx.n_dims]
        # without an affine map the output is x̂ itself
        xhat = y if not any(ctx.affine) else (x - mean) * rstd
        out = None
        if dx is not None:
            out = _norm_tangent(xhat.reshape(*lead, -1), dx.reshape(*lead, -1), rstd.reshape(*lead, 1)).reshape(x.shape)
            if weight is not None:
                out = out * weight
        if dweight is not None:
            out = _add(out, xhat * dweight)
        if dbias is not None:
            out = _add(out, dbias.expand_as(x))
        return out, None, None

    @staticmethod
    def backward(ctx, grad, _gmean, _grstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
            grad, x, x.shape[x.ndim - ctx.n_dims :], mean, rstd, weight, bias, mask
        )
        return gx, gw, gb, None, None


def layer_norm(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm`` whose tangent costs a few elementwise passes instead of ≈28 forwards."""
    if custom_jvp_active():
        n_dims = len(normalized_shape) if isinstance(normalized_shape, (tuple, list, torch.Size)) else 1
        return _LayerNorm.apply(x, weight, bias, n_dims, eps)[0]
    return F.layer_norm(x, normalized_shape, weight, bias, eps)


class _GroupNorm(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, num_groups, eps):
        N, C = x.shape[:2]
        return torch.native_group_norm(x, weight, bias, N, C, x[0, 0].numel(), num_groups, eps)  # (y, mean, rstd)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, num_groups, eps = inputs
        y, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)
        ctx.num_groups, ctx.affine = num_groups, (weight is not None, bias is not None)
        ctx.save_for_forward(x, weight, y, mean, rstd)
        ctx.save_for_backward(x, weight, mean, rstd)

    @staticmethod
    def jvp(ctx, dx, dweight, dbias, *_):
        x, weight, y, mean, rstd = ctx.saved_tensors
        N, C, G = x.shape[0], x.shape[1], ctx.num_groups
        xg = x.reshape(N, G, -1)  # (N, G, C/G * spatial)
        r = rstd[..., None]  # (N, G, 1)
        xhat_g = y.reshape(N, G, -1) if not any(ctx.affine) else torch.addcmul(-mean[..., None] * r, xg, r)
        shape_c = (1, C) + (1,) * (x.ndim - 2)
        out = None
        if dx is not None:
            out = _norm_tangent(xhat_g, dx.reshape(N, G, -1), r).reshape(x.shape)
            if weight is not None:
                out = out * weight.reshape(shape_c)
        if dweight is not None:
            out = _add(out, xhat_g.reshape(x.shape) * dweight.reshape(shape_c))
        if dbias is not None:
            out = _add(out, dbias.reshape(shape_c).expand_as(x))
        return out, None, None

    @staticmethod
    def backward(ctx, grad, _gmean, _grstd):
        x, weight, mean, rstd = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None
        N, C = x.shape[:2]
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1], ctx.affine[1] and ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(
            grad, x, mean, rstd, weight, N, C, x[0, 0].numel(), ctx.num_groups, mask
        )
        return gx, gw, gb, None, None


def group_norm_reference(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """GroupNorm in elementary ops (mean, centred second moment, rsqrt, affine)."""
    N, C = x.shape[:2]
    xg = x.reshape(N, num_groups, -1)
    mu = xg.mean(-1, keepdim=True)
    xc = xg - mu
    y = (xc * torch.rsqrt(xc.square().mean(-1, keepdim=True) + eps)).reshape(x.shape)
    shape_c = (1, C) + (1,) * (x.ndim - 2)
    if weight is not None:
        y = y * weight.reshape(shape_c)
    if bias is not None:
        y = y + bias.reshape(shape_c)
    return y


def group_norm(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5) -> torch.Tensor:
    """``F.group_norm`` whose tangent costs a few elementwise passes instead of ≈46 forwards."""
    if custom_jvp_active():
        return _GroupNorm.apply(x, weight, bias, num_groups, eps)[0]
    if torch.compiler.is_compiling() and forward_ad_active():
        # Dynamo cannot trace F.group_norm under torch.func.jvp (torch 2.15: "Observed
        # exception" from an internal assert in _fw_primal); elementary ops trace and their
        # default rules are exact
        return group_norm_reference(x, num_groups, weight, bias, eps)
    return F.group_norm(x, num_groups, weight, bias, eps)
