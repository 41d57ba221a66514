"""mfcli.data: the on-device and streaming loaders (order, sharding, flips, resume, the auto choice)."""

import gc
import weakref

import pytest
import torch
from torch.utils.data import Dataset

from mfcli.data import (
    DeviceLoader,
    StreamLoader,
    epoch_plan,
    images_uint8_to_float,
    make_loader,
)
from mfcli.errors import MFError


def tagged_images(n: int, c: int = 1, h: int = 3, w: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 images whose labels are their own indices, so a batch says which samples it holds."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, h, w), generator=gen, dtype=torch.uint8)
    # Make every image differ from its horizontal and vertical mirrors, so a flip is always visible.
    images[:, :, 0, 0], images[:, :, 0, -1], images[:, :, -1, 0] = 0, 255, 128
    return images, torch.arange(n)


def take(loader, k):
    return [next(loader) for _ in range(k)]


class Items(Dataset):
    """A dataset without tensors(): it can only be streamed."""

    def __init__(self, images, labels, hflip=False):
        self.images, self.labels, self.hflip = images, labels, hflip
        self.shape = tuple(images.shape[1:])
        self.num_classes = 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return images_uint8_to_float(self.images[i]), int(self.labels[i])


class Tensors(Items):
    def tensors(self):
        return self.images, self.labels


def test_conversion_is_exact_at_both_ends():
    x = images_uint8_to_float(torch.arange(256, dtype=torch.uint8))
    assert x.dtype == torch.float32
    assert x[0] == -1 and x[255] == 1 and x.min() >= -1 and x.max() <= 1
    assert torch.all(x[1:] > x[:-1])


def test_batches_have_the_contract_dtype_shape_and_range():
    images, labels = tagged_images(50, c=3, h=5, w=6)
    loader = DeviceLoader(images, labels, batch_size=8, hflip=True)
    for x, y in take(loader, 10):
        assert x.shape == (8, 3, 5, 6) and x.dtype == torch.float32
        assert y.shape == (8,) and y.dtype == torch.long
        assert x.min() >= -1 and x.max() <= 1
        assert len(loader) == 50 // 8


def test_each_epoch_is_a_fresh_permutation_with_drop_last():
    images, labels = tagged_images(37)
    loader = DeviceLoader(images, labels, batch_size=5)  # 7 batches per epoch, 2 samples dropped
    epochs = [torch.cat([y for _, y in take(loader, 7)]) for _ in range(3)]
    for seen in epochs:
        assert len(seen) == 35 and len(set(seen.tolist())) == 35
    assert not torch.equal(epochs[0], epochs[1])
    assert epochs[0].tolist() == epoch_plan(0, 0, 37)[0][:35].tolist()
    other_seed = DeviceLoader(images, labels, batch_size=5, seed=1)
    assert not torch.equal(torch.cat([y for _, y in take(other_seed, 7)]), epochs[0])


def test_items_are_the_stored_images_converted():
    images, labels = tagged_images(20)
    for x, y in take(DeviceLoader(images, labels, batch_size=4), 5):
        assert torch.equal(x, images_uint8_to_float(images[y]))


@pytest.mark.parametrize("stop", [7, 12, 13])  # mid-epoch, exactly at an epoch's end, just after
def test_resume_continues_with_identical_batches(stop):
    images, labels = tagged_images(103, c=3)
    straight = take(DeviceLoader(images, labels, batch_size=8, hflip=True, seed=5), 30)

    first = DeviceLoader(images, labels, batch_size=8, hflip=True, seed=5)
    head = take(first, stop)
    state = first.state_dict()
    resumed = DeviceLoader(images, labels, batch_size=8, hflip=True, seed=5)
    resumed.load_state_dict(state)
    tail = take(resumed, 30 - stop)
    for (x0, y0), (x1, y1) in zip(straight, head + tail, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_state_dict_survives_a_weights_only_checkpoint(tmp_path):
    images, labels = tagged_images(40)
    loader = DeviceLoader(images, labels, batch_size=4, hflip=True)
    take(loader, 13)
    torch.save({"data": loader.state_dict()}, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)["data"]
    assert state == {"epoch": 1, "position": 3, "seed": 0, "num_samples": 40, "batch_size": 4}
    resumed = DeviceLoader(images, labels, batch_size=4, hflip=True)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed)[0], next(loader)[0])


