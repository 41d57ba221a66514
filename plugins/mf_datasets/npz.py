"""Image arrays from a NumPy ``.npz`` file (``np.savez``), e.g. a CIFAR-10 export without the batch files."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from mf_datasets._images import TensorImages, check_split
from mfcli.errors import MFError

CHANNELS = (1, 3, 4)  # grey, RGB, RGBA: what a channel axis can hold


@dataclass
class NPZConfig:
    path: str = ""  # the .npz file
    images_key: str = "x_{split}"  # uint8 image array; "{split}" becomes train or test
    labels_key: str = "y_{split}"  # integer labels; if the default is absent the split is unlabelled; "" ignores labels
    layout: Literal["auto", "NHWC", "NCHW", "NHW"] = "auto"  # auto: the axis of size 1, 3 or 4 holds channels
    num_classes: int = 0  # 0: the largest label + 1
    hflip: bool = False  # random horizontal flips in training (true for natural images such as CIFAR)
    class_conditional: bool = True  # keep the labels; false: all labels 0 and num_classes 0


def _layout(shape: tuple[int, ...], layout: str, where: str) -> str:
    if layout != "auto":
        expected_dims = 3 if layout == "NHW" else 4
        if len(shape) != expected_dims:
            raise MFError(f"{where} has shape {shape}, which is not {layout}.")
        return layout
    if len(shape) == 3:
        return "NHW"
    if len(shape) == 4:
        last, second = shape[-1] in CHANNELS, shape[1] in CHANNELS
        if last != second:
            return "NHWC" if last else "NCHW"
    raise MFError(f"{where} has shape {shape}; cannot tell where the channels are. Set data.layout to "
                  "NHWC, NCHW or NHW.")


def load_npz(cfg: NPZConfig, *, split: str) -> TensorImages:
    split = check_split(split)
    if not cfg.path:
        raise MFError("The npz dataset needs data.path, the .npz file with the image arrays.")
    path = os.path.abspath(os.path.expanduser(cfg.path))
    if not os.path.isfile(path):
        raise MFError(f"No such .npz file: {path}. Set data.path to a file written by numpy.savez "
                      "with uint8 images under x_train / x_test and labels under y_train / y_test.")
    try:
        arrays = np.load(path, allow_pickle=False)  # never unpickle: a data file must not run code
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise MFError(f"{path} is not a readable .npz file ({err}).") from err

    def read(key: str) -> np.ndarray:
        try:
            return arrays[key]
        except (ValueError, OSError, zipfile.BadZipFile) as err:  # object arrays, truncated members
            raise MFError(f"Cannot read {path}[{key!r}] ({err}); it must be a plain numeric array.") from err

    with arrays:
        keys = sorted(arrays.files)
        images_key = cfg.images_key.replace("{split}", split)
        if images_key not in keys:
            raise MFError(f"{path} has no array {images_key!r} for the {split} split; it holds {', '.join(keys)}. "
                          "Set data.images_key (\"{split}\" in it becomes train or test).")
        images = read(images_key)
        labels_key = cfg.labels_key.replace("{split}", split)
        if labels_key and labels_key in keys:
            labels = read(labels_key)
        elif labels_key and cfg.labels_key != NPZConfig.labels_key:
            raise MFError(f"{path} has no array {labels_key!r}; it holds {', '.join(keys)}. Set data.labels_key, "
                          "or \"\" for an unlabelled split.")
        else:
            labels = None
    where = f"{path}[{images_key!r}]"
    if images.dtype != np.uint8:
        raise MFError(f"{where} is {images.dtype}; the npz dataset reads uint8 pixels in [0, 255]. "
                      "Convert it with (x * 255).round().astype(np.uint8) or similar.")
    layout = _layout(images.shape, cfg.layout, where)
    tensor = torch.from_numpy(images)
    tensor = {"NHW": lambda t: t.unsqueeze(1), "NHWC": lambda t: t.permute(0, 3, 1, 2), "NCHW": lambda t: t}[layout](tensor)
    if labels is not None:
        if labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
            raise MFError(f"{path}[{labels_key!r}] must be {len(images)} integer labels, "
                          f"got {labels.dtype} of shape {labels.shape}.")
        labels = torch.from_numpy(labels.astype(np.int64))
    num_classes = cfg.num_classes or (int(labels.max()) + 1 if labels is not None and len(labels) else 0)
    return TensorImages(tensor.contiguous(), labels, num_classes=num_classes, hflip=cfg.hflip,
                        class_conditional=cfg.class_conditional)


COMPONENTS = {"npz": (load_npz, NPZConfig, "uint8 image arrays (and labels) from a NumPy .npz file")}
