"""Data loaders for the training engine (minimal on-device loader; extended by the datasets work)."""

from __future__ import annotations

import torch


class DeviceLoader:
    """The whole split on the device; per-epoch permutations from a seeded generator; resumable."""

    def __init__(self, data, labels, *, batch_size, device, hflip=False, seed=0, rank=0, world_size=1):
        self.data = data.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.device, self.hflip = batch_size, torch.device(device), hflip
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.pos = 0, 0
        self._perm = None

    def _epoch_perm(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(len(self.data), generator=g)
        per_rank = len(perm) // self.world_size
        return perm[self.rank * per_rank : (self.rank + 1) * per_rank]

    def __iter__(self):
        return self

    def __next__(self):
        if self._perm is None:
            self._perm = self._epoch_perm()
        if self.pos + self.batch_size > len(self._perm):
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._epoch_perm()
        idx = self._perm[self.pos : self.pos + self.batch_size].to(self.device)
        self.pos += self.batch_size
        x = self.data[idx]
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1.0
        return x, self.labels[idx]

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = None if self.pos == 0 else self._epoch_perm()


def make_loader(dataset, *, batch_size, device, seed=0, rank=0, world_size=1, on_device="auto", num_workers=0, hflip=False):
    data, labels = dataset.tensors()
    return DeviceLoader(data, labels, batch_size=batch_size, device=device, hflip=hflip, seed=seed, rank=rank, world_size=world_size)
