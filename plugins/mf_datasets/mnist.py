"""MNIST and Fashion-MNIST through torchvision, 28x28 grey, optionally padded (32x32 suits UNets)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torchvision import datasets

from mf_datasets._images import TensorImages, check_split
from mf_datasets._torchvision import load_torchvision
from mfcli.errors import MFError

IDX_FILES = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"


@dataclass
class MNISTConfig:
    root: str = "data"  # folder that holds MNIST/raw/ (FashionMNIST/raw/ for fashion-mnist)
    download: bool = True  # fetch through torchvision when the files are missing (needs internet)
    resolution: int = 28  # 28 keeps the originals; larger pads the border with background (32 for UNets)
    hflip: bool = False  # digits and garments are not mirror-symmetric
    class_conditional: bool = True  # keep the labels; false: all labels 0 and num_classes 0


def _mnist(cls, cfg: MNISTConfig, split: str, *, what: str) -> TensorImages:
    if cfg.resolution < 28:
        raise MFError(f"data.resolution = {cfg.resolution}: {what} is 28x28 and is only padded, never cropped; "
                      "use 28 or more (32 suits UNets).")
    folder = cls.__name__
    layout = f"ROOT/{folder}/raw/ ({IDX_FILES}; the .gz files as distributed work too)"
    raw = load_torchvision(cls, root=cfg.root, train=check_split(split) == "train", download=cfg.download,
                           what=what, layout=layout)
    images = raw.data.unsqueeze(1)  # (N, 1, 28, 28) uint8
    extra = cfg.resolution - 28
    if extra:
        # Background is 0 (black): padding with it leaves the digits' statistics unchanged.
        images = F.pad(images, (extra // 2, extra - extra // 2, extra // 2, extra - extra // 2), value=0)
    return TensorImages(images, raw.targets, num_classes=len(raw.classes), hflip=cfg.hflip,
                        class_conditional=cfg.class_conditional, classes=raw.classes)


def mnist(cfg: MNISTConfig, *, split: str) -> TensorImages:
    return _mnist(datasets.MNIST, cfg, split, what="MNIST")


def fashion_mnist(cfg: MNISTConfig, *, split: str) -> TensorImages:
    return _mnist(datasets.FashionMNIST, cfg, split, what="Fashion-MNIST")


COMPONENTS = {
    "mnist": (mnist, MNISTConfig, "MNIST digits, 28x28 grey (or padded), 10 classes (torchvision)"),
    "fashion-mnist": (fashion_mnist, MNISTConfig, "Fashion-MNIST, 28x28 grey (or padded), 10 classes (torchvision)"),
}
