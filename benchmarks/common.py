"""Shared pieces of the benchmarks: paired interleaved timing and RESULTS.md blocks."""

from __future__ import annotations

import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def paired_times(fns: dict[str, Callable[[], object]], device: torch.device, *, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Run every function once per round, in turn, so that drifts in machine load hit all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def median_ratio(num: list[float], den: list[float]) -> float:
    """Median of the per-round ratios (robust to rounds slowed by other processes)."""
    return statistics.median(a / b for a, b in zip(num, den))


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} torch threads), torch {torch.__version__}"


def write_block(name: str, text: str, path: Path = RESULTS) -> None:
    """Replace the block between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` (appending it if new)."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    content = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in content and end in content:
        content = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, content, count=1, flags=re.S)
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    path.write_text(content)
