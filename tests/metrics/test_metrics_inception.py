"""Where FID's Inception weights and reference statistics come from, offline and on failure.

A scripted stand-in with the interface of clean-fid's TorchScript Inception (a
``layers`` part giving 2048 features, and ``forward(x, return_features)`` that resizes
inside) checks the wiring without the 95 MB file. The real network is tested where
``MF_INCEPTION_WEIGHTS`` points at it.
"""

import os
import socket
import time
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from metrics_data import noise_images
from mfcli.errors import MFError
from mfcli.metrics import compute_fid, fid as fid_module, inception_feature_extractor, resolve_inception_weights, save_stats
from mfcli.metrics.fid import clean_fid_reference_stats, clean_fid_stats_filename, network_reachable


class FakeLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=8, stride=8)

    def forward(self, x):
        return F.adaptive_avg_pool2d(self.conv(x), 16).flatten(1)  # (B, 8 * 16 * 16) = (B, 2048)


class FakeInception(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = FakeLayers()

    def forward(self, x, return_features: bool = False):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, nothing cached, no weights in the environment: any download attempt fails the test."""

    def no_connection(*a, **k):
        raise OSError("network is unreachable (test)")

    def no_download(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(socket, "create_connection", no_connection)
    monkeypatch.setattr(urllib.request, "urlopen", no_download)
    monkeypatch.delenv("MF_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.delenv("MF_OFFLINE", raising=False)
    cache = tmp_path / "cleanfid_cache"
    cache.mkdir()
    monkeypatch.setattr(fid_module, "CLEANFID_INCEPTION_DIR", str(cache))
    return cache


@pytest.fixture
def fake_weights(tmp_path, monkeypatch):
    """A scripted stand-in saved under a name other than clean-fid's, with the size check relaxed for it."""
    monkeypatch.setattr(fid_module, "MIN_INCEPTION_BYTES", 0)
    path = tmp_path / "my-inception-copy.pt"
    torch.jit.script(FakeInception().eval()).save(str(path))
    return str(path)


def test_no_weights_and_no_network_is_a_fast_clear_error(offline):
    start = time.perf_counter()
    with pytest.raises(MFError) as err:
        resolve_inception_weights()
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert fid_module.INCEPTION_URL in message and "inception_weights" in message and "MF_INCEPTION_WEIGHTS" in message
    assert "not FID" in message  # points to the stand-in without passing it off as FID
    assert list(offline.iterdir()) == []


def test_mf_offline_skips_even_the_probe(offline, monkeypatch):
    def probe(*a, **k):
        raise AssertionError("probed the network although MF_OFFLINE=1")

    monkeypatch.setattr(socket, "create_connection", probe)
    monkeypatch.setenv("MF_OFFLINE", "1")
    assert network_reachable(fid_module.INCEPTION_URL) is False
    with pytest.raises(MFError, match="cannot be reached"):
        resolve_inception_weights()


def test_network_probe_reports_a_listening_port_and_a_closed_one():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert network_reachable(f"http://127.0.0.1:{port}/x", timeout=2)
    assert not network_reachable(f"http://127.0.0.1:{port}/x", timeout=2)  # closed now


def test_truncated_file_in_clean_fid_cache_is_reported_not_reused(offline):
    cached = offline / fid_module.INCEPTION_FILENAME
    cached.write_bytes(os.urandom(1_000_000))
    with pytest.raises(MFError, match="truncated") as err:
        resolve_inception_weights()
    assert str(cached) in str(err.value)


def test_corrupt_or_foreign_weight_files_are_user_errors(offline, tmp_path, monkeypatch):
    monkeypatch.setattr(fid_module, "MIN_INCEPTION_BYTES", 0)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(MFError, match="could not be loaded as TorchScript"):
        inception_feature_extractor("clean", junk, "cpu")
    foreign = tmp_path / "foreign.pt"
    torch.jit.script(nn.Linear(2, 2)).save(str(foreign))
    with pytest.raises(MFError, match="not clean-fid's Inception"):
        inception_feature_extractor("clean", foreign, "cpu")
    with pytest.raises(MFError, match="does not exist"):
        resolve_inception_weights(tmp_path / "missing.pt")


def test_environment_variable_names_the_weights(offline, fake_weights, monkeypatch):
    monkeypatch.setenv("MF_INCEPTION_WEIGHTS", fake_weights)
    assert resolve_inception_weights() == fake_weights


def independent_features(images, net, mode):
    """The stand-in's features of clean-fid's inputs, resized from scratch: (N, 2048) float64."""
    out = []
    for img in images:
        if mode == "clean":
            chans = [np.asarray(Image.fromarray(img[:, :, c].astype(np.float32)).resize((299, 299), Image.BICUBIC)) for c in range(3)]
            x = torch.from_numpy(np.clip(np.stack(chans), 0, 255))[None]
            f = net.layers((x - 128) / 128)  # what InceptionV3W does before its layers
        else:
            f = net(torch.from_numpy(img.transpose(2, 0, 1).astype(np.float32))[None], True)
        out.append(f.detach().double().numpy())
    return np.concatenate(out)


@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow"])
def test_explicit_weights_file_is_the_network_clean_fid_runs(offline, fake_weights, cifar, mode):
    images = cifar["x_train"][:24]
    net = inception_feature_extractor(mode, fake_weights, "cpu")
    stats = fid_module.fid_feature_stats(fid_module.open_images(images), net, mode=mode, device="cpu", batch_size=10)
    feats = independent_features(images, torch.jit.load(fake_weights), mode)
    np.testing.assert_allclose(stats.mu, feats.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False), rtol=1e-4, atol=1e-8)
    assert list(offline.iterdir()) == []  # nothing was downloaded into clean-fid's cache


