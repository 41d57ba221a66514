"""Feature-extraction speed of the Fréchet-distance metrics, in images per second.

Measures, on one device, the whole path from uint8 32x32 images to accumulated
float64 statistics:
  * the fixed random stand-in network through clean-fid's pipeline ("clean" mode,
    PIL resize to 299x299 included; "legacy_tensorflow" mode, no resize outside);
  * ResNet-56 penultimate features (the offline stand-in ``fd_resnet56``);
  * clean-fid's Inception, when its weights are found (MF_INCEPTION_WEIGHTS or
    clean-fid's cache); never downloaded here;
and the time of one Fréchet distance at 64 and 2048 dimensions.

Writes a markdown table into benchmarks/RESULTS.md between
``<!-- BEGIN fid_speed -->`` and ``<!-- END fid_speed -->``.

    PYTHONPATH=.:plugins python benchmarks/fid_speed.py --num 256
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "plugins")]

from mfcli.errors import MFError  # noqa: E402
from mfcli.metrics import RandomConvFeatures, frechet_distance, inception_feature_extractor, open_images  # noqa: E402
from mfcli.metrics.classifier import classifier_feature_stats  # noqa: E402
from mfcli.metrics.fid import fid_feature_stats, resolve_inception_weights  # noqa: E402

BEGIN, END = "<!-- BEGIN fid_speed -->", "<!-- END fid_speed -->"
RESNET56 = os.path.join(ROOT, "..", "shared", "data", "resnet_cifar10", "resnet56-4bfd9763.th")


def timed(fn, num: int) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return num / (time.perf_counter() - start)


def load_resnet56(device):
    try:
        from mf_backbones.resnet import build_resnet, load_resnet_weights
    except ImportError:
        return None, "mf_backbones.resnet not available"
    model = build_resnet("resnet56", num_classes=10)
    if os.path.exists(RESNET56):
        load_resnet_weights(model, RESNET56)
        note = "pretrained"
    else:
        note = "random weights (checkpoint not found; speed only)"
    return model.to(device).eval(), note


def run(num: int, batch_size: int, device: torch.device) -> list[tuple[str, str, str]]:
    rng = np.random.default_rng(0)
    images = open_images(rng.integers(0, 256, size=(num, 32, 32, 3), dtype=np.uint8))  # speed does not depend on content
    rows = []
    net = RandomConvFeatures(dim=64).to(device)
    fid_feature_stats(open_images(np.zeros((2, 32, 32, 3), np.uint8)), net, device=device)  # warm-up
    for mode in ("clean", "legacy_tensorflow"):
        ips = timed(lambda: fid_feature_stats(images, net, mode=mode, batch_size=batch_size, device=device), num)
        note = "PIL bicubic resize to 299x299 per image dominates" if mode == "clean" else "no resize outside the network"
        rows.append((f"stand-in random conv net, clean-fid `{mode}`", f"{ips:,.0f}", f"64-d; {note}"))
    model, note = load_resnet56(device)
    if model is None:
        rows.append(("ResNet-56 features (`fd_resnet56`)", "—", note))
    else:
        classifier_feature_stats(images, model, num=batch_size, batch_size=batch_size, device=device)  # warm-up
        ips = timed(lambda: classifier_feature_stats(images, model, batch_size=batch_size, device=device), num)
        rows.append(("ResNet-56 features (`fd_resnet56`)", f"{ips:,.0f}", f"64-d, 32x32 input; {note}"))
    try:
        path = resolve_inception_weights() if _weights_present() else None
    except MFError as e:
        path, why = None, str(e).split(".")[0]
    else:
        why = "weights not present (set MF_INCEPTION_WEIGHTS)"
    if path is None:
        rows.append(("Inception-v3 (FID)", "—", why))
    else:
        for mode in ("clean", "legacy_tensorflow"):
            inception = inception_feature_extractor(mode, path, device)
            n = min(num, 128)
            ips = timed(lambda: fid_feature_stats(images, inception, mode=mode, num=n, batch_size=batch_size, device=device), n)
            rows.append((f"Inception-v3 (FID), clean-fid `{mode}`", f"{ips:,.0f}", "2048-d"))
    for dim in (64, 2048):
        a = rng.normal(size=(4 * dim, dim))
        s = a.T @ a / (4 * dim)
        start = time.perf_counter()
        frechet_distance(np.zeros(dim), s, np.ones(dim), s + np.eye(dim) * 0.1)
        rows.append((f"one Fréchet distance, {dim}-d", f"{time.perf_counter() - start:.2f} s", "float64, CPU"))
    return rows


def _weights_present() -> bool:
    from mfcli.metrics.fid import CLEANFID_INCEPTION_DIR, INCEPTION_FILENAME

    return bool(os.environ.get("MF_INCEPTION_WEIGHTS")) or os.path.exists(os.path.join(CLEANFID_INCEPTION_DIR, INCEPTION_FILENAME))


def write_block(rows, header: str, path: str) -> None:
    lines = [BEGIN, "## Feature extraction for Fréchet distances (`benchmarks/fid_speed.py`)", "", header, "",
             "| path | speed (images/s) | note |", "|---|---:|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", END]
    block = "\n".join(lines)
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmark results\n"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=256, help="images per measurement")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = run(args.num, args.batch_size, device)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    header = (
        f"{time.strftime('%Y-%m-%d')}: {args.num} images of 32x32, batch {args.batch_size}, device `{device}`{gpu}, "
        f"{torch.get_num_threads()} CPU thread(s), torch {torch.__version__}, {platform.machine()}."
    )
    print(header)
    for row in rows:
        print(" | ".join(row))
    if not args.no_write:
        write_block(rows, header, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
