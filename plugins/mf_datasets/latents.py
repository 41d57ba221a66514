"""Pre-encoded VAE latents (e.g. ImageNet 256² through SD-VAE: 4 × 32 × 32) from an ``.npz``.

MeanFlow's ImageNet models train on latents, not pixels (METHODS §1.6). Encode the images once
with the VAE of your choice and save ``latents`` (N, C, H, W) float and ``labels`` (N,) int; this
dataset multiplies by ``scale`` (0.18215 for SD-VAE) and serves them like any other dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mfcli.errors import MFError


@dataclass
class LatentsConfig:
    path: str = ""  # .npz with float `latents` (N, C, H, W) and int `labels` (N,)
    test_path: str = ""  # the test split's file (default: the same file)
    scale: float = 0.18215  # multiplied into the latents (SD-VAE's factor)
    class_conditional: bool = True  # use the labels (null class = num_classes)
    num_classes: int = 0  # 0: largest label + 1


class Latents(torch.utils.data.Dataset):
    def __init__(self, cfg: LatentsConfig, *, split: str = "train"):
        path = cfg.test_path if split == "test" and cfg.test_path else cfg.path
        if not path:
            raise MFError("the latents dataset needs data.path = \"latents.npz\" (float `latents` (N, C, H, W) and int `labels`).")
        p = Path(path).expanduser()
        if not p.is_file():
            raise MFError(f"latents file '{p}' does not exist. Encode your images with the VAE once and save them with numpy.savez(path, latents=..., labels=...).")
        try:
            with np.load(p, allow_pickle=False) as f:
                if "latents" not in f.files:
                    raise MFError(f"'{p}' has no `latents` array (it has: {', '.join(f.files)}).")
                lat = f["latents"]
                labels = f["labels"] if "labels" in f.files else np.zeros(len(lat), np.int64)
        except (OSError, ValueError) as exc:
            raise MFError(f"'{p}' cannot be read as an .npz file: {exc}") from exc
        if lat.ndim != 4 or not np.issubdtype(lat.dtype, np.floating):
            raise MFError(f"`latents` in '{p}' must be float (N, C, H, W); got {lat.dtype} of shape {lat.shape}.")
        self.data = torch.from_numpy(np.ascontiguousarray(lat, dtype=np.float32)) * cfg.scale
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.shape = tuple(self.data.shape[1:])
        self.hflip = False  # flipping latents is not flipping images
        n = cfg.num_classes or (int(self.labels.max()) + 1 if len(self.labels) else 0)
        self.num_classes = n if cfg.class_conditional else 0
        if not cfg.class_conditional:
            self.labels = torch.zeros_like(self.labels)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.data[i], int(self.labels[i])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data, self.labels


COMPONENTS = {"latents": (Latents, LatentsConfig, "pre-encoded VAE latents from an .npz (ImageNet-scale DiT training)")}
