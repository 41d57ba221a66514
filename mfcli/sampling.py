"""Loading a trained model and drawing samples with the right kind of guidance."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mfcli import checkpoint
from mfcli.config import Recipe, recipe_from_resolved
from mfcli.errors import MFError
from mfcli.sampler import sample


@dataclass
class Loaded:
    net: torch.nn.Module
    objective: Any
    recipe: Recipe
    shape: tuple[int, ...]
    num_classes: int
    meta: dict[str, Any]


def load_model(weights: str | Path, device: torch.device | str = "cpu") -> Loaded:
    """Rebuild the backbone and objective from a checkpoint's own config, then load its weights."""
    from mfcli.engine import build_model

    state, meta = checkpoint.load_weights(weights)
    recipe = recipe_from_resolved(meta["config"])
    shape, num_classes = tuple(meta["shape"]), int(meta["num_classes"])
    net, objective = build_model(recipe, shape, num_classes)
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise MFError(f"weights in '{weights}' do not match the model their config describes: {exc}") from exc
    return Loaded(net.to(device).eval(), objective, recipe, shape, num_classes, meta)


def parse_classes(spec: str | None, num_classes: int) -> list[int] | None:
    """'3' -> [3]; '0-9' -> [0..9]; '1,4,7' -> [1, 4, 7]; None -> None (all classes evenly)."""
    if spec is None:
        return None
    if num_classes == 0:
        raise MFError("this model is unconditional: it has no classes to choose from (drop --class/--classes).")
    out: list[int] = []
    try:
        for part in str(spec).split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError as exc:
        raise MFError(f"--classes '{spec}' is not a class list such as 3, 0-9 or 1,4,7.") from exc
    bad = [c for c in out if not 0 <= c < num_classes]
    if bad or not out:
        raise MFError(f"class {bad[0] if bad else spec} does not exist: this model has classes 0-{num_classes - 1}.")
    return out


def guidance_plan(objective: Any, num_classes: int, guidance: float | None, interval: tuple[float, float] | None) -> tuple[dict[str, Any], str]:
    """How to guide this model: (sampler keyword arguments, a sentence for the user)."""
    mode = getattr(objective, "guidance", "none" if num_classes == 0 else "cfg")
    if num_classes == 0 or mode == "none":
        if guidance is not None and guidance != 1.0:
            raise MFError("guidance needs a class-conditional model: this model is unconditional, so there is no conditional and unconditional velocity to mix. Drop --guidance.")
        return {}, ""
    if mode == "folded":
        scale = getattr(objective, "cfg_scale", None)
        msg = f"guidance is folded into this model at training (effective scale {scale}); 1 NFE per step"
        if guidance is not None and guidance != scale:
            msg += f"; --guidance {guidance} cannot change it and is ignored"
        return {}, msg
    if mode == "input":
        w = 1.0 if guidance is None else guidance
        lo, hi = interval if interval is not None else (0.0, 1.0)
        return {"omega": w, "t_min": lo, "t_max": hi}, f"guidance {w} on [{lo}, {hi}] is an input of this model: no extra evaluation"
    if guidance is None or guidance == 1.0:
        return {}, ""
    return {"cfg_scale": guidance}, f"classifier-free guidance {guidance}: 2 network evaluations per step"


def draw(net, objective, shape, num_classes, *, num: int, nfe: int = 1, generator: torch.Generator | None = None,
         device: torch.device | str = "cpu", guidance: float | None = None, interval: tuple[float, float] | None = None,
         classes: list[int] | None = None, timesteps: list[float] | None = None, batch_size: int = 256, on_batch=None):
    """Draw ``num`` samples; returns (samples (num, *shape) on the CPU, labels or None)."""
    if num < 1:
        raise MFError(f"--num must be at least 1, got {num}.")
    if batch_size < 1:
        raise MFError(f"--batch-size must be at least 1, got {batch_size}.")
    plan, _ = guidance_plan(objective, num_classes, guidance, interval)
    cfg_scale = plan.pop("cfg_scale", None)
    labels = None
    if num_classes:
        pool = classes if classes is not None else list(range(num_classes))
        labels = torch.tensor([pool[i % len(pool)] for i in range(num)], dtype=torch.long)
    outs = []
    for start in range(0, num, batch_size):
        b = min(batch_size, num - start)
        z = torch.randn((b, *shape), generator=generator).to(device)
        cond: dict[str, Any] | None = None
        if labels is not None:
            cond = {"y": labels[start : start + b].to(device)}
            for k, v in plan.items():
                cond[k] = torch.full((b,), float(v), device=device)
        x = sample(net, z, nfe=nfe, timesteps=timesteps, cond=cond, cfg_scale=cfg_scale, null_class=num_classes)
        outs.append(x.cpu())
        if on_batch:
            on_batch(b)
    return torch.cat(outs), labels
