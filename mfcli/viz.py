"""PNG outputs: image grids, 2-D scatter plots over the data, loss curves."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8, rounding like a saved image."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid_png(x: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    from PIL import Image

    imgs = to_uint8(x)
    n, h, w, c = imgs.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    pad = 2
    canvas = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = imgs[i]
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    img.save(path)
    return Path(path)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scatter_png(samples: torch.Tensor, data: torch.Tensor | None, path: str | Path, title: str = "") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    if data is not None:
        d = data.float().numpy()
        ax.scatter(d[:, 0], d[:, 1], s=2, c="#bbbbbb", label="data")
    s = samples.float().numpy()
    ax.scatter(s[:, 0], s[:, 1], s=2, c="#d62728", label="samples")
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper right", markerscale=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def loss_png(records: list[dict], path: str | Path) -> Path | None:
    recs = [r for r in records if "loss" in r]
    if not recs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [r["step"] for r in recs]
    ax.plot(steps, [r["loss"] for r in recs], label="loss (weighted)")
    if "mse" in recs[0]:
        ax.plot(steps, [r.get("mse", float("nan")) for r in recs], label="raw MSE")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
