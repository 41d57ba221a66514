"""The shapes of the components that plugins provide.

Conventions (METHODS.md §0): t = 1 is noise, t = 0 is data,
``z_t = (1 - t) x + t e``, ``v = e - x``, ``h = t - r >= 0``; the network predicts the
average velocity ``u(z_t, r, t)`` and is called as ``net(z, t, h, cond)``.

Backbone (``torch.nn.Module``)
    ``forward(z, t, h, cond=None) -> u`` with ``z`` of shape (B, *shape), ``t`` and
    ``h`` of shape (B,) float in [0, 1], ``cond`` a dict of optional conditions:
    ``"y"`` (B,) long class labels where ``num_classes`` (an int, 0 =
    unconditional) is the null class used for guidance; ``"omega"`` (B,) guidance
    scale; ``"t_min"``, ``"t_max"`` (B,) guidance interval. Attributes:
    ``num_classes``, ``conditions`` (a frozenset of the cond keys it understands)
    and ``has_v_head``; with ``cond["return_v"] = True`` a backbone that has a v head
    returns ``(u, v)``. Every backbone supports ``torch.func.jvp`` through
    ``(z, t, h)``.

Objective
    ``loss(net, x, y=None, *, step=0, t=None, r=None, noise=None) -> (loss, logs)``:
    ``net`` is the bare backbone (never a DDP wrapper when a JVP is taken);
    explicit ``t``, ``r``, ``noise`` pin the random draws so tests can reproduce a
    loss. ``logs`` maps names to detached scalars (always ``mse``, the raw
    unweighted mean squared error). ``guidance`` says how sampling guides:
    ``"none"`` (unconditional), ``"cfg"`` (classic CFG on the output, 2 NFE per
    step), ``"folded"`` (guidance baked in at training; scale fixed) or ``"input"``
    (the network takes omega and the interval as conditions).

Dataset (``torch.utils.data.Dataset``)
    items are ``(x, y)``: images as float CHW in [-1, 1] (or points for 2-D data)
    and an int label (0 when unlabelled). Attributes ``shape`` (tuple) and
    ``num_classes`` (0 = unlabelled). Small datasets also provide
    ``tensors() -> (data, labels)``: the whole split as one tensor (uint8 NCHW for
    images, float for points) plus a long label tensor, so the engine can keep it
    on the device.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

GUIDANCE_MODES = ("none", "cfg", "folded", "input")


class Objective(Protocol):
    guidance: str

    def loss(
        self,
        net: torch.nn.Module,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        step: int = 0,
        t: torch.Tensor | None = None,
        r: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        cond: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The batch's loss and scalars to log. ``cond`` (passed only when the recipe asks for
        it, e.g. ``data.augment = "edm"``) holds per-sample conditioning, rows aligned with
        ``x``, that every network call must receive for the samples it sees."""
        ...
