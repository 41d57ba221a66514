"""Data speed: what the input pipeline costs per batch, next to one training step (DESIGN §5).

Goal: the on-device path (``mfcli.data.DeviceLoader``) takes at most 5 % of a training step
of the MNIST recipe. The step is that recipe's own (``recipes/mnist_mf.toml``: its backbone
and MeanFlow objective built through the registry, its batch size, optimizer and gradient
clipping: loss with the JVP, backward, step), without the engine's EMA and logging, so
the step is slightly under-timed and the share slightly over-stated. The DataLoader path
(``StreamLoader``) is timed for comparison. Every number comes from one run of this script; the table goes into
benchmarks/RESULTS.md between the data_speed markers.

    OMP_NUM_THREADS=1 python benchmarks/data_speed.py            # CPU, as in RESULTS.md
    python benchmarks/data_speed.py --device cuda --no-write     # on a GPU
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "plugins"):  # run from a checkout without installing
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from mf_datasets._images import TensorImages  # noqa: E402
from mf_datasets.mnist import MNISTConfig, mnist  # noqa: E402
from mfcli.config import load_recipe  # noqa: E402
from mfcli.data import DeviceLoader, StreamLoader  # noqa: E402
from mfcli.engine import build_model  # noqa: E402

BEGIN, END = "<!-- BEGIN data_speed -->", "<!-- END data_speed -->"
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, *, warmup: int, repeat: int) -> list[float]:
    """Seconds per call, each call timed on its own (the device synchronised around it)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def load_mnist(raw_dir: Path, resolution: int) -> tuple[TensorImages, str]:
    """MNIST at the recipe's resolution through the dataset plugin, or random digits of the same size."""
    if all((raw_dir / f"{name}.gz").is_file() for name in MNIST_FILES):
        with tempfile.TemporaryDirectory(prefix="mf-data-speed-") as tmp:  # the split is read into memory
            raw = Path(tmp) / "MNIST" / "raw"
            raw.mkdir(parents=True)
            for name in MNIST_FILES:
                (raw / f"{name}.gz").symlink_to(raw_dir.resolve() / f"{name}.gz")
            dataset = mnist(MNISTConfig(root=tmp, download=False, resolution=resolution), split="train")
        return dataset, f"MNIST train, {resolution}x{resolution}"
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60000, 1, resolution, resolution), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 10, (60000,), generator=gen)
    return TensorImages(images, labels, num_classes=10), "random uint8, MNIST-sized (no MNIST files found)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mnist", type=Path, default=REPO / ".." / "shared" / "data" / "mnist",
                        help="folder with the four MNIST .gz files")
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "mnist_mf.toml"), help="the recipe whose step is timed")
    parser.add_argument("--batch-size", type=int, default=0, help="0: the recipe's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--batches", type=int, default=300, help="timed on-device batches")
    parser.add_argument("--stream-batches", type=int, default=40, help="timed DataLoader batches per setting")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 2], help="DataLoader worker counts to time")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    recipe = load_recipe(args.recipe)
    batch_size = args.batch_size or recipe.loader.batch_size
    dataset, source = load_mnist(args.mnist, recipe.data.resolution)
    images, labels = dataset.tensors()
    rows = []

    # The training step the data must keep up with: the recipe's model, objective and optimizer.
    net, objective = build_model(recipe, dataset.shape, dataset.num_classes)
    net = net.to(device).train()
    cfg = recipe.train
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    x = torch.rand(batch_size, *dataset.shape, device=device) * 2 - 1
    y = torch.randint(0, dataset.num_classes, (batch_size,), device=device)

    def train_step():
        loss, _ = objective.loss(net, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()

    step = statistics.median(time_calls(train_step, device, warmup=3, repeat=args.steps))
    n_params = sum(p.numel() for p in net.parameters())
    rows.append((f"training step of `{Path(args.recipe).name}`: {recipe.names['backbone']} ({n_params / 1e6:.2f} M params), "
                 f"{recipe.names['objective']} objective, loss + JVP + backward + Adam", step))

    loader = DeviceLoader(images, labels, batch_size=batch_size, device=device, hflip=True)
    rows.append(("on-device: `DeviceLoader` (gather, flip, to [-1, 1])",
                 statistics.median(time_calls(lambda: next(loader), device, warmup=20, repeat=args.batches))))

    for workers in args.workers:
        stream = StreamLoader(dataset, batch_size=batch_size, device=device, hflip=True, num_workers=workers)
        per_batch = statistics.median(time_calls(lambda: next(stream), device, warmup=10, repeat=args.stream_batches))
        rows.append((f"DataLoader: `StreamLoader`, {workers} workers, per-item `__getitem__`", per_batch))
        del stream

    device_share = rows[1][1] / step
    threads = torch.get_num_threads()
    lines = [
        f"Data path vs one training step, batch {batch_size}, device `{device}` "
        f"({platform.processor() or platform.machine()}, {threads} torch thread(s), {os.cpu_count()} cores), "
        f"torch {torch.__version__}, data: {source}. Medians of per-call times; the DataLoader rows are timed "
        "back to back without training in between (its best case: workers do not compete with the step).",
        "",
        "| path | ms per batch | share of the step |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {secs * 1e3:.3f} | {100 * secs / step:.2f} % |" for name, secs in rows]
    verdict = "met" if device_share <= 0.05 else "NOT met"
    lines += ["", f"Goal (on-device path at most 5 % of the step): **{verdict}** ({100 * device_share:.2f} %)."]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_block(args.results, table)
        print(f"\nwritten to {args.results}")


def write_block(path: Path, table: str) -> None:
    """Replace this benchmark's block in RESULTS.md (other benchmarks' blocks stay as they are)."""
    block = f"{BEGIN}\n## Data speed (`benchmarks/data_speed.py`)\n\n{table}\n{END}"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, count=1, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
