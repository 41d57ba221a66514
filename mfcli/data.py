"""Data loaders of the training engine: infinite, sharded across ranks, resumable batch for batch.

Two paths share one definition of an epoch (DESIGN §5, "small datasets live on the GPU"):

* ``DeviceLoader`` holds the whole split on the device (uint8 images or float points) and
  builds each batch there: an index gather, a horizontal flip and the conversion to
  float in [-1, 1]. No worker processes, no host-to-device copy per step.
* ``StreamLoader`` reads items through a ``torch.utils.data.DataLoader`` with workers and
  pinned memory, for datasets too large for the device.

An epoch is planned from ``(seed, epoch)`` alone: a permutation of the N samples and one
flip bit per position, drawn on the CPU from a private ``torch.Generator`` so that every
rank and every device type gets the same plan. The permutation is cut into global batches
of ``batch_size`` samples (the tail that does not fill a global batch is dropped); rank r
takes the r-th slice of ``batch_size // world_size`` samples of each global batch. The
union of the ranks' batches is therefore exactly the single-process batch, flips included,
and a run can resume under another world size as long as the global batch size is kept.

``state_dict()`` records the epoch and the number of global batches consumed in it; after
``load_state_dict()`` the next batch is exactly the one the saved loader would have
produced next (bit-identical on CPU). ``StreamLoader`` resumes the same way: its sampler
starts at the saved position, so the consumed batches are skipped without being read.
"""

from __future__ import annotations

import hashlib
import math
import weakref
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mfcli.errors import MFError

DEFAULT_MAX_DEVICE_BYTES = 2 * 1024**3  # above this a split is streamed, not held on the device


def images_uint8_to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels in [0, 255] -> float32 in [-1, 1]; 0 -> -1 and 255 -> 1 exactly.

    Dividing by 127.5 (exactly representable) keeps both ends exact, which ``x * (2/255) - 1``
    does not. Datasets and loaders share this function so both paths give identical values.
    """
    return x.to(torch.float32).div_(127.5).sub_(1.0)


def _epoch_seed(seed: int, epoch: int) -> int:
    # A hash rather than seed + epoch, so that (seed=0, epoch=1) and (seed=1, epoch=0)
    # do not replay the same order.
    digest = hashlib.sha256(f"mf-data:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_plan(seed: int, epoch: int, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The order and the flips of one epoch, identical on every rank and device.

    Returns:
        perm: (N,) long, the sample index at each position of the epoch.
        flip: (N,) bool, whether the sample at that position is mirrored (p = 0.5).
    """
    gen = torch.Generator(device="cpu").manual_seed(_epoch_seed(seed, epoch))
    perm = torch.randperm(num_samples, generator=gen)
    # Drawn after the permutation, so hflip on/off leaves the order unchanged.
    flip = torch.rand(num_samples, generator=gen) < 0.5
    return perm, flip


