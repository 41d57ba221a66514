"""An image split held in memory as uint8, the shape every built-in image dataset takes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from mfcli.data import images_uint8_to_float
from mfcli.errors import MFError

SPLITS = ("train", "test")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise MFError(f"Unknown split {split!r}; expected one of {', '.join(SPLITS)}.")
    return split


class TensorImages(Dataset):
    """Items ``(x, y)``: x (C, H, W) float32 in [-1, 1], y an int label.

    The images stay uint8 (a quarter of the memory of float) and are converted per item;
    ``tensors()`` hands the uint8 split to the engine so it can live on the device.
    Augmentation is not applied here: ``hflip`` tells the loader to flip, which it does
    reproducibly from its own epoch plan (see ``mfcli.data``).

    Args:
        images: (N, C, H, W) uint8.
        labels: (N,) integer class labels, or None for an unlabelled split.
        num_classes: number of classes; 0 when unlabelled.
        hflip: whether training should mirror images horizontally at random.
        class_conditional: False drops the labels (all 0, ``num_classes`` 0) for unconditional models.
        classes: class names, index = label.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        *,
        num_classes: int,
        hflip: bool = False,
        class_conditional: bool = True,
        classes: Sequence[str] = (),
    ):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise MFError(f"Expected (N, C, H, W) uint8 images, got {images.dtype} of shape {tuple(images.shape)}.")
        if labels is None or not class_conditional:
            labels, num_classes, classes = None, 0, ()
        if labels is None:
            labels = torch.zeros(len(images), dtype=torch.long)
        if len(labels) != len(images):
            raise MFError(f"{len(labels)} labels for {len(images)} images.")
        labels = torch.as_tensor(labels, dtype=torch.long)
        if num_classes and len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < num_classes:
            raise MFError(f"Labels span [{int(labels.min())}, {int(labels.max())}], outside [0, {num_classes}).")
        self.images, self.labels = images.contiguous(), labels
        self.num_classes, self.hflip, self.classes = int(num_classes), bool(hflip), tuple(classes)
        self.shape = tuple(images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return images_uint8_to_float(self.images[index]), int(self.labels[index])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split: (N, C, H, W) uint8 images and (N,) long labels."""
        return self.images, self.labels
