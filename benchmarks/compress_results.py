"""Write a finished `mf compress` run's report into benchmarks/RESULTS.md (the `compress` block).

    python benchmarks/compress_results.py runs/00001-compress-resnet56-cifar10 [--note "..."] [--block compress_gpu]

The block (``compress`` unless ``--block`` names another, e.g. one per device) is replaced in place
(or appended); the rest of RESULTS.md is left as it is.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
from pathlib import Path

import torch


def markers(name: str) -> tuple[str, str]:
    return f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"


def block(run: Path, note: str, block_name: str = "compress") -> str:
    begin, end = markers(block_name)
    rep = json.loads((run / "report.json").read_text())
    cfg = json.loads((run / "config.json").read_text())
    inv = cfg["config"]["invocation"]
    m = rep["models"]
    lines = [
        begin,
        f"## MFI-ResNet compression (`mf compress {inv['model']} --incubate {','.join(map(str, inv['incubate']))}`)",
        "",
        f"Recipe `{Path(cfg['recipe']).name}`, weights `{Path(inv['weights']).name if inv['weights'] else 'trained'}`, "
        f"device `{rep['device']}` ({platform.machine()}, {rep['threads']} torch thread(s)), torch {torch.__version__}. "
        f"Top-1 on {m['hybrid']['test_images']} CIFAR-10 test images; images/s at batch {rep['speed_batch_size']} "
        "(interleaved rounds, median). Parameters are sum(p.numel()) of the evaluated models.",
        "",
        "| model | parameters | reduction | top-1 | Δ top-1 | images/s | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("baseline", "meta", "hybrid"):
        r = m[name]
        lines.append(f"| {name} | {r['params']:,} | {r['reduction_percent']:.2f} % | {r['top1']:.2f} % | {r['top1_delta']:+.2f} | "
                     f"{r['images_per_s']:.0f} | {r['speedup']:.2f}× |")
    lines += ["", "| phase | wall minutes | CPU minutes |", "|---|---:|---:|"]
    cpu = rep.get("phase_cpu_seconds", {})
    for k, v in rep["phase_seconds"].items():
        c = cpu.get(k)
        lines.append(f"| {k} | {v / 60:.1f} | {'-' if c is None else f'{c / 60:.1f}'} |")
    total_cpu = rep.get("total_cpu_seconds")
    lines.append(f"| **total** | **{rep['total_seconds'] / 60:.1f}** | **{'-' if not total_cpu else f'{total_cpu / 60:.1f}'}** |")
    if note:
        lines += ["", note]
    lines.append(end)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--note", default="", help="A paragraph written under the tables (conditions, goal met or not).")
    ap.add_argument("--block", default="compress", help="name of the RESULTS.md block (one per setting, e.g. compress_gpu)")
    ap.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    args = ap.parse_args()
    text = args.results.read_text() if args.results.exists() else "# Benchmark results\n"
    new = block(args.run, args.note, args.block)
    begin, end = markers(args.block)
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: new, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + new + "\n"
    args.results.write_text(text)
    print(new)


if __name__ == "__main__":
    main()
