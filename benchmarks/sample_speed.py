"""1-NFE sampling throughput against a bare forward of the same backbone, measured side by side.

Goal (issue: sampling): ``mf sample`` at 1 NFE costs one backbone forward per image and nothing
else visible, i.e. samples/s >= 0.95 x the bare forward's images/s. The sampling path includes
noise generation, labels, the sampler's step and the copy of the result to the CPU.

    python benchmarks/sample_speed.py [--device cuda] [--rounds 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median_ratio, paired_times, write_block  # noqa: E402

from mfcli.sampling import draw  # noqa: E402
from mfcli.plugins import registry  # noqa: E402

CASES = {
    # name: (backbone, config overrides, shape, num_classes, batch)
    "MLP 256x4, 2-D": ("mlp", {"width": 256, "depth": 4}, (2,), 0, 4096),
    "DiT-S/4 (depth 4), 32x32x3, class-cond.": ("dit", {"variant": "DiT-S/4", "depth": 4}, (3, 32, 32), 10, 64),
    "UNet-XS, 32x32x3": ("unet", {"variant": "UNet-XS"}, (3, 32, 32), 0, 64),
}


class _NoGuidance:
    guidance = "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    device = torch.device(args.device)
    reg = registry()
    rows = []
    for name, (bb, over, shape, ncls, batch) in CASES.items():
        if bb not in reg.components["backbones"]:
            rows.append(f"| {name} | — | — | — | backbone `{bb}` not registered |")
            continue
        comp = reg.get("backbones", bb)
        try:
            cfg = comp.config(**over)
        except TypeError as exc:
            rows.append(f"| {name} | — | — | — | config mismatch: {exc} |")
            continue
        net = comp.factory(cfg, shape=shape, num_classes=ncls).to(device).eval()
        z = torch.randn(batch, *shape, device=device)
        t = torch.ones(batch, device=device)
        cond = {"y": torch.arange(batch, device=device) % ncls} if ncls else None

        def bare():
            with torch.no_grad():
                net(z, t, t, cond)

        g = torch.Generator().manual_seed(0)

        def sampled():
            draw(net, _NoGuidance(), shape, ncls, num=batch, nfe=1, generator=g, device=device, batch_size=batch)

        times = paired_times({"bare": bare, "sample": sampled}, device, rounds=args.rounds)
        ratio = median_ratio(times["bare"], times["sample"])  # (samples/s) / (forward images/s)
        bare_ips = batch / sorted(times["bare"])[len(times["bare"]) // 2]
        rows.append(f"| {name} | {batch} | {bare_ips:,.0f} | {bare_ips * ratio:,.0f} | **{ratio:.3f}** |")
    table = "\n".join([
        "## 1-NFE sampling vs a bare forward (`benchmarks/sample_speed.py`)",
        "",
        f"Device: {machine(device)}; median of {args.rounds} paired rounds. Goal: ratio >= 0.95.",
        "",
        "| backbone | batch | bare forward images/s | `draw` samples/s | ratio |",
        "|---|---:|---:|---:|---:|",
        *rows,
    ])
    print(table)
    write_block(f"sample_speed_{device.type}", table)


if __name__ == "__main__":
    main()
