"""Fréchet distance in a classifier's features, and classifier accuracy, on a small classifier."""

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from metrics_data import noise_images
from mfcli.errors import MFError
from mfcli.metrics import (
    FeatureStats,
    classifier_accuracy,
    classifier_fd,
    classifier_fd_key,
    classifier_feature_stats,
    count_parameters,
    save_stats,
)


class TinyClassifier(nn.Module):
    """Same interface as the CIFAR ResNets: [-1, 1] images, ``features(x) -> (B, 8)``, logits from forward."""

    def __init__(self, num_classes=10, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2))
        self.head = nn.Linear(8, num_classes)
        with torch.no_grad():  # non-trivial running statistics, so train-mode BN would change the features
            self.body[1].running_mean.uniform_(-0.5, 0.5)
            self.body[1].running_var.uniform_(0.5, 2.0)

    def features(self, x):
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.features(x))


def independent_features(net, images_u8):
    x = torch.from_numpy((images_u8.astype(np.float64) / 127.5 - 1.0).transpose(0, 3, 1, 2)).float()
    net.eval()
    with torch.no_grad():
        return net.features(x).double().numpy()


def fd_reference(f1, f2):
    mu1, mu2, s1, s2 = f1.mean(0), f2.mean(0), np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))


@pytest.fixture(scope="module")
def data(cifar):
    return {"a": cifar["x_train"][:200], "b": cifar["x_train"][200:400], "noise": noise_images(200, seed=4)}


def test_equals_an_independent_float64_computation(data):
    net = TinyClassifier()
    f1, f2 = independent_features(net, data["a"]), independent_features(net, data["b"])
    expected = fd_reference(f1, f2)
    net.train()  # left in train mode on purpose: the metric must use eval mode (BN running statistics)
    got = classifier_fd(data["a"], data["b"], net, batch_size=64)
    scale = sum(np.sum(f.mean(0) ** 2) + np.trace(np.cov(f, rowvar=False)) for f in (f1, f2))
    assert expected > 1e-3 * scale
    assert got == pytest.approx(expected, abs=1e-9 * scale)
    assert net.training  # the caller's mode is restored


def test_reference_as_images_stats_tuple_or_file_gives_one_number(data, tmp_path):
    net = TinyClassifier()
    ref = classifier_feature_stats(data["b"], net, batch_size=50)
    assert isinstance(ref, FeatureStats) and ref.num == 200
    path = save_stats(tmp_path / "ref.npz", ref.mu, ref.sigma)
    tensor_samples = torch.from_numpy(data["a"]).permute(0, 3, 1, 2)
    values = [
        classifier_fd(data["a"], data["b"], net),
        classifier_fd(data["a"], ref, net),
        classifier_fd(data["a"], (ref.mu, ref.sigma), net),
        classifier_fd(tensor_samples, path, net),
    ]
    assert values == pytest.approx([values[0]] * 4, rel=1e-10)


def test_real_halves_are_closer_than_noise(data):
    net = TinyClassifier()
    assert classifier_fd(data["a"], data["b"], net) < classifier_fd(data["a"], data["noise"], net) / 3


def test_user_errors(data):
    net = TinyClassifier()
    with pytest.raises(MFError, match="features"):
        classifier_fd(data["a"], data["b"], nn.Linear(3, 3))
    with pytest.raises(MFError, match="pixels"):
        classifier_fd(data["a"], np.zeros((10, 28, 28, 3), np.uint8), net)
    with pytest.raises(MFError, match="only 200"):
        classifier_fd(data["a"], data["b"], net, num=201)
    with pytest.raises(MFError, match="neither images"):
        classifier_fd(data["a"], "cifar10", net)


def test_key_is_never_fid():
    assert classifier_fd_key("ResNet-56") == "fd_resnet56"


def numpy_topk_accuracy(logits, labels, k):
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return 100.0 * np.mean((order == labels[:, None]).any(axis=1))


def test_accuracy_matches_numpy_for_every_input_form(cifar):
    net = TinyClassifier()
    images, labels = cifar["x_test"][:300], cifar["y_test"][:300].astype(np.int64)
    with torch.no_grad():
        logits = net.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2)).float() / 127.5 - 1).double().numpy()
    expected1, expected5 = numpy_topk_accuracy(logits, labels, 1), numpy_topk_accuracy(logits, labels, 5)
    assert 0 < expected1 < expected5 < 100
    u8 = torch.from_numpy(images).permute(0, 3, 1, 2)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(u8.float() / 127.5 - 1, torch.from_numpy(labels)), batch_size=64
    )
    for form in (
        classifier_accuracy(net, u8, torch.from_numpy(labels), batch_size=64),
        classifier_accuracy(net, u8.float() / 127.5 - 1, labels, batch_size=100),
        classifier_accuracy(net, images, labels, batch_size=300),
        classifier_accuracy(net, loader),
    ):
        assert form["top1_pct"] == pytest.approx(expected1, abs=1e-9)
        assert form["top5_pct"] == pytest.approx(expected5, abs=1e-9)
        assert form["num_images"] == 300
        assert 0 < form["images_per_s"] < float("inf")


def test_parameter_counts_and_small_class_counts():
    lin = nn.Linear(10, 3)
    with torch.no_grad():
        lin.weight[0].zero_()
    tied = nn.Sequential(lin, nn.ReLU(), nn.Linear(3, 3), nn.Linear(3, 3))
    tied[3].weight = tied[2].weight  # shared: counted once
    counts = count_parameters(tied)
    assert counts == {"params": 33 + 12 + 3, "params_nonzero": 33 - 10 + 12 + 3}
    result = classifier_accuracy(lin, torch.randn(8, 10), torch.zeros(8, dtype=torch.long))
    assert result["top5_pct"] is None  # 3 classes: top-5 means nothing


def test_accuracy_user_errors():
    net = TinyClassifier()
    with pytest.raises(MFError, match="labels"):
        classifier_accuracy(net, torch.zeros(4, 3, 32, 32))
    with pytest.raises(MFError, match="4 images but 3 labels"):
        classifier_accuracy(net, torch.zeros(4, 3, 32, 32), torch.zeros(3))
