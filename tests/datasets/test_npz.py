"""npz: image arrays in any of the usual layouts, keys per split, and the real CIFAR-10 export."""

import numpy as np
import pytest
import torch

from mf_datasets.npz import NPZConfig, load_npz
from mfcli.errors import MFError


def save(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_real_cifar10_export_is_read_as_chw_with_its_labels(cifar10_npz):
    train = load_npz(NPZConfig(path=str(cifar10_npz), hflip=True), split="train")
    test = load_npz(NPZConfig(path=str(cifar10_npz)), split="test")
    assert (len(train), len(test)) == (50000, 10000)
    assert train.shape == (3, 32, 32) and train.num_classes == 10 and train.hflip
    images, labels = train.tensors()
    assert torch.bincount(labels).tolist() == [5000] * 10
    # The published per-channel means of the CIFAR-10 training set (R > G > B): a wrong
    # transpose would mix rows or columns into the channel axis and break them.
    means = images.double().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(means, torch.tensor([0.4914, 0.4822, 0.4465], dtype=torch.float64), atol=1e-3)
    with np.load(cifar10_npz) as arrays:
        assert torch.equal(test.tensors()[0][123], torch.from_numpy(arrays["x_test"][123]).permute(2, 0, 1))


@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "NHW"])
def test_layouts_are_detected(tmp_path, layout):
    rng = np.random.default_rng(0)
    chw = rng.integers(0, 256, (6, 3 if layout != "NHW" else 1, 5, 7), dtype=np.uint8)
    stored = {"NHWC": chw.transpose(0, 2, 3, 1), "NCHW": chw, "NHW": chw[:, 0]}[layout]
    path = save(tmp_path / "a.npz", x_train=stored, y_train=np.array([0, 1, 2, 0, 1, 2]))
    for declared in ("auto", layout):
        ds = load_npz(NPZConfig(path=path, layout=declared), split="train")
        assert ds.shape == chw.shape[1:]
        assert torch.equal(ds.tensors()[0], torch.from_numpy(chw))
        assert ds.num_classes == 3 and ds[4][1] == 1


def test_ambiguous_shapes_ask_for_the_layout(tmp_path):
    path = save(tmp_path / "a.npz", x_train=np.zeros((2, 3, 5, 3), np.uint8))
    with pytest.raises(MFError, match="data.layout"):
        load_npz(NPZConfig(path=path), split="train")
    assert load_npz(NPZConfig(path=path, layout="NCHW"), split="train").shape == (3, 5, 3)


def test_custom_keys_unlabelled_files_and_split_keys(tmp_path):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    path = save(tmp_path / "a.npz", images=images)
    ds = load_npz(NPZConfig(path=path, images_key="images"), split="train")
    assert ds.num_classes == 0 and ds[0][1] == 0 and len(ds) == 4
    with pytest.raises(MFError, match=r"no array 'x_test'.*images"):
        load_npz(NPZConfig(path=path), split="test")
    with pytest.raises(MFError, match="no array 'lbl'"):
        load_npz(NPZConfig(path=path, images_key="images", labels_key="lbl"), split="train")
    split_path = save(tmp_path / "b.npz", img_train=images, img_test=images[:2] + 9, cls_test=np.array([3, 1]))
    test = load_npz(NPZConfig(path=split_path, images_key="img_{split}", labels_key="cls_{split}", num_classes=5),
                    split="test")
    assert len(test) == 2 and test.num_classes == 5 and test[0][1] == 3
    assert int(test.tensors()[0].max()) == 9


def test_bad_files_are_user_errors(tmp_path):
    with pytest.raises(MFError, match="data.path"):
        load_npz(NPZConfig(), split="train")
    with pytest.raises(MFError, match="No such"):
        load_npz(NPZConfig(path=str(tmp_path / "missing.npz")), split="train")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(MFError, match="not a readable"):
        load_npz(NPZConfig(path=str(tmp_path / "junk.npz")), split="train")
    floats = save(tmp_path / "f.npz", x_train=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(MFError, match="uint8"):
        load_npz(NPZConfig(path=floats), split="train")
    short = save(tmp_path / "s.npz", x_train=np.zeros((3, 5, 5, 3), np.uint8), y_train=np.array([0, 1]))
    with pytest.raises(MFError, match="3 integer labels"):
        load_npz(NPZConfig(path=short), split="train")
    pickled = tmp_path / "p.npz"
    np.savez(pickled, x_train=np.array([{"a": 1}], dtype=object))
    with pytest.raises(MFError, match="plain numeric array"):
        load_npz(NPZConfig(path=str(pickled)), split="train")