def fd_few_samples(f1, f2):
    """FD from feature matrices (n, d) with n < d, where the covariances are singular.

    tr((S1 S2)^{1/2}) = |X1 X2^T|_* / sqrt((n1 - 1)(n2 - 1)) for the centred feature
    matrices X1, X2: the non-zero eigenvalues of S1 S2 are the squared singular values
    of X1 X2^T divided by (n1 - 1)(n2 - 1).
    """
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    c1, c2 = f1 - f1.mean(0), f2 - f2.mean(0)
    n1, n2 = len(f1), len(f2)
    tr_covmean = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    diff = f1.mean(0) - f2.mean(0)
    return float(diff @ diff + (c1**2).sum() / (n1 - 1) + (c2**2).sum() / (n2 - 1) - 2 * tr_covmean)


@pytest.mark.slow  # one Fréchet distance in 2048 dimensions: ~10 s on one core
def test_fid_from_an_explicit_weights_file_end_to_end_offline(offline, fake_weights, cifar):
    a, noise = cifar["x_train"][:40], noise_images(40, seed=2)
    got = compute_fid(a, noise, num=40, inception_weights=fake_weights, device="cpu", batch_size=20)
    net = torch.jit.load(fake_weights)
    expected = fd_few_samples(independent_features(a, net, "clean"), independent_features(noise, net, "clean"))
    assert got == pytest.approx(expected, rel=1e-6)
    assert list(offline.iterdir()) == []


def test_a_download_lands_only_when_complete(offline, fake_weights, monkeypatch):
    import cleanfid.downloads_helper as helper

    monkeypatch.setattr(fid_module, "network_reachable", lambda url, timeout=0: True)
    cached = offline / fid_module.INCEPTION_FILENAME

    def interrupted(fpath):
        path = os.path.join(fpath, fid_module.INCEPTION_FILENAME)
        with open(path, "wb") as f:
            f.write(open(fake_weights, "rb").read()[:500])  # the connection dropped
        return path

    monkeypatch.setattr(helper, "check_download_inception", interrupted)
    with pytest.raises(MFError, match="could not be loaded"):
        resolve_inception_weights()
    assert list(offline.iterdir()) == []  # no partial file left to be reused next time

    def complete(fpath):
        path = os.path.join(fpath, fid_module.INCEPTION_FILENAME)
        with open(path, "wb") as f:
            f.write(open(fake_weights, "rb").read())
        return path

    monkeypatch.setattr(helper, "check_download_inception", complete)
    assert resolve_inception_weights() == str(cached)
    assert os.listdir(offline) == [fid_module.INCEPTION_FILENAME]


# --- reference statistics ------------------------------------------------------------------------