def test_resume_refuses_another_data_order():
    images, labels = tagged_images(40)
    state = DeviceLoader(images, labels, batch_size=4).state_dict()
    with pytest.raises(MFError, match="batch_size"):
        DeviceLoader(images, labels, batch_size=8).load_state_dict(state)
    with pytest.raises(MFError, match="num_samples"):
        DeviceLoader(images[:30], labels[:30], batch_size=4).load_state_dict(state)


def test_ranks_take_disjoint_slices_that_rebuild_the_single_process_batch():
    images, labels = tagged_images(100)
    world = 3
    single = take(DeviceLoader(images, labels, batch_size=12, hflip=True, seed=3), 16)  # 8 batches/epoch, 2 epochs
    ranks = [take(DeviceLoader(images, labels, batch_size=12, hflip=True, seed=3, rank=r, world_size=world), 16)
             for r in range(world)]
    for step, (x, y) in enumerate(single):
        parts = [ranks[r][step] for r in range(world)]
        assert all(p[1].shape == (4,) for p in parts)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)  # same samples, in rank order
        assert torch.equal(torch.cat([p[0] for p in parts]), x)  # and the same flips
    for epoch in range(2):
        seen = [torch.cat([ranks[r][s][1] for s in range(8 * epoch, 8 * epoch + 8)]) for r in range(world)]
        sets = [set(s.tolist()) for s in seen]
        assert all(len(s) == 32 for s in sets)
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
        perm = epoch_plan(3, epoch, 100)[0]
        assert set().union(*sets) == set(perm[:96].tolist())


def test_resume_under_another_world_size_keeps_the_global_batches():
    images, labels = tagged_images(64)
    single = DeviceLoader(images, labels, batch_size=8, hflip=True)
    take(single, 5)
    state = single.state_dict()
    halves = []
    for rank in range(2):
        loader = DeviceLoader(images, labels, batch_size=8, hflip=True, rank=rank, world_size=2)
        loader.load_state_dict(state)
        halves.append(next(loader))
    x, y = next(single)
    assert torch.equal(torch.cat([h[1] for h in halves]), y)
    assert torch.equal(torch.cat([h[0] for h in halves]), x)


def test_flips_happen_half_the_time_and_only_horizontally():
    images, labels = tagged_images(4000, h=2, w=3)
    loader = DeviceLoader(images, labels, batch_size=100, hflip=True, seed=11)
    flipped = 0
    for x, y in take(loader, 40):
        plain = images_uint8_to_float(images[y])
        mirrored = plain.flip(-1)
        is_plain = (x == plain).flatten(1).all(1)
        is_mirrored = (x == mirrored).flatten(1).all(1)
        assert torch.all(is_plain ^ is_mirrored)  # never vertical, never anything else
        flipped += int(is_mirrored.sum())
    # Binomial(4000, 0.5): the standard deviation is 32, so +-160 is 5 sigma.
    assert abs(flipped - 2000) < 160, flipped


def test_no_flips_without_hflip():
    images, labels = tagged_images(64)
    for x, y in take(DeviceLoader(images, labels, batch_size=16), 8):
        assert torch.equal(x, images_uint8_to_float(images[y]))


def test_points_pass_through_unchanged():
    points = torch.randn(30, 2)
    loader = DeviceLoader(points, None, batch_size=6)
    x, y = next(loader)
    assert x.dtype == torch.float32 and torch.equal(y, torch.zeros(6, dtype=torch.long))
    assert torch.equal(x, points[epoch_plan(0, 0, 30)[0][:6]])
    with pytest.raises(MFError, match="images"):
        DeviceLoader(points, None, batch_size=6, hflip=True)