def flip_where(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    # torch.where instead of boolean indexing: no host sync on CUDA (nonzero would sync).
    return torch.where(flip.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)


class _EpochLoader:
    """Bookkeeping common to both loaders: epoch plan, rank slice, position, state."""

    def __init__(self, num_samples: int, *, batch_size: int, seed: int, rank: int, world_size: int, hflip: bool):
        if world_size < 1 or not 0 <= rank < world_size:
            raise MFError(f"rank {rank} is not in [0, world_size={world_size}).")
        if batch_size < 1 or batch_size % world_size:
            raise MFError(
                f"batch_size {batch_size} (the global batch) must be a positive multiple of the "
                f"{world_size} processes, so that every rank gets the same number of samples."
            )
        if num_samples < batch_size:
            raise MFError(
                f"The dataset has {num_samples} samples, fewer than one batch of {batch_size}; "
                "lower data.batch_size or use a larger dataset."
            )
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.hflip = rank, world_size, hflip
        self.local_batch_size = batch_size // world_size
        self.steps_per_epoch = num_samples // batch_size  # drop_last: the tail waits for the next epoch
        self.epoch, self.position = 0, 0  # position = global batches consumed in this epoch
        self._plan_epoch: int | None = None

    def _plan(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._plan_epoch != self.epoch:
            self._perm, self._flip = epoch_plan(self.seed, self.epoch, self.num_samples)
            self._plan_epoch = self.epoch
            self._on_new_plan()
        return self._perm, self._flip

    def _on_new_plan(self) -> None:
        pass

    def _slice(self, step: int) -> slice:
        start = step * self.batch_size + self.rank * self.local_batch_size
        return slice(start, start + self.local_batch_size)

    def _advance(self) -> None:
        self.position += 1
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0

    def __iter__(self):
        return self

    def __len__(self) -> int:
        """Batches per epoch (the iterator itself never ends)."""
        return self.steps_per_epoch

    def state_dict(self) -> dict[str, int]:
        """Plain ints, so a checkpoint holding it loads with ``torch.load(weights_only=True)``."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "num_samples", "batch_size"):
            if int(state[key]) != getattr(self, key):
                raise MFError(
                    f"Cannot resume the data order: the checkpoint has {key}={int(state[key])}, this run "
                    f"has {getattr(self, key)}. Resume with the same dataset, seed and global batch size."
                )
        if not 0 <= int(state["position"]) < self.steps_per_epoch:
            raise MFError(f"Data loader state has position {state['position']} outside one epoch.")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class DeviceLoader(_EpochLoader):
    """The whole split on the device; batches gathered, flipped and converted there.

    Args:
        data: (N, C, H, W) uint8 images, or (N, ...) float data (2-D points, latents), kept as is.
        labels: (N,) long class labels, or None (every label is 0).
        batch_size: the global batch size; each rank yields ``batch_size // world_size`` samples.
        device: where the data lives and the batches are made.
        hflip: mirror each image along its width with probability 0.5.
        seed: the data-order seed; the same on every rank.
        rank, world_size: this process's share of each global batch.

    Yields ``(x, y)``: x (b, C, H, W) float32 in [-1, 1] (or float data), y (b,) long.
    """

    def __init__(
        self,
        data: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        batch_size: int,
        device: torch.device | str = "cpu",
        hflip: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(len(data), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, hflip=hflip)
        if data.dtype != torch.uint8 and not data.is_floating_point():
            raise MFError(f"DeviceLoader takes uint8 images or float data, got {data.dtype}.")
        if hflip and data.dim() < 3:
            raise MFError("hflip applies to images; this dataset holds points or vectors.")
        if labels is not None and len(labels) != len(data):
            raise MFError(f"{len(labels)} labels for {len(data)} samples.")
        self.device = torch.device(device)
        self.data = data.to(self.device)
        if labels is None:
            labels = torch.zeros(len(data), dtype=torch.long)
        self.labels = labels.to(self.device, torch.long)

    def _on_new_plan(self) -> None:
        # Once per epoch: the plan goes to the device, so the per-step work is sync-free.
        self._perm_dev = self._perm.to(self.device, non_blocking=True)
        self._flip_dev = self._flip.to(self.device, non_blocking=True)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._plan()
        positions = self._slice(self.position)
        index = self._perm_dev[positions]
        x, y = self.data[index], self.labels[index]
        if self.hflip:
            x = flip_where(x, self._flip_dev[positions])  # on uint8: a quarter of the bytes
        x = images_uint8_to_float(x) if x.dtype == torch.uint8 else x.to(torch.float32)
        self._advance()
        return x, y


class _RankBatchSampler(Sampler[list[int]]):
    """This rank's index lists for one epoch, from the loader's current (epoch, position).

    It is iterated in the main process (workers only receive index lists), so setting the
    loader's epoch and position before ``iter(dataloader)`` is enough to resume.
    """

    def __init__(self, loader: StreamLoader):
        # Held weakly here and not at all by the epoch's iterator: a cycle through the
        # DataLoader's iterator would leave the workers to the cyclic garbage collector,
        # whose shutdown of them stalls for seconds.
        self._loader = weakref.ref(loader)

    @property
    def loader(self) -> StreamLoader:
        return self._loader()

    def __iter__(self):
        loader = self.loader
        perm, _ = loader._plan()
        slices = [loader._slice(step) for step in range(loader.position, loader.steps_per_epoch)]
        return (perm[where].tolist() for where in slices)

    def __len__(self) -> int:
        return self.loader.steps_per_epoch - self.loader.position


class StreamLoader(_EpochLoader):
    """Items read by DataLoader workers, for splits too large to hold on the device.

    Same order, flips, sharding and state as ``DeviceLoader`` (with the same seed both yield
    the same batches). Flips are applied to the collated batch on the device, from the
    epoch plan, so they do not depend on which worker read an item. Resuming restarts the
    saved epoch's sampler at the saved position: consumed batches are skipped unread.

    Args:
        dataset: items ``(x, y)`` with x float (C, H, W) in [-1, 1] (or float data) and y an int.
        num_workers: DataLoader worker processes (0 reads in the main process).
        Others as in ``DeviceLoader``.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        batch_size: int,
        device: torch.device | str = "cpu",
        hflip: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 4,
    ):
        super().__init__(len(dataset), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size, hflip=hflip)
        self.device = torch.device(device)
        self.dataset = dataset
        self._loader = DataLoader(
            dataset,
            batch_sampler=_RankBatchSampler(self),
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,  # no worker start-up at every epoch
            prefetch_factor=4 if num_workers > 0 else None,
        )
        self._batches = None

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._batches is None:
            self._batches = iter(self._loader)
        x, y = next(self._batches)
        _, flip = self._plan()
        positions = self._slice(self.position)
        x = x.to(self.device, torch.float32, non_blocking=True)
        y = torch.as_tensor(y).to(self.device, torch.long, non_blocking=True)
        if self.hflip:
            x = flip_where(x, flip[positions].to(self.device, non_blocking=True))
        self._advance()
        if self.position == 0:  # the epoch's sampler is exhausted; the next one starts fresh
            self._batches = None
        return x, y

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._batches = None  # prefetched batches belong to the old position

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is garbage)."""
        self._batches = None
        iterator = getattr(self._loader, "_iterator", None)  # persistent workers live here
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._loader._iterator = None


def _estimated_bytes(dataset: Dataset) -> int:
    # Estimated without calling tensors(), which may decode a whole folder of images:
    # images (C, H, W) are held as uint8, anything else as float32.
    shape = tuple(getattr(dataset, "shape", ()))
    bytes_per_value = 1 if len(shape) == 3 else 4
    return len(dataset) * math.prod(shape) * bytes_per_value


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    on_device: bool | Literal["auto", "yes", "no"] = "auto",
    num_workers: int = 4,
    hflip: bool | None = None,
    max_device_bytes: int = DEFAULT_MAX_DEVICE_BYTES,
) -> DeviceLoader | StreamLoader:
    """The loader the engine trains from: on the device when the split is small, else streamed.

    Args:
        dataset: a dataset of the ``mfcli.api`` shape. On-device needs its ``tensors()``.
        batch_size: global batch size, split evenly across ``world_size`` ranks.
        on_device: ``"auto"`` holds the split on the device when the dataset provides
            ``tensors()`` and the split takes at most ``max_device_bytes`` (and, on CUDA, at
            most a quarter of the free memory); ``True``/``"yes"`` insists, ``False``/``"no"`` streams.
        hflip: random horizontal flips; None takes the dataset's own ``hflip`` attribute.
        num_workers: DataLoader workers when streaming.
    """
    device = torch.device(device)
    if hflip is None:
        hflip = bool(getattr(dataset, "hflip", False))
    choice = {"yes": True, "no": False}.get(on_device, on_device) if isinstance(on_device, str) else on_device
    if choice not in (True, False, "auto"):
        raise MFError(f"on_device must be 'auto', 'yes' or 'no', got {on_device!r}.")
    has_tensors = callable(getattr(dataset, "tensors", None))
    if choice is True and not has_tensors:
        raise MFError(
            f"on_device is 'yes' but the dataset {type(dataset).__name__} cannot give its split as "
            "tensors (no tensors() method); use on_device = 'auto' or 'no'."
        )
    if choice == "auto":
        limit = max_device_bytes
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            limit = min(limit, free // 4)  # leave the rest to the model, activations and JVPs
        choice = has_tensors and _estimated_bytes(dataset) <= limit
    common = dict(batch_size=batch_size, device=device, hflip=hflip, seed=seed, rank=rank, world_size=world_size)
    if choice:
        data, labels = dataset.tensors()
        return DeviceLoader(data, labels, **common)
    return StreamLoader(dataset, num_workers=num_workers, **common)
