"""The compression report: parameters and their reduction, top-1 and images/s of baseline, meta and hybrid.

Every parameter count is ``sum(p.numel())`` over the model that was evaluated (BatchNorm
running statistics are buffers and are not counted), never a formula.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mfcli.compress.modules import MeanFlowModule, count_params

ORDER = ("baseline", "meta", "hybrid")


def reduction_percent(params: int, baseline_params: int) -> float:
    """100 · (1 − params / baseline_params): the share of the baseline's parameters removed."""
    return 100.0 * (1.0 - params / baseline_params)


def build_report(models: dict[str, nn.Module], *, evals: dict[str, Any], speed: dict[str, float], phases: dict[str, Any],
                 model_name: str, incubate: list[int], device: torch.device, speed_batch_size: int) -> dict[str, Any]:
    base_params = count_params(models["baseline"])
    out: dict[str, Any] = {"model": model_name, "incubate": list(incubate), "device": str(device),
                           "threads": torch.get_num_threads(), "speed_batch_size": speed_batch_size, "models": {}}
    base_top1 = evals.get("baseline", {}).get("top1")
    for name in ORDER:
        m = models[name]
        n = count_params(m)
        e = evals.get(name, {})
        top = e.get("top1")
        out["models"][name] = {
            "params": n,
            "reduction_percent": reduction_percent(n, base_params),
            "top1": top,
            "top1_delta": None if top is None or base_top1 is None else top - base_top1,
            "test_images": e.get("num_images"),
            "images_per_s": speed.get(name),
            "speedup": None if name not in speed or "baseline" not in speed else speed[name] / speed["baseline"],
        }
    stages = []
    for k, (b, me, h) in enumerate(zip(models["baseline"].stages, models["meta"].stages, models["hybrid"].stages), 1):
        stages.append({"stage": k, "baseline_params": count_params(b), "meta_params": count_params(me),
                       "hybrid_params": count_params(h), "hybrid_kind": "meanflow" if isinstance(h, MeanFlowModule) else "blocks"})
    out["stages"] = stages
    out["phase_seconds"] = {k: v.get("seconds") for k, v in phases.items()}
    out["phase_cpu_seconds"] = {k: v.get("cpu_seconds") for k, v in phases.items()}
    out["total_seconds"] = sum(v.get("seconds", 0.0) for v in phases.values())
    out["total_cpu_seconds"] = sum(v.get("cpu_seconds", 0.0) for v in phases.values())
    return out


def print_report(doc: dict[str, Any]) -> None:
    from rich.table import Table

    from mfcli.console import out

    table = Table(title=f"mf compress {doc['model']} (incubated: {', '.join(map(str, doc['incubate'])) or 'none'})")
    for col in ("model", "parameters", "reduction", "top-1", "Δ top-1", "images/s", "speed-up"):
        table.add_column(col, justify="left" if col == "model" else "right")

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for name in ORDER:
        m = doc["models"][name]
        table.add_row(name, f"{m['params']:,}", f(m["reduction_percent"], ".2f") + " %", f(m["top1"], ".2f") + " %",
                      f(m["top1_delta"], "+.2f"), f(m["images_per_s"], ".0f"), f(m["speedup"], ".2f") + "×")
    out.print(table)
    n = doc["models"]["hybrid"]["test_images"]
    out.print(f"top-1 on {n} test images; images/s: batch {doc['speed_batch_size']}, {doc['device']}, "
              f"{doc['threads']} threads; time before the report {doc['total_seconds'] / 60:.1f} min "
              f"(CPU time of this process {doc['total_cpu_seconds'] / 60:.1f} min)")
