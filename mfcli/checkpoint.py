"""Checkpoints (DESIGN.md §3).

* ``weights.safetensors``: EMA weights with the resolved config in the metadata, for sampling,
  eval and compression (``weights_raw.safetensors``: the raw weights, same format).
* ``train_state.pt``: everything needed to resume (raw weights, EMA copies, optimizer, step,
  RNG and loader states), loadable with ``torch.load(weights_only=True)``.
Every write is atomic; nothing is ever loaded with full pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mfcli.errors import MFError
from mfcli.runs import atomic_write_with

FORMAT = "mf-weights-1"


def save_weights(path: str | Path, state: dict[str, torch.Tensor], config: dict[str, Any], **meta: Any) -> None:
    from mfcli import __version__

    metadata = {"format": FORMAT, "mf_version": __version__, "config": json.dumps(config)}
    metadata.update({k: json.dumps(v) for k, v in meta.items()})
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, metadata with ``config`` parsed). Clear errors for missing, truncated or foreign files."""
    p = Path(path)
    if not p.is_file():
        raise MFError(f"checkpoint '{path}' does not exist.")
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            raw_meta = f.metadata() or {}
        state = load_file(str(p))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise MFError(f"checkpoint '{path}' cannot be read (truncated or not a safetensors file): {exc}.") from exc
    if raw_meta.get("format") != FORMAT or "config" not in raw_meta:
        raise MFError(f"'{path}' is a safetensors file but not an mf checkpoint (no mf config in its metadata).")
    meta: dict[str, Any] = {}
    for k, v in raw_meta.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return state, meta


def save_train_state(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write_with(path, lambda tmp: torch.save(state, tmp))


def load_train_state(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise MFError(f"'{p.parent}' has no train_state.pt to resume from (the run never reached a checkpoint).")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for torn or foreign files
        raise MFError(f"'{path}' cannot be loaded as an mf train state (truncated or foreign): {type(exc).__name__}: {exc}.") from exc
