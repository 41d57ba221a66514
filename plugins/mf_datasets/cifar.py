"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) through torchvision, 32x32 RGB, held as uint8."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision import datasets

from mf_datasets._images import TensorImages, check_split
from mf_datasets._torchvision import load_torchvision


@dataclass
class CIFARConfig:
    root: str = "data"  # folder that holds cifar-10-batches-py/ (or cifar-100-python/) or the .tar.gz
    download: bool = True  # fetch through torchvision when the files are missing (needs internet)
    hflip: bool = True  # random horizontal flips in training, as in EDM and py-meanflow
    class_conditional: bool = True  # keep the labels; false: all labels 0 and num_classes 0


def _cifar(cls, cfg: CIFARConfig, split: str, *, what: str, layout: str) -> TensorImages:
    raw = load_torchvision(cls, root=cfg.root, train=check_split(split) == "train", download=cfg.download,
                           what=what, layout=layout)
    images = torch.from_numpy(raw.data).permute(0, 3, 1, 2)  # torchvision keeps (N, H, W, C)
    labels = torch.as_tensor(raw.targets, dtype=torch.long)
    return TensorImages(images, labels, num_classes=len(raw.classes), hflip=cfg.hflip,
                        class_conditional=cfg.class_conditional, classes=raw.classes)


def cifar10(cfg: CIFARConfig, *, split: str) -> TensorImages:
    layout = ("ROOT/cifar-10-batches-py/ (data_batch_1 ... data_batch_5, test_batch, batches.meta: the "
              "extracted https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) or that archive at "
              "ROOT/cifar-10-python.tar.gz")
    return _cifar(datasets.CIFAR10, cfg, split, what="CIFAR-10", layout=layout)


def cifar100(cfg: CIFARConfig, *, split: str) -> TensorImages:
    layout = ("ROOT/cifar-100-python/ (train, test, meta: the extracted "
              "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz) or that archive at "
              "ROOT/cifar-100-python.tar.gz")
    return _cifar(datasets.CIFAR100, cfg, split, what="CIFAR-100", layout=layout)


COMPONENTS = {
    "cifar10": (cifar10, CIFARConfig, "CIFAR-10, 32x32 RGB, 10 classes (torchvision)"),
    "cifar100": (cifar100, CIFARConfig, "CIFAR-100, 32x32 RGB, 100 fine classes (torchvision)"),
}
