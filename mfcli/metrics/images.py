"""Image sets for evaluation: arrays, tensors, ``.npz`` files and folders, read in batches.

Conventions used across ``mfcli.metrics``:
  * numpy arrays are images as files store them: uint8, (N, H, W, C), C in {1, 3};
  * torch tensors are images as models take them: (N, C, H, W), uint8 in [0, 255]
    or (for classifiers only) float in [-1, 1].
Metrics on generated images take uint8 images, so the quantisation a sample went
through is fixed before evaluation (see ``images_to_uint8``) and a folder of PNGs
and the array it was written from give the same number.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import cache
from glob import escape, glob

import numpy as np
import torch
from PIL import Image

from mfcli.errors import MFError

# The extensions clean-fid looks for in a folder (cleanfid.utils.EXTENSIONS), kept here so
# that listing a folder does not import clean-fid; a test checks they agree.
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp", "npy", "JPEG", "JPG", "PNG")


def images_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Quantise model-space images to bytes: (N, C, H, W) float in [-1, 1] -> uint8 [0, 255].

    Rounds to the nearest level (``round((x + 1) * 127.5)``), the inverse of the
    ``u8 / 127.5 - 1`` used to feed images to models, so real images survive the
    round trip exactly.
    """
    return ((x.detach().float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def uint8_to_model(x: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, H, W, C) uint8 numpy or (B, C, H, W) uint8 tensor -> (B, C, H, W) float32 in [-1, 1]."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    return x.to(device=device, dtype=torch.float32) / 127.5 - 1.0


def _check_uint8_nhwc(x: np.ndarray, name: str) -> np.ndarray:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise MFError(
            f"The {name} must be uint8 images of shape (N, H, W, 1 or 3) as a numpy array (or (N, C, H, W) "
            f"as a torch tensor); got dtype {x.dtype} and shape {tuple(x.shape)}. Quantise float samples in "
            "[-1, 1] first with mfcli.metrics.images_to_uint8."
        )
    return x


class ImageSet:
    """A finite, ordered set of uint8 RGB images of one size.

    Build it with ``open_images``. ``batches`` yields (B, H, W, 3) uint8 numpy arrays;
    ``clean_fid_dataset`` wraps the same images for clean-fid's resizing pipeline.
    """

    def __init__(self, *, array: np.ndarray | None = None, files: list[str] | None = None, description: str = ""):
        self._array, self._files, self.description = array, files, description

    def __len__(self) -> int:
        return len(self._array) if self._array is not None else len(self._files)

    def _load(self, i: int) -> np.ndarray:
        """Image i as (H, W, 3) uint8."""
        if self._array is not None:
            img = np.asarray(self._array[i])
            return np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img
        path = self._files[i]
        if path.endswith(".npy"):
            img = np.load(path, allow_pickle=False)
            return _check_uint8_nhwc(img[None], f"image {path}")[0]
        try:
            with Image.open(path) as im:
                return np.array(im.convert("RGB"))  # what clean-fid does to every file
        except Exception as e:
            raise MFError(f"Could not read the image {path} ({type(e).__name__}: {e}).") from None

    def image_size(self) -> tuple[int, int]:
        """(H, W) of the first image."""
        return tuple(self._load(0).shape[:2])

    def batches(self, batch_size: int, num: int | None = None) -> Iterator[np.ndarray]:
        """Yield (B, H, W, 3) uint8 arrays over the first ``num`` images (all by default)."""
        n = len(self) if num is None else min(num, len(self))
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            if self._array is not None:
                batch = np.asarray(self._array[start:stop])
                yield np.repeat(batch, 3, axis=-1) if batch.shape[-1] == 1 else batch
            else:
                imgs = [self._load(i) for i in range(start, stop)]
                if len({im.shape for im in imgs}) != 1:
                    raise MFError(f"The images in {self.description} do not all have the same size.")
                yield np.stack(imgs)

    def clean_fid_dataset(self, mode: str, num: int | None = None) -> torch.utils.data.Dataset:
        """The first ``num`` images as clean-fid's ``ResizeDataset`` for ``mode``: items (3, S, S) float in [0, 255]."""
        from cleanfid.utils import ResizeDataset

        n = len(self) if num is None else min(num, len(self))
        if self._files is not None:
            return ResizeDataset(self._files[:n], mode=mode)  # clean-fid's own file loading
        return _array_resize_dataset_cls()(self._array[:n], mode)


@cache
def _array_resize_dataset_cls():
    from cleanfid.utils import ResizeDataset

    class ArrayResizeDataset(ResizeDataset):
        """clean-fid's ResizeDataset, reading rows of a uint8 array instead of image files."""

        def __init__(self, array: np.ndarray, mode: str):
            super().__init__(files=array, mode=mode)

        def __getitem__(self, i):
            img = np.asarray(self.files[i])
            if img.shape[-1] == 1:
                img = np.repeat(img, 3, axis=-1)
            resized = self.fn_resize(self.custom_image_tranform(img))
            # Same conversion as ResizeDataset: uint8 results are rescaled by ToTensor, floats are not.
            if resized.dtype == np.uint8:
                return self.transforms(np.array(resized)) * 255
            return self.transforms(resized)

    return ArrayResizeDataset


def list_image_files(folder: str) -> list[str]:
    """Image files under ``folder`` (recursively), sorted, as clean-fid lists them."""
    files = {f for ext in IMAGE_EXTENSIONS for f in glob(os.path.join(escape(folder), f"**/*.{ext}"), recursive=True)}
    return sorted(files)


def _load_npz_images(path: str) -> np.ndarray:
    key = None
    if not os.path.exists(path) and ":" in path:
        path, key = path.rsplit(":", 1)
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:
        raise MFError(f"Could not read the image file {path} ({type(e).__name__}: {e}).") from None
    if isinstance(data, np.ndarray):  # .npy
        return data
    with data:
        if key is not None:
            if key not in data.files:
                raise MFError(f"{path} has no array named {key!r}; it has {sorted(data.files)}.")
            return data[key]
        candidates = [k for k in data.files if data[k].ndim == 4]
        if len(candidates) != 1:
            raise MFError(
                f"{path} holds {len(candidates)} image arrays ({sorted(candidates)}); name the one to use "
                f"as '{path}:<key>'."
            )
        return data[candidates[0]]


def open_images(source, *, name: str = "images") -> ImageSet:
    """Open images for evaluation.

    Args:
        source: a uint8 numpy array (N, H, W, C); a uint8 torch tensor (N, C, H, W);
            a folder of image files (searched recursively, sorted by path); or an
            ``.npz``/``.npy`` file of one uint8 (N, H, W, C) array (``file.npz:key``
            picks one array of several).
        name: what the images are, for error messages ("samples", "reference").
    """
    if isinstance(source, ImageSet):
        return source
    if isinstance(source, torch.Tensor):
        if source.dtype != torch.uint8 or source.ndim != 4 or source.shape[1] not in (1, 3):
            raise MFError(
                f"The {name} tensor must be uint8 of shape (N, C, H, W) with C in (1, 3); got {source.dtype} "
                f"{tuple(source.shape)}. Quantise float samples in [-1, 1] with mfcli.metrics.images_to_uint8."
            )
        source = source.detach().cpu().permute(0, 2, 3, 1).numpy()
    if isinstance(source, np.ndarray):
        return ImageSet(array=_check_uint8_nhwc(source, name), description=f"the {name} array")
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            files = list_image_files(path)
            if not files:
                raise MFError(f"The {name} folder {path} contains no image files ({', '.join(IMAGE_EXTENSIONS[:9])}).")
            return ImageSet(files=files, description=path)
        if path.split(":")[0].endswith((".npz", ".npy")) or path.endswith((".npz", ".npy")):
            return ImageSet(array=_check_uint8_nhwc(_load_npz_images(path), name), description=path)
        raise MFError(f"The {name} path {path} is neither a folder of images nor an .npz/.npy image array.")
    raise MFError(f"Cannot read {name} from a {type(source).__name__}; give a uint8 array, a folder or an .npz file.")
