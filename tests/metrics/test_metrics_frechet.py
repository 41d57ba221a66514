"""FeatureStats and frechet_distance against independent float64 computations."""

import numpy as np
import pytest
import scipy.linalg
import torch

from mfcli.errors import MFError
from mfcli.metrics import FeatureStats, feature_stats, frechet_distance, load_stats, save_stats


def random_spd(rng, d, rank=None):
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / d + (0.0 if rank else 0.1) * np.eye(d)


def fd_scipy(mu1, s1, mu2, s2):
    """The textbook formula with scipy's general matrix square root, in float64."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    assert np.abs(covmean.imag).max() < 1e-8 if np.iscomplexobj(covmean) else True
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


@pytest.mark.parametrize("d", [1, 5, 64])
def test_matches_scipy_sqrtm_on_random_gaussians(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    expected = fd_scipy(mu1, s1, mu2, s2)
    assert expected > 0.1
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-10)


def test_closed_form_diagonal_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3.0, size=10), rng.uniform(0.1, 3.0, size=10)
    mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_closed_form_singular_commuting_covariances():
    """Rank-deficient covariances (as with fewer samples than dimensions), rotated off the axes.

    With S1 = Q diag(a) Q^T and S2 = Q diag(b) Q^T, tr (S1 S2)^{1/2} = sum sqrt(a b), so
    FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2 even when some a, b are 0.
    """
    rng = np.random.default_rng(2)
    d = 32
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.0, 2.0, size=d), rng.uniform(0.0, 2.0, size=d)
    a[:12] = 0.0
    b[8:20] = 0.0
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)


def test_identical_statistics_give_zero_and_distance_is_symmetric_and_scales():
    rng = np.random.default_rng(3)
    mu, s = rng.normal(size=16), random_spd(rng, 16, rank=6)  # singular on purpose
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-10)
    mu2, s2 = rng.normal(size=16), random_spd(rng, 16)
    d = frechet_distance(mu, s, mu2, s2)
    assert frechet_distance(mu2, s2, mu, s) == pytest.approx(d, rel=1e-9)
    # Features scaled by c: means by c, covariances by c^2, distance by c^2.
    assert frechet_distance(3 * mu, 9 * s, 3 * mu2, 9 * s2) == pytest.approx(9 * d, rel=1e-9)


def test_agrees_with_clean_fid_formula():
    from cleanfid.fid import frechet_distance as cleanfid_fd

    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(500, 24)), rng.normal(0.3, 1.2, size=(400, 24))
    mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(cleanfid_fd(mu1, s1, mu2, s2), rel=1e-8)


def test_mismatched_or_non_finite_statistics_are_user_errors():
    mu, s = np.zeros(4), np.eye(4)
    with pytest.raises(MFError, match="same network"):
        frechet_distance(mu, s, np.zeros(5), np.eye(5))
    with pytest.raises(MFError, match="NaN"):
        frechet_distance(mu, s, np.full(4, np.nan), s)


def test_streaming_stats_equal_one_pass_float64_even_with_a_large_offset():
    rng = np.random.default_rng(5)
    # A mean 1e5 times the spread: E[xx^T] - mu mu^T would lose ~10 digits here.
    x = 1e5 + rng.normal(size=(1000, 8)) @ rng.normal(size=(8, 8))
    acc = FeatureStats()
    for chunk in np.split(x, [1, 7, 300, 301, 999]):  # uneven batches, including size 1
        acc.update(torch.from_numpy(chunk.astype(np.float64)))
    assert acc.num == 1000
    np.testing.assert_allclose(acc.mu, x.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(acc.sigma, np.cov(x, rowvar=False), rtol=1e-8, atol=1e-8)


def test_merge_equals_single_pass_and_float32_features_accumulate_in_float64():
    rng = np.random.default_rng(6)
    x = rng.normal(2.0, 3.0, size=(300, 10)).astype(np.float32)
    a, b = FeatureStats().update(x[:120]), FeatureStats().update(x[120:])
    a.merge(b)
    mu, sigma = feature_stats(iter([x[:50], x[50:]]))
    x64 = x.astype(np.float64)
    for m, s in ((a.mu, a.sigma), (mu, sigma)):
        assert m.dtype == np.float64 and s.dtype == np.float64
        np.testing.assert_allclose(m, x64.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(s, np.cov(x64, rowvar=False), rtol=1e-10, atol=1e-12)


def test_stats_need_two_samples_and_finite_features():
    with pytest.raises(MFError, match="at least 2"):
        FeatureStats().update(np.ones((1, 3))).sigma
    with pytest.raises(MFError, match="NaN"):
        FeatureStats().update(np.array([[0.0, np.inf]]))
    with pytest.raises(MFError, match=r"\(batch, dim\)"):
        FeatureStats().update(np.ones((2, 3, 1, 1)))


def test_stats_file_round_trip_and_truncation(tmp_path):
    rng = np.random.default_rng(7)
    mu, sigma = rng.normal(size=6), random_spd(rng, 6)
    path = save_stats(tmp_path / "ref.npz", mu, sigma, feature="f", mode="clean", num=10)
    mu2, sigma2, meta = load_stats(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    assert meta == {"feature": "f", "mode": "clean", "num": 10}
    blob = open(path, "rb").read()
    broken = tmp_path / "broken.npz"
    broken.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(MFError, match="truncated"):
        load_stats(broken)
