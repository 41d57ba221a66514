"""cifar10, cifar100, mnist, fashion-mnist: local files, the download path, and the missing-files message."""

import gzip
import pickle
import shutil
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
import torchvision.datasets.mnist as tv_mnist

from mf_datasets.cifar import CIFARConfig, cifar10, cifar100
from mf_datasets.mnist import MNISTConfig, fashion_mnist, mnist
from mfcli.data import images_uint8_to_float
from mfcli.errors import MFError

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def mnist_root(tmp_path, mnist_gz, folder="MNIST"):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        (raw / f"{name}.gz").symlink_to(mnist_gz / f"{name}.gz")
    return tmp_path


def test_mnist_reads_the_original_gz_files_offline(tmp_path, mnist_gz):
    root = mnist_root(tmp_path, mnist_gz)
    train = mnist(MNISTConfig(root=str(root), download=False), split="train")
    test = mnist(MNISTConfig(root=str(root), download=False), split="test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.shape == (1, 28, 28) and train.num_classes == 10 and train.classes[1] == "1 - one"
    images, labels = train.tensors()
    assert images.dtype == torch.uint8 and images.shape == (60000, 1, 28, 28)
    # Published class counts of the MNIST training set.
    assert torch.bincount(labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    x, y = test[0]
    assert y == 7 and x.shape == (1, 28, 28) and x.dtype == torch.float32  # the first test digit is a 7
    assert x.min() == -1 and x.max() == 1 and not train.hflip


def test_mnist_padded_to_32_keeps_the_digits_centred(tmp_path, mnist_gz):
    root = mnist_root(tmp_path, mnist_gz)
    plain = mnist(MNISTConfig(root=str(root), download=False), split="test")
    padded = mnist(MNISTConfig(root=str(root), download=False, resolution=32), split="test")
    assert padded.shape == (1, 32, 32)
    big, small = padded.tensors()[0], plain.tensors()[0]
    assert torch.equal(big[:, :, 2:30, 2:30], small)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert int(big[:, :, border].max()) == 0
    assert torch.equal(padded[3][0][:, 2:30, 2:30], images_uint8_to_float(small[3]))
    with pytest.raises(MFError, match="28 or more"):
        mnist(MNISTConfig(root=str(root), download=False, resolution=16), split="test")


def test_unconditional_drops_the_labels(tmp_path, mnist_gz):
    root = mnist_root(tmp_path, mnist_gz)
    ds = mnist(MNISTConfig(root=str(root), download=False, class_conditional=False), split="test")
    assert ds.num_classes == 0 and int(ds.tensors()[1].abs().sum()) == 0


def test_fashion_mnist_reads_extracted_idx_files(tmp_path, mnist_gz):
    # No Fashion-MNIST here: MNIST's own test files, extracted under the Fashion-MNIST names,
    # exercise the same reading path (torchvision only checks that extracted files exist).
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        if name.startswith("t10k"):
            with gzip.open(mnist_gz / f"{name}.gz") as src, open(raw / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            (raw / name).touch()  # present but unread: only the test split is loaded
    ds = fashion_mnist(MNISTConfig(root=str(tmp_path), download=False, resolution=32), split="test")
    assert len(ds) == 10000 and ds.shape == (1, 32, 32) and ds.classes[0] == "T-shirt/top"


@pytest.mark.parametrize(
    ("factory", "config", "where"),
    [
        (mnist, MNISTConfig, "MNIST/raw/"),
        (fashion_mnist, MNISTConfig, "FashionMNIST/raw/"),
        (cifar10, CIFARConfig, "cifar-10-batches-py/"),
        (cifar100, CIFARConfig, "cifar-100-python/"),
    ],
)
def test_missing_files_say_where_to_put_them(tmp_path, factory, config, where):
    with pytest.raises(MFError) as err:
        factory(config(root=str(tmp_path), download=False), split="train")
    message = str(err.value)
    assert f"ROOT/{where}" in message and str(tmp_path) in message and "data.download=true" in message


def test_a_failed_download_is_a_user_error_with_the_layout(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", offline)
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(MFError, match=r"ROOT/MNIST/raw/.*Fetching it failed"):
        mnist(MNISTConfig(root=str(tmp_path), download=True), split="test")
    with pytest.raises(MFError, match=r"cifar-10-python.tar.gz.*Fetching it failed.*no network"):
        cifar10(CIFARConfig(root=str(tmp_path), download=True), split="train")


def write_cifar_batches(folder, batches, label_key, meta_name, meta):
    """Files in the layout of the official python archives: rows of 3072 bytes, channel-major."""
    folder.mkdir()
    for name, (images_chw, labels) in batches.items():
        with open(folder / name, "wb") as f:
            pickle.dump({"data": images_chw.reshape(len(images_chw), -1), label_key: labels}, f)
    with open(folder / meta_name, "wb") as f:
        pickle.dump(meta, f)


@pytest.fixture
def skip_md5(monkeypatch):
    # Hand-made batch files cannot carry the official checksums; everything after the check is real.
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)


def test_cifar10_from_the_python_batches(tmp_path, skip_md5, cifar10_npz):
    with np.load(cifar10_npz) as arrays:
        pick = np.arange(0, 50000, 997)[:48]  # a few of every class (rows are sorted by class)
        hwc, labels = arrays["x_train"][pick], arrays["y_train"][pick].astype(int)
    chw = np.ascontiguousarray(hwc.transpose(0, 3, 1, 2))
    batches = {f"data_batch_{i + 1}": (chw[8 * i : 8 * i + 8], labels[8 * i : 8 * i + 8].tolist()) for i in range(5)}
    batches["test_batch"] = (chw[40:], labels[40:].tolist())
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    write_cifar_batches(tmp_path / "cifar-10-batches-py", batches, "labels", "batches.meta", {"label_names": names})
    train = cifar10(CIFARConfig(root=str(tmp_path), download=False), split="train")
    test = cifar10(CIFARConfig(root=str(tmp_path), download=False), split="test")
    assert (len(train), len(test)) == (40, 8) and train.shape == (3, 32, 32)
    assert train.num_classes == 10 and train.classes == tuple(names) and train.hflip
    images, ys = train.tensors()
    assert torch.equal(images, torch.from_numpy(chw[:40])) and ys.tolist() == labels[:40].tolist()
    assert torch.equal(test[2][0], images_uint8_to_float(torch.from_numpy(chw[42])))


def test_cifar100_uses_the_fine_labels(tmp_path, skip_md5):
    rng = np.random.default_rng(0)
    chw = rng.integers(0, 256, (12, 3, 32, 32), dtype=np.uint8)
    fine = [0, 99, 5, 17, 42, 3, 8, 64, 99, 1, 2, 77]
    batches = {"train": (chw[:9], fine[:9]), "test": (chw[9:], fine[9:])}
    meta = {"fine_label_names": [f"c{i}" for i in range(100)]}
    write_cifar_batches(tmp_path / "cifar-100-python", batches, "fine_labels", "meta", meta)
    ds = cifar100(CIFARConfig(root=str(tmp_path), download=False), split="train")
    assert ds.num_classes == 100 and ds.tensors()[1].tolist() == fine[:9]
    assert torch.equal(ds.tensors()[0], torch.from_numpy(chw[:9]))


def test_unknown_split_is_a_user_error(tmp_path):
    with pytest.raises(MFError, match="split"):
        mnist(MNISTConfig(root=str(tmp_path), download=False), split="val")
