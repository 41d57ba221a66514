"""A folder of images: class subfolders give labels, a flat folder is unlabelled.

Layouts (ROOT = data.root)::

    ROOT/train/<class>/*.png  and  ROOT/test/<class>/*.png     two splits, labelled
    ROOT/<class>/*.png                                         train split only, labelled
    ROOT/*.png  (or ROOT/train/*.png, ROOT/test/*.png)         unlabelled

Labels number the class folders of the train split in sorted order, so both splits agree.
Images are resized (shorter side to ``resolution``, bicubic, antialiased) and center-cropped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from mf_datasets._images import SPLITS, check_split
from mfcli.data import images_uint8_to_float
from mfcli.errors import MFError

PARALLEL_DECODE_MIN = 1024  # below this, starting decode processes costs more than it saves
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class ImageFolderConfig:
    root: str = ""  # the folder; see the module docstring for the layouts
    resolution: int = 64  # side of the square images; 0 keeps the files' size (all must match)
    channels: Literal[1, 3] = 3  # 3: RGB, 1: greyscale
    hflip: bool = False  # random horizontal flips in training (usual for faces and natural images)
    class_conditional: bool = True  # keep the labels; false: all labels 0 and num_classes 0
    decode_workers: int = 0  # processes decoding the folder when it is held on the device; 0: up to 8


def _is_image(name: str) -> bool:
    return name.lower().endswith(EXTENSIONS) and not name.startswith(".")


def _images_under(folder: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f)]
    return found


def _subfolders(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _top_level_images(folder: str) -> list[str]:
    return sorted(os.path.join(folder, e.name) for e in os.scandir(folder) if e.is_file() and _is_image(e.name))


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """Scale the shorter side to ``resolution`` (PIL bicubic filters over the whole footprint
    when shrinking, so no aliasing), then cut the central square."""
    w, h = image.size
    scale = resolution / min(w, h)
    if scale != 1:
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


class ImageFolder(Dataset):
    """Items ``(x, y)``: x (C, R, R) float32 in [-1, 1], y the class index (0 when unlabelled)."""

    def __init__(self, cfg: ImageFolderConfig, *, split: str):
        split = check_split(split)
        if not cfg.root:
            raise MFError("The imagefolder dataset needs data.root, a folder of images or of class subfolders.")
        if cfg.resolution < 0:
            raise MFError(f"data.resolution = {cfg.resolution}; use a positive size, or 0 to keep the files' size.")
        root = os.path.abspath(os.path.expanduser(cfg.root))
        if not os.path.isdir(root):
            raise MFError(f"No such folder: {root}. Set data.root to a folder of images or of class subfolders.")
        has_split_dirs = any(os.path.isdir(os.path.join(root, s)) for s in SPLITS)
        train_dir = os.path.join(root, "train") if has_split_dirs else root
        folder = os.path.join(root, split) if has_split_dirs else root
        if split == "test" and not has_split_dirs:
            raise MFError(f"{root} has no test split. Put training images in {root}/train/ and test images in "
                          f"{root}/test/ (each with the same class subfolders, or flat).")
        if not os.path.isdir(folder):
            raise MFError(f"{root} has no {split} split: {folder} is missing.")

        # The train split names the classes, so that both splits number them alike.
        classes = _subfolders(train_dir if os.path.isdir(train_dir) else folder)
        if classes:
            if _top_level_images(folder):
                raise MFError(f"{folder} holds both images and subfolders; put every image in a class subfolder, "
                              "or use a flat folder for unlabelled data.")
            unknown = sorted(set(_subfolders(folder)) - set(classes))
            if unknown:
                raise MFError(f"{folder} has class folders {unknown} that the train split lacks.")
            files, labels = [], []
            for index, name in enumerate(classes):
                class_dir = os.path.join(folder, name)
                found = _images_under(class_dir) if os.path.isdir(class_dir) else []
                files += found
                labels += [index] * len(found)
        else:
            files, labels = _top_level_images(folder), []
        if not files:
            raise MFError(f"No images ({', '.join(EXTENSIONS)}) in {folder}.")

        self.files, self.root, self.split = files, root, split
        self.resolution, self.mode, self.decode_workers = cfg.resolution, "L" if cfg.channels == 1 else "RGB", cfg.decode_workers
        self.hflip = cfg.hflip
        labelled = bool(classes) and cfg.class_conditional
        self.classes = tuple(classes) if labelled else ()
        self.num_classes = len(self.classes)
        self.labels = torch.tensor(labels, dtype=torch.long) if labelled else torch.zeros(len(files), dtype=torch.long)
        if self.resolution:
            side = (self.resolution, self.resolution)
        else:
            with Image.open(files[0]) as first:  # reads the header only
                side = first.size[::-1]
        self.shape = (cfg.channels, *side)
        self._images: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, index: int) -> torch.Tensor:
        """Image ``index`` as (C, R, R) uint8."""
        path = self.files[index]
        try:
            with Image.open(path) as image:
                image = image.convert(self.mode)
        except (UnidentifiedImageError, OSError) as err:
            raise MFError(f"Cannot read image {path} ({err}); remove it or replace it.") from err
        if self.resolution:
            image = resize_center_crop(image, self.resolution)
        elif image.size[::-1] != self.shape[1:]:
            raise MFError(f"{path} is {image.size[0]}x{image.size[1]} but the first image is "
                          f"{self.shape[2]}x{self.shape[1]}; set data.resolution to resize them all.")
        array = np.asarray(image, dtype=np.uint8).reshape(image.size[1], image.size[0], -1)
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self._images[index] if self._images is not None else self.decode(index)
        return images_uint8_to_float(image), int(self.labels[index])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode the whole split once (in worker processes when it is large) into (N, C, R, R) uint8."""
        if self._images is None:
            workers = self.decode_workers or min(8, os.cpu_count() or 1)
            if len(self) < PARALLEL_DECODE_MIN:
                workers = 0
            loader = DataLoader(_Decoded(self), batch_size=256, num_workers=workers, collate_fn=torch.stack)
            self._images = torch.cat(list(loader))
        return self._images, self.labels


class _Decoded(Dataset):
    def __init__(self, folder: ImageFolder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.folder.decode(index)


def image_folder(cfg: ImageFolderConfig, *, split: str) -> ImageFolder:
    return ImageFolder(cfg, split=split)


COMPONENTS = {"imagefolder": (image_folder, ImageFolderConfig, "a folder of images; class subfolders give labels")}
