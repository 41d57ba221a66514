"""imagefolder: labels from class folders, splits, resize + center crop, and the error messages."""

import numpy as np
import pytest
import torch
from PIL import Image

import mf_datasets.imagefolder as imagefolder_module
from mf_datasets.imagefolder import ImageFolderConfig, image_folder
from mfcli.data import DeviceLoader, images_uint8_to_float, make_loader
from mfcli.errors import MFError


def write_image(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def solid(h, w, rgb):
    return np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3))


def three_stripes(h, w):
    """Red | green | blue thirds, side by side: a center crop of a wide image is all green."""
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 3, 0] = 255
    image[:, w // 3 : 2 * w // 3, 1] = 255
    image[:, 2 * w // 3 :, 2] = 255
    return image


def test_class_subfolders_give_sorted_labels_and_both_splits_agree(tmp_path):
    colours = {"cat": (255, 0, 0), "dog": (0, 255, 0), "emu": (0, 0, 255)}
    for split, count in (("train", 3), ("test", 1)):
        for name, rgb in colours.items():
            if split == "test" and name == "dog":
                continue  # a class absent from the test split must not shift the others' labels
            for i in range(count):
                write_image(tmp_path / split / name / f"{i}.png", solid(10, 12, rgb))
    train = image_folder(ImageFolderConfig(root=str(tmp_path), resolution=8), split="train")
    test = image_folder(ImageFolderConfig(root=str(tmp_path), resolution=8), split="test")
    assert train.classes == ("cat", "dog", "emu") and train.num_classes == 3 and test.num_classes == 3
    assert len(train) == 9 and train.shape == (3, 8, 8)
    assert sorted(train.labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i in range(len(test)):
        x, y = test[i]
        assert x.shape == (3, 8, 8) and x.min() >= -1 and x.max() <= 1
        assert y == [0, 2][i]
        lit_channel = {0: 0, 2: 2}[y]  # cat is red, emu is blue
        assert torch.all(x[lit_channel] == 1) and torch.all(x[1] == -1)


def test_resize_keeps_the_aspect_and_crops_the_centre(tmp_path):
    write_image(tmp_path / "wide.png", three_stripes(30, 90))  # 90 wide: crop keeps the middle third
    write_image(tmp_path / "tall.png", three_stripes(30, 90).transpose(1, 0, 2).copy())  # stacked vertically
    ds = image_folder(ImageFolderConfig(root=str(tmp_path), resolution=16), split="train")
    assert ds.num_classes == 0 and ds.files[1].endswith("wide.png")
    wide = ds.decode(1)
    assert wide.shape == (3, 16, 16)
    assert wide[1, :, 2:-2].float().mean() > 250 and wide[0].float().mean() < 5 and wide[2].float().mean() < 5
    tall = ds.decode(0)
    assert tall[1, 2:-2, :].float().mean() > 250 and tall[0].float().mean() < 5


def test_flat_folder_is_unlabelled_and_tensors_match_items(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        write_image(tmp_path / f"{i:02d}.png", rng.integers(0, 256, (6, 6, 3)))
    ds = image_folder(ImageFolderConfig(root=str(tmp_path), resolution=0, hflip=True), split="train")
    images, labels = ds.tensors()
    assert images.shape == (5, 3, 6, 6) and images.dtype == torch.uint8 and labels.tolist() == [0] * 5
    stored = np.array(Image.open(tmp_path / "03.png"))
    assert torch.equal(images[3], torch.from_numpy(stored).permute(2, 0, 1))
    assert torch.equal(ds[3][0], images_uint8_to_float(images[3]))
    loader = make_loader(ds, batch_size=4)
    assert isinstance(loader, DeviceLoader) and loader.hflip


def test_greyscale_and_unconditional(tmp_path):
    write_image(tmp_path / "a" / "0.png", solid(5, 5, (200, 200, 200)))
    write_image(tmp_path / "b" / "0.png", solid(5, 5, (10, 10, 10)))
    ds = image_folder(ImageFolderConfig(root=str(tmp_path), resolution=4, channels=1, class_conditional=False),
                      split="train")
    assert ds.shape == (1, 4, 4) and ds.num_classes == 0 and ds[1][1] == 0
    assert ds.tensors()[0].shape == (2, 1, 4, 4)


def test_folder_errors_say_what_to_do(tmp_path):
    with pytest.raises(MFError, match="data.root"):
        image_folder(ImageFolderConfig(), split="train")
    with pytest.raises(MFError, match="No such folder"):
        image_folder(ImageFolderConfig(root=str(tmp_path / "nope")), split="train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MFError, match="No images"):
        image_folder(ImageFolderConfig(root=str(tmp_path / "empty")), split="train")
    write_image(tmp_path / "flat" / "0.png", solid(4, 4, (1, 2, 3)))
    with pytest.raises(MFError, match="test"):
        image_folder(ImageFolderConfig(root=str(tmp_path / "flat")), split="test")
    write_image(tmp_path / "mixed" / "0.png", solid(4, 4, (1, 2, 3)))
    write_image(tmp_path / "mixed" / "cls" / "0.png", solid(4, 4, (1, 2, 3)))
    with pytest.raises(MFError, match="both images and subfolders"):
        image_folder(ImageFolderConfig(root=str(tmp_path / "mixed")), split="train")
    write_image(tmp_path / "sizes" / "0.png", solid(4, 4, (1, 2, 3)))
    write_image(tmp_path / "sizes" / "1.png", solid(5, 4, (1, 2, 3)))
    with pytest.raises(MFError, match="data.resolution"):
        image_folder(ImageFolderConfig(root=str(tmp_path / "sizes"), resolution=0), split="train").tensors()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "0.png").write_bytes(b"not a png")
    with pytest.raises(MFError, match="Cannot read image"):
        image_folder(ImageFolderConfig(root=str(tmp_path / "broken"), resolution=4), split="train")[0]


def test_large_folders_decode_in_worker_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(imagefolder_module, "PARALLEL_DECODE_MIN", 4)
    for i in range(6):
        write_image(tmp_path / f"{i}.png", solid(3, 3, (i, 2 * i, 3 * i)))
    ds = image_folder(ImageFolderConfig(root=str(tmp_path), resolution=0, decode_workers=2), split="train")
    images, _ = ds.tensors()
    assert images[:, :, 1, 1].tolist() == [[i, 2 * i, 3 * i] for i in range(6)]
