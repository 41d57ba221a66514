"""Evaluation results: ``<run_dir>/eval.json`` and a rich table.

``eval.json`` accumulates: each evaluation merges its keys into what is there
(nested dicts merge key by key), so FID, the classifier stand-in and accuracy can
be computed by separate commands. It is replaced atomically, so an interrupted
write leaves the previous file intact.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from rich.table import Table

from mfcli.errors import MFError
from mfcli.runs import atomic_write_with

EVAL_FILENAME = "eval.json"

# How keys are shown; a key not listed is shown as it is.
METRIC_LABELS = {
    "fid": "FID (clean-fid)",
    "fid_clean": "FID (clean-fid, clean)",
    "fid_legacy_tensorflow": "FID (clean-fid, legacy_tensorflow)",
    "top1_pct": "top-1 accuracy (%)",
    "top5_pct": "top-5 accuracy (%)",
    "num_images": "images",
    "params": "parameters",
    "params_nonzero": "non-zero parameters",
    "images_per_s": "throughput (images/s)",
}


def metric_label(key: str) -> str:
    """Human label of a results key; ``fd_<net>`` is always marked as not being FID."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf.startswith("fd_"):
        return f"{key}: Fréchet distance in {leaf[3:]} features (offline stand-in, not FID)"
    return f"{key}: {METRIC_LABELS[leaf]}" if leaf in METRIC_LABELS else key


def _jsonable(value: Any) -> Any:
    """Plain JSON values; numpy/torch scalars become numbers, non-finite floats become null."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/Infinity; null says "no finite value"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise MFError(f"Cannot store a {type(value).__name__} in eval.json; results must be numbers, strings or dicts.")


def _merge(old: dict, new: Mapping) -> dict:
    out = dict(old)
    for k, v in new.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def read_eval_json(run_dir: str | os.PathLike) -> dict:
    """The results stored in ``<run_dir>/eval.json`` ({} when there are none)."""
    path = os.path.join(os.fspath(run_dir), EVAL_FILENAME)
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise MFError(
            f"{path} exists but cannot be read as JSON ({e}); it was not written by mf or was damaged. Move it "
            "away to keep it, then evaluate again."
        ) from None
    if not isinstance(data, dict):
        raise MFError(f"{path} holds a JSON {type(data).__name__}, not an object of results.")
    return data


def write_eval_json(run_dir: str | os.PathLike, results: Mapping[str, Any]) -> str:
    """Merge ``results`` into ``<run_dir>/eval.json`` and write it atomically. Returns the path.

    Existing keys not in ``results`` are kept; keys in both take the new value
    (nested dicts merge recursively).
    """
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise MFError(f"The run directory {run_dir} does not exist.")
    path = os.path.join(run_dir, EVAL_FILENAME)
    merged = _merge(read_eval_json(run_dir), _jsonable(dict(results)))
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(merged, f, indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False)
            f.write("\n")

    atomic_write_with(path, write)
    return path


def _flatten(results: Mapping, prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for k, v in results.items():
        key = f"{prefix}{k}"
        rows += _flatten(v, key + ".") if isinstance(v, Mapping) else [(key, v)]
    return rows


def format_value(value: Any) -> str:
    """Numbers as people read them: ints with thousands separators, floats with 4 decimals."""
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if not math.isfinite(v):
            return str(v)
        return f"{v:,.1f}" if abs(v) >= 1e4 else f"{v:.4f}"
    return str(value)


def results_table(results: Mapping[str, Any], title: str = "Evaluation") -> Table:
    """A rich ``Table`` of (nested) results: one row per leaf, labelled by ``metric_label``."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in _flatten(results):
        table.add_row(metric_label(key), format_value(value))
    return table