def test_impossible_batch_sizes_are_user_errors():
    images, labels = tagged_images(10)
    with pytest.raises(MFError, match="multiple"):
        DeviceLoader(images, labels, batch_size=5, world_size=2)
    with pytest.raises(MFError, match="fewer than one batch"):
        DeviceLoader(images, labels, batch_size=16)


def test_stream_loader_yields_the_same_batches_as_the_device_loader():
    images, labels = tagged_images(45, c=3)
    device = take(DeviceLoader(images, labels, batch_size=6, hflip=True, seed=2, rank=1, world_size=2), 20)
    stream = take(StreamLoader(Items(images, labels), batch_size=6, hflip=True, seed=2, rank=1, world_size=2,
                               num_workers=0), 20)
    for (x0, y0), (x1, y1) in zip(device, stream, strict=True):
        assert torch.equal(y0, y1) and torch.equal(x0, x1)


def test_stream_loader_resumes_exactly_with_workers():
    images, labels = tagged_images(45, c=3)
    straight = take(StreamLoader(Items(images, labels), batch_size=4, hflip=True, num_workers=1), 16)
    first = StreamLoader(Items(images, labels), batch_size=4, hflip=True, num_workers=1)
    head = take(first, 6)
    resumed = StreamLoader(Items(images, labels), batch_size=4, hflip=True, num_workers=1)
    resumed.load_state_dict(first.state_dict())
    for (x0, y0), (x1, y1) in zip(straight, head + take(resumed, 10), strict=True):
        assert torch.equal(y0, y1) and torch.equal(x0, x1)
    # Rewinding a loader whose workers have already prefetched past the saved position.
    rewind = {**first.state_dict(), "position": 2}
    take(first, 3)
    first.load_state_dict(rewind)
    for (x0, y0), (x1, y1) in zip(straight[2:6], take(first, 4), strict=True):
        assert torch.equal(y0, y1) and torch.equal(x0, x1)
    first.close()  # stops the workers; the next batch starts new ones where it left off
    x, y = next(first)
    assert torch.equal(y, straight[6][1]) and torch.equal(x, straight[6][0])


def test_a_dropped_stream_loader_is_freed_at_once():
    # Without a reference cycle the workers stop when the last reference goes, instead of
    # waiting for the cyclic garbage collector (whose worker shutdown stalls for seconds).
    images, labels = tagged_images(45)
    loader = StreamLoader(Items(images, labels), batch_size=4, num_workers=1)
    take(loader, 3)
    ref = weakref.ref(loader)
    gc.disable()
    try:
        del loader
        assert ref() is None
    finally:
        gc.enable()


def test_make_loader_holds_small_splits_on_the_device_and_streams_the_rest():
    images, labels = tagged_images(40, c=3, h=4, w=4)  # 40 * 48 = 1920 bytes
    small = Tensors(images, labels, hflip=True)
    loader = make_loader(small, batch_size=8)
    assert isinstance(loader, DeviceLoader) and loader.hflip  # hflip comes from the dataset
    assert isinstance(make_loader(small, batch_size=8, max_device_bytes=1919, num_workers=0), StreamLoader)
    assert isinstance(make_loader(small, batch_size=8, max_device_bytes=1920), DeviceLoader)
    assert isinstance(make_loader(small, batch_size=8, on_device="no", num_workers=0), StreamLoader)
    assert isinstance(make_loader(small, batch_size=8, on_device=True, max_device_bytes=0), DeviceLoader)
    assert not make_loader(small, batch_size=8, hflip=False).hflip
    items_only = Items(images, labels)
    assert isinstance(make_loader(items_only, batch_size=8, num_workers=0), StreamLoader)
    with pytest.raises(MFError, match="tensors"):
        make_loader(items_only, batch_size=8, on_device="yes")
    with pytest.raises(MFError, match="on_device"):
        make_loader(small, batch_size=8, on_device="maybe")