@pytest.fixture
def stats_folder(monkeypatch, tmp_path):
    """clean-fid's stats folder (and mf's cache) moved to a temporary place."""
    import cleanfid

    package = tmp_path / "cleanfid"
    (package / "stats").mkdir(parents=True)
    monkeypatch.setattr(cleanfid, "__file__", str(package / "__init__.py"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return package / "stats"


def test_reference_file_names_agree_with_clean_fid(stats_folder, offline):
    from cleanfid.features import get_reference_statistics

    rng = np.random.default_rng(0)
    mu, sigma = rng.normal(size=4), np.eye(4)
    for name, res, split, mode in [("cifar10", 32, "train", "clean"), ("FFHQ", 256, "custom", "legacy_tensorflow")]:
        fname = clean_fid_stats_filename(name, res, split, mode)
        np.savez(stats_folder / fname, mu=mu, sigma=sigma)
        theirs = get_reference_statistics(name, res, mode=mode, split=split)  # would try a download if names differed
        ours = clean_fid_reference_stats(name, res, split, mode)
        np.testing.assert_array_equal(theirs[0], ours[0])


def test_missing_or_truncated_reference_statistics_offline(stats_folder, offline):
    start = time.perf_counter()
    with pytest.raises(MFError, match="make_custom_stats"):
        clean_fid_reference_stats("cifar10", 32, "train", "clean")
    assert time.perf_counter() - start < 5
    path = save_stats(stats_folder / clean_fid_stats_filename("cifar10", 32, "test", "clean"), np.zeros(3), np.eye(3))
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[:100])
    with pytest.raises(MFError, match="truncated"):
        clean_fid_reference_stats("cifar10", 32, "test", "clean")


def test_reference_statistics_download_lands_only_when_complete(stats_folder, offline, monkeypatch):
    import urllib.error

    import cleanfid.downloads_helper as helper

    monkeypatch.setattr(fid_module, "network_reachable", lambda url, timeout=0: True)
    urls = []

    def truncated(folder, url):
        urls.append(url)
        path = os.path.join(folder, os.path.basename(url))
        save_stats(path, np.zeros(3), np.eye(3))
        blob = open(path, "rb").read()
        open(path, "wb").write(blob[:50])
        return path

    monkeypatch.setattr(helper, "check_download_url", truncated)
    with pytest.raises(MFError, match="truncated"):
        clean_fid_reference_stats("cifar10", 32, "train", "clean")
    assert urls == [fid_module.CLEANFID_STATS_URL + "cifar10_clean_train_32.npz"]
    assert list(stats_folder.iterdir()) == []

    def complete(folder, url):
        return save_stats(os.path.join(folder, os.path.basename(url)), np.ones(3), 2 * np.eye(3))

    monkeypatch.setattr(helper, "check_download_url", complete)
    mu, sigma = clean_fid_reference_stats("cifar10", 32, "train", "clean")
    np.testing.assert_array_equal(mu, np.ones(3))
    assert [p.name for p in stats_folder.iterdir()] == ["cifar10_clean_train_32.npz"]

    def not_found(folder, url):
        raise urllib.error.HTTPError(url, 404, "Not Found", None, None)

    monkeypatch.setattr(helper, "check_download_url", not_found)
    with pytest.raises(MFError, match="has no reference statistics"):
        clean_fid_reference_stats("cifar11", 32, "train", "clean")


def test_dataset_name_reference_uses_clean_fid_statistics(stats_folder, offline, fake_weights, cifar, monkeypatch):
    rng = np.random.default_rng(1)
    mu, sigma = rng.normal(size=2048), np.diag(rng.uniform(0.5, 1.0, size=2048))
    np.savez(stats_folder / "cifar10_clean_train_32.npz", mu=mu, sigma=sigma)
    seen = {}

    def spy(mu1, sigma1, mu2, sigma2):
        seen.update(mu1=mu1, mu2=mu2, sigma2=sigma2)
        return 1.0

    monkeypatch.setattr(fid_module, "frechet_distance", spy)  # the 2048-d distance itself is tested elsewhere
    compute_fid(cifar["x_train"][:12], "cifar10", num=12, inception_weights=fake_weights, device="cpu")
    np.testing.assert_array_equal(seen["mu2"], mu)  # resolution 32 from the samples, split "train" by default
    np.testing.assert_array_equal(seen["sigma2"], sigma)
    assert seen["mu1"].shape == (2048,)


# --- the real network -------------------------------------------------------------------------------


REAL_WEIGHTS = os.environ.get("MF_INCEPTION_WEIGHTS")


@pytest.mark.slow
@pytest.mark.skipif(
    not (REAL_WEIGHTS and os.path.isfile(REAL_WEIGHTS)),
    reason="real Inception weights absent: set MF_INCEPTION_WEIGHTS to clean-fid's inception-2015-12-05.pt to run",
)
def test_real_inception_weights(cifar, tmp_path):
    """Real weights: our FID equals one from clean-fid's own feature pipeline, and ranks noise last."""
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    n = 100
    a, b, noise = cifar["x_train"][:n], cifar["x_train"][n : 2 * n], noise_images(n, seed=3)
    d_half = compute_fid(a, b, num=n, inception_weights=REAL_WEIGHTS, device="cpu")
    d_noise = compute_fid(a, noise, num=n, inception_weights=REAL_WEIGHTS, device="cpu")
    assert d_half < d_noise
    folder = tmp_path / "w"
    folder.mkdir()
    os.symlink(os.path.abspath(REAL_WEIGHTS), folder / "inception-2015-12-05.pt")
    model = InceptionV3W(str(folder), download=False).eval()
    feats = []
    for name, images in (("a", a), ("b", b)):
        os.makedirs(tmp_path / name)
        for i, img in enumerate(images):
            Image.fromarray(img).save(tmp_path / name / f"{i:04d}.png")
        feats.append(get_folder_features(str(tmp_path / name), model, num_workers=0, batch_size=50,
                                         device=torch.device("cpu"), mode="clean", verbose=False))
    assert feats[0].shape == (n, 2048)
    assert d_half == pytest.approx(fd_few_samples(*feats), rel=1e-5)
