"""Data speed: what the input pipeline costs per batch, next to one training step (DESIGN §5).

Goal: the on-device path (``mfcli.data.DeviceLoader``) takes at most 5 % of a training step.
The step is one flow-matching step (forward, backward, Adam) of a small conv net on
MNIST padded to 32x32 at batch 128. A MeanFlow step adds a JVP (about 3F + rho F instead of
3F), and a recipe's UNet is far larger than this net, so the step here is a lower bound and
the measured share an upper bound. The DataLoader path (``StreamLoader``) is timed for
comparison. Every number comes from one run of this script; the table goes into
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
from torch import nn

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "plugins"):  # run from a checkout without installing
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from mf_datasets._images import TensorImages  # noqa: E402
from mf_datasets.mnist import MNISTConfig, mnist  # noqa: E402
from mfcli.data import DeviceLoader, StreamLoader  # noqa: E402

BEGIN, END = "<!-- BEGIN data_speed -->", "<!-- END data_speed -->"
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class SmallConvNet(nn.Module):
    """A two-level conv encoder-decoder with an additive time embedding (0.11 M parameters at width 32)."""

    def __init__(self, channels: int = 1, width: int = 32):
        super().__init__()
        self.time = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, width))
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.down = nn.Sequential(nn.SiLU(), nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                                  nn.SiLU(), nn.Conv2d(2 * width, 2 * width, 3, padding=1))
        self.up = nn.Sequential(nn.SiLU(), nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1))
        self.out = nn.Sequential(nn.SiLU(), nn.Conv2d(2 * width, width, 3, padding=1),
                                 nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1))

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.inp(z) + self.time(t[:, None])[:, :, None, None]  # (B, W, 32, 32)
        return self.out(torch.cat([h, self.up(self.down(h))], dim=1))


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


def load_mnist(raw_dir: Path) -> tuple[TensorImages, str]:
    """MNIST padded to 32x32 through the dataset plugin, or random digits of the same size."""
    if all((raw_dir / f"{name}.gz").is_file() for name in MNIST_FILES):
        with tempfile.TemporaryDirectory(prefix="mf-data-speed-") as tmp:  # the split is read into memory
            raw = Path(tmp) / "MNIST" / "raw"
            raw.mkdir(parents=True)
            for name in MNIST_FILES:
                (raw / f"{name}.gz").symlink_to(raw_dir.resolve() / f"{name}.gz")
            dataset = mnist(MNISTConfig(root=tmp, download=False, resolution=32), split="train")
        return dataset, "MNIST train, 32x32"
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60000, 1, 32, 32), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, 10, (60000,), generator=gen)
    return TensorImages(images, labels, num_classes=10), "random uint8, MNIST-sized (no MNIST files found)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mnist", type=Path, default=REPO / ".." / "shared" / "data" / "mnist",
                        help="folder with the four MNIST .gz files")
    parser.add_argument("--batch-size", type=int, default=128)
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

    dataset, source = load_mnist(args.mnist)
    images, labels = dataset.tensors()
    rows = []

    # The training step the data must keep up with.
    net = SmallConvNet().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x = torch.rand(args.batch_size, *dataset.shape, device=device) * 2 - 1

    def train_step():
        t = torch.rand(args.batch_size, device=device)
        e = torch.randn_like(x)
        z = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * e  # t = 1 is noise
        loss = (net(z, t) - (e - x)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step = statistics.median(time_calls(train_step, device, warmup=3, repeat=args.steps))
    n_params = sum(p.numel() for p in net.parameters())
    rows.append((f"training step: small conv net ({n_params / 1e6:.2f} M params), flow matching, fwd+bwd+Adam", step))

    loader = DeviceLoader(images, labels, batch_size=args.batch_size, device=device, hflip=True)
    rows.append(("on-device: `DeviceLoader` (gather, flip, to [-1, 1])",
                 statistics.median(time_calls(lambda: next(loader), device, warmup=20, repeat=args.batches))))

    for workers in args.workers:
        stream = StreamLoader(dataset, batch_size=args.batch_size, device=device, hflip=True, num_workers=workers)
        per_batch = statistics.median(time_calls(lambda: next(stream), device, warmup=10, repeat=args.stream_batches))
        rows.append((f"DataLoader: `StreamLoader`, {workers} workers, per-item `__getitem__`", per_batch))
        del stream

    device_share = rows[1][1] / step
    threads = torch.get_num_threads()
    lines = [
        f"Data path vs one training step, batch {args.batch_size}, device `{device}` "
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
