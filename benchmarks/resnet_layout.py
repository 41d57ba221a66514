"""ResNet inference on the CPU: NCHW against the NHWC layout that ``ResNetClassifier`` uses there.

``ResNetClassifier.trunk`` turns a CPU input into channels-last (NHWC) before its stem. This
measures, side by side in one process (rounds interleaved), the same pretrained CIFAR ResNet
run through its stem, stages and head on an NCHW tensor (the layout before that change) and
through ``model(x)``, and reports how far apart their logits are. The speed-up is what
``mf eval --metric accuracy``, ``fd-resnet56`` and the ResNet-56 evaluations of ``mf compress``
gain on a CPU.

    PYTHONPATH=.:plugins python benchmarks/resnet_layout.py --arch resnet56 --batch 250
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "plugins"), os.path.dirname(os.path.abspath(__file__))]

from common import machine, median_ratio, paired_times, write_block  # noqa: E402
from mf_backbones.resnet import build_resnet  # noqa: E402


def nchw_forward(model, x):
    h = model.stem(model.normalize(x))
    for stage in model.stages:
        h = stage(h)
    return model.head(h)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet56")
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    torch.manual_seed(0)
    model = build_resnet(args.arch, num_classes=10).eval()
    x = torch.rand(args.batch, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        ref = nchw_forward(model, x)
        rel = ((model(x) - ref).abs().max() / ref.abs().max()).item()
        times = paired_times({"nchw": lambda: nchw_forward(model, x), "nhwc": lambda: model(x)}, device, rounds=args.rounds)
    ips = {k: args.batch / statistics.median(v) for k, v in times.items()}
    ratio = median_ratio(times["nchw"], times["nhwc"])
    text = (
        f"## ResNet inference layout on the CPU (`benchmarks/resnet_layout.py`)\n\n"
        f"{datetime.date.today()}: {args.arch}, batch {args.batch} of 32x32, {args.rounds} interleaved rounds, "
        f"{machine(device)}.\n\n"
        "| path | images/s |\n|---|---:|\n"
        f"| stem, stages, head on NCHW (before) | {ips['nchw']:,.0f} |\n"
        f"| `model(x)`: NHWC inside `trunk` | {ips['nhwc']:,.0f} |\n\n"
        f"NHWC is **{ratio:.2f}x** as fast (median of per-round ratios); largest logit difference {rel:.1e} of the largest logit."
    )
    print(text)
    if not args.no_write:
        write_block("resnet_layout", text)


if __name__ == "__main__":
    main()
