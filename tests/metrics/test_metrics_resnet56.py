"""The offline FID stand-in with the real pretrained CIFAR-10 ResNet-56, on real images.

Sizes are kept small enough for 2 CPU cores: 2,500 vs 2,500 CIFAR-10 training
images (shuffled), and 1,000 images for each far-away distribution.
"""

import numpy as np
import pytest

from metrics_data import RESNET56, need, noise_images
from mfcli.metrics import classifier_accuracy, classifier_fd, classifier_feature_stats

resnet = pytest.importorskip("mf_backbones.resnet", reason="the ResNet backbones (mf_backbones.resnet) are not installed")


@pytest.fixture(scope="module")
def resnet56():
    model = resnet.build_resnet("resnet56", num_classes=10)
    resnet.load_resnet_weights(model, need(RESNET56))
    return model.eval()


@pytest.fixture(scope="module")
def half_a_stats(cifar, resnet56):
    return classifier_feature_stats(cifar["x_train"][:2500], resnet56, batch_size=250)


@pytest.mark.slow
def test_real_halves_are_far_closer_than_noise_or_mnist(cifar, resnet56, half_a_stats, mnist_as_cifar):
    half_b = cifar["x_train"][2500:5000]
    fd_halves = classifier_fd(half_b, half_a_stats, resnet56, batch_size=250)
    fd_noise = classifier_fd(noise_images(1000, seed=5), half_a_stats, resnet56, batch_size=250)
    fd_mnist = classifier_fd(mnist_as_cifar(1000), half_a_stats, resnet56, batch_size=250)
    print(f"fd_resnet56: halves {fd_halves:.4f}, noise {fd_noise:.4f}, MNIST {fd_mnist:.4f}")
    assert fd_halves < fd_noise / 100
    assert fd_halves < fd_mnist / 100


@pytest.mark.slow
def test_pretrained_accuracy_on_real_test_images(cifar, resnet56):
    # 2,000 shuffled test images; the full test set gives 93.39 %, and 4 binomial standard
    # deviations at n = 2,000 are 2.2 points.
    result = classifier_accuracy(resnet56, cifar["x_test"][:2000], cifar["y_test"][:2000].astype(np.int64), batch_size=250)
    assert 93.39 - 2.2 < result["top1_pct"] < 93.39 + 2.2
    assert result["top5_pct"] > 99.0
    assert result["params"] == sum(p.numel() for p in resnet56.parameters())
