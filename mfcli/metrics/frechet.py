"""Feature statistics and the Fréchet distance between two Gaussians.

The Fréchet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2) is

    d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

(Dowson & Landau 1982; used as FID by Heusel et al. 2017, eq. 6). Every metric of
this package that is a Fréchet distance (FID through clean-fid, and the offline
stand-in in a classifier's features) goes through ``FeatureStats`` and
``frechet_distance`` below, so they share one numerical path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from mfcli.errors import MFError
from mfcli.runs import atomic_write_with

ArrayLike = np.ndarray | torch.Tensor


def _as_float64_2d(features: ArrayLike) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise MFError(f"Feature batches must have shape (batch, dim); got an array of shape {x.shape}.")
    return x


class FeatureStats:
    """Running mean and covariance of feature vectors, accumulated in float64.

    Batches are merged with the pairwise update of Chan, Golub & LeVeque (1979): each
    batch is centred on its own mean before its scatter matrix is added, so the
    covariance does not suffer the cancellation of ``E[x x^T] - mu mu^T`` when the
    mean is large compared with the spread. Only (dim,) + (dim, dim) numbers are
    kept, never the features themselves, and two accumulators can be merged (for
    example across data-parallel ranks).

    Attributes:
        num: number of feature vectors seen.
        mean: (dim,) float64 running mean (None before the first batch).
        scatter: (dim, dim) float64 sum of centred outer products.
    """

    def __init__(self) -> None:
        self.num = 0
        self.mean: np.ndarray | None = None
        self.scatter: np.ndarray | None = None

    def update(self, features: ArrayLike) -> FeatureStats:
        """Add a batch of features of shape (B, dim). Returns self."""
        x = _as_float64_2d(features)
        if x.shape[0] == 0:
            return self
        if not np.isfinite(x).all():
            raise MFError(
                "Some features are NaN or infinite, so no Fréchet distance can be computed. "
                "This usually means the images themselves contain NaN (for example samples "
                "from a diverged model); check the samples before evaluating them."
            )
        batch_mean = x.mean(axis=0)
        centred = x - batch_mean
        return self._merge(x.shape[0], batch_mean, centred.T @ centred)

    def merge(self, other: FeatureStats) -> FeatureStats:
        """Fold another accumulator into this one (the result equals one pass over both). Returns self."""
        if other.num == 0:
            return self
        return self._merge(other.num, other.mean, other.scatter)

    def _merge(self, n_b: int, mean_b: np.ndarray, scatter_b: np.ndarray) -> FeatureStats:
        if self.num == 0:
            self.num, self.mean, self.scatter = n_b, mean_b.copy(), scatter_b.copy()
            return self
        if mean_b.shape != self.mean.shape:
            raise MFError(
                f"Feature batches disagree on their dimension ({self.mean.shape[0]} then "
                f"{mean_b.shape[0]}); all features of one set must come from the same network layer."
            )
        total = self.num + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / total)
        self.scatter = self.scatter + scatter_b + np.outer(delta, delta) * (self.num * n_b / total)
        self.num = total
        return self

    @property
    def mu(self) -> np.ndarray:
        """(dim,) float64 mean."""
        self._require(1)
        return self.mean.copy()

    @property
    def sigma(self) -> np.ndarray:
        """(dim, dim) float64 unbiased covariance (divides by num - 1, like ``np.cov``)."""
        self._require(2)
        return self.scatter / (self.num - 1)

    def _require(self, n: int) -> None:
        if self.num < n:
            raise MFError(
                f"A covariance needs at least {n} feature vectors, but only {self.num} were given; "
                "evaluate more images."
            )


def feature_stats(features: ArrayLike | Iterable[ArrayLike]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features, streaming over batches.

    Args:
        features: one (N, dim) array/tensor, or an iterable of (B, dim) batches.

    Returns:
        ``(mu, sigma)``: (dim,) and (dim, dim) float64 arrays; sigma is unbiased.
    """
    acc = FeatureStats()
    if isinstance(features, (np.ndarray, torch.Tensor)):
        acc.update(features)
    else:
        for batch in features:
            acc.update(batch)
    return acc.mu, acc.sigma


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix.

    Eigenvalues below ``dim * eps * max`` are indistinguishable from round-off and are
    set to 0, so a singular covariance gets an exactly singular root instead of
    spurious ``sqrt(1e-16) = 1e-8`` components in its null space.
    """
    w, v = np.linalg.eigh(s)
    tol = max(w.max(initial=0.0), 0.0) * s.shape[0] * np.finfo(np.float64).eps
    return (v * np.sqrt(np.where(w > tol, w, 0.0))) @ v.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``tr((S1 S2)^{1/2})`` is computed as the nuclear norm (sum of singular values) of
    ``S1^{1/2} S2^{1/2}``: with ``A = S1^{1/2} S2^{1/2}``, ``A A^T = S1^{1/2} S2 S1^{1/2}``
    has the eigenvalues of ``S1 S2``, so the singular values of A are their square
    roots. Unlike ``scipy.linalg.sqrtm`` of the non-symmetric product ``S1 S2`` this is
    real (no imaginary part to discard), defined for singular covariances (fewer
    samples than feature dimensions) without adding ``eps * I``, and it never takes
    the square root of a round-off eigenvalue: singular values carry an error of
    ``eps * |A|``, where square roots of eigenvalues would carry ``sqrt(eps * |A|^2)``.

    Args:
        mu1, mu2: (dim,) means.
        sigma1, sigma2: (dim, dim) covariances.

    Returns:
        The squared distance d^2 as a Python float (>= 0).
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    dims = {mu1.shape[0], mu2.shape[0], *s1.shape, *s2.shape}
    if mu1.ndim != 1 or mu2.ndim != 1 or len(dims) != 1:
        raise MFError(
            f"The two feature statistics do not match: means {mu1.shape} and {mu2.shape}, covariances "
            f"{s1.shape} and {s2.shape}. Both sets must be described in the features of the same network "
            "(for example, reference statistics of Inception features cannot be compared with ResNet features)."
        )
    for name, a in (("mu1", mu1), ("mu2", mu2), ("sigma1", s1), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise MFError(f"The feature statistic {name} contains NaN or infinite values; recompute it.")
    # Covariances from sums of outer products are symmetric only up to round-off.
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    tr_covmean = np.linalg.svd(_psd_sqrt(s1) @ _psd_sqrt(s2), compute_uv=False).sum()
    diff = mu1 - mu2
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    # d^2 >= 0 exactly; a negative value can only be round-off of the order of eps * scale.
    scale = float(diff @ diff + np.trace(s1) + np.trace(s2))
    if fd < 0.0:
        if fd < -1e-8 * max(scale, 1.0):
            raise ArithmeticError(f"Fréchet distance came out negative ({fd}) beyond round-off")
        fd = 0.0
    return fd


# --- statistics files -------------------------------------------------------------------------


def save_stats(path: str | os.PathLike, mu: ArrayLike, sigma: ArrayLike, **meta: Any) -> str:
    """Write ``mu``/``sigma`` to an ``.npz`` (clean-fid's key names) with JSON metadata, atomically.

    ``meta`` records what the statistics describe (feature network, mode, image
    count) so that mismatched statistics are refused later instead of compared.
    Returns the path written.
    """
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare temp name
            np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), meta=json.dumps(meta))

    atomic_write_with(path, write)
    return path


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read ``(mu, sigma, meta)`` from an ``.npz`` with keys ``mu`` and ``sigma`` (ours or clean-fid's).

    ``meta`` is empty for files without metadata (such as clean-fid's own).
    """
    path = os.fspath(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
            meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
    except FileNotFoundError:
        raise MFError(f"The statistics file {path} does not exist.") from None
    except KeyError as e:
        raise MFError(f"{path} is not a feature-statistics file: it has no array {e} (expected 'mu' and 'sigma').") from None
    except Exception as e:  # zipfile/np errors of a truncated or foreign file
        raise MFError(
            f"Could not read the statistics file {path} ({type(e).__name__}: {e}). It is probably truncated or "
            "not an .npz of 'mu' and 'sigma'; delete it and compute it again."
        ) from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise MFError(f"{path} holds mu of shape {mu.shape} and sigma of shape {sigma.shape}; they do not fit together.")
    return mu, sigma, meta
