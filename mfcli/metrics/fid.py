"""FID through clean-fid (Parmar et al. 2022, "On Aliased Resizing and Surprising Subtleties in GAN Evaluation").

clean-fid supplies the Inception-v3 network (the TorchScript port of the 2015
TensorFlow graph), its image resizing for each mode and its reference statistics;
the statistics of the samples and the distance itself go through
``mfcli.metrics.frechet`` like every Fréchet distance in mf. Modes:

  * ``"clean"``: PIL bicubic resize to 299x299 in float, then Inception;
  * ``"legacy_tensorflow"``: the network resizes inside, as the original TF code did.

What this module adds around clean-fid is the part that must not fail silently:
the weights are looked for where the user points (``inception_weights`` or the
``MF_INCEPTION_WEIGHTS`` variable), then where clean-fid caches them; a download is
tried only when the host answers within a few seconds, goes to a temporary file
that is renamed into place only when it loads, and a truncated file already in
clean-fid's cache is reported instead of reused. Reference statistics are handled
the same way. Everything runs on CPU: no CUDA default, no DataParallel, no workers.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import socket
import tempfile
import urllib.error
import urllib.parse
from collections.abc import Callable

import numpy as np
import torch

from mfcli.errors import MFError
from mfcli.metrics.frechet import FeatureStats, frechet_distance, load_stats, save_stats
from mfcli.metrics.images import ImageSet, open_images

FID_MODES = ("clean", "legacy_tensorflow")
INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
# clean-fid's feature_extractor() always keeps the weights here (cleanfid/features.py).
CLEANFID_INCEPTION_DIR = "./" if platform.system() == "Windows" else "/tmp"
# The file is about 95 MB; a download cut short is far smaller (and fails to load anyway).
MIN_INCEPTION_BYTES = 80_000_000
CLEANFID_STATS_URL = "https://www.cs.cmu.edu/~clean-fid/stats/"
NETWORK_TIMEOUT_S = 3.0  # reachability probe: long enough for a slow link, short enough never to feel like a hang
DOWNLOAD_TIMEOUT_S = 60.0  # per socket operation while downloading: a stalled transfer fails instead of hanging
INCEPTION_FEATURE_NAME = "inception_v3"  # what statistics files record for Inception features

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) float in [0, 255] -> (B, D)


def default_device() -> torch.device:
    """CUDA when present, else CPU (clean-fid's own default is CUDA even where there is none)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def network_reachable(url: str, timeout: float = NETWORK_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the host of ``url`` opens within ``timeout`` seconds.

    ``MF_OFFLINE=1`` answers False without trying.
    """
    if os.environ.get("MF_OFFLINE", "").strip() not in ("", "0"):
        return False
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    # clean-fid calls urllib.request.urlopen without a timeout; the process-wide default applies.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _download_atomically(fetch: Callable[[str], str], dest: str, validate: Callable[[str], None]) -> str:
    """Run ``fetch(tmp_folder) -> file`` into a temporary folder beside ``dest``; move it to ``dest`` once valid."""
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    tmp_folder = tempfile.mkdtemp(dir=folder, prefix=".mf-download-")
    try:
        with _socket_timeout(DOWNLOAD_TIMEOUT_S):
            fetched = fetch(tmp_folder)
        validate(fetched)
        os.replace(fetched, dest)
    finally:
        shutil.rmtree(tmp_folder, ignore_errors=True)
    return dest


# --- Inception weights -----------------------------------------------------------------------


def _how_to_get_weights() -> str:
    return (
        f"On a machine with internet, download {INCEPTION_URL} (about 95 MB), copy it to this machine and pass "
        "its path with `mf eval --inception-weights PATH` (inception_weights= in Python), or set MF_INCEPTION_WEIGHTS=/path/to/inception-2015-12-05.pt. "
        "Without these weights, real FID cannot be computed; the offline stand-in is a Fréchet distance in a "
        "CIFAR classifier's features (fd_resnet56), which is not FID and must not be reported as FID."
    )


def _check_inception_size(path: str, where: str) -> None:
    size = os.path.getsize(path)
    if size < MIN_INCEPTION_BYTES:
        raise MFError(
            f"The Inception weights at {path} ({where}) are truncated or not the right file: {size:,} bytes where "
            f"{INCEPTION_FILENAME} has about 95 MB, probably from an interrupted download. Delete the file and "
            f"try again. {_how_to_get_weights()}"
        )


def resolve_inception_weights(inception_weights: str | os.PathLike | None = None) -> str:
    """The path of a complete ``inception-2015-12-05.pt``, downloading it through clean-fid if needed.

    Looked for in order: ``inception_weights``, ``$MF_INCEPTION_WEIGHTS``, clean-fid's
    cache (``/tmp/inception-2015-12-05.pt``). When none is present, the host is probed
    with a short timeout; unreachable means an ``MFError`` that says how to get the
    file, never a hang. A truncated file is reported, never reused.
    """
    explicit = inception_weights or os.environ.get("MF_INCEPTION_WEIGHTS") or None
    if explicit is not None:
        path = os.path.expanduser(os.fspath(explicit))
        source = "inception_weights" if inception_weights else "MF_INCEPTION_WEIGHTS"
        if not os.path.isfile(path):
            raise MFError(f"The Inception weights file {path} (from {source}) does not exist. {_how_to_get_weights()}")
        _check_inception_size(path, f"from {source}")
        return path
    cached = os.path.join(CLEANFID_INCEPTION_DIR, INCEPTION_FILENAME)
    if os.path.isfile(cached):
        _check_inception_size(cached, "clean-fid's download location")
        return cached
    if not network_reachable(INCEPTION_URL):
        raise MFError(
            f"FID needs clean-fid's Inception-v3 weights ({INCEPTION_FILENAME}); none were given, none are at "
            f"{cached}, and {urllib.parse.urlsplit(INCEPTION_URL).hostname} cannot be reached from this machine. "
            + _how_to_get_weights()
        )
    from cleanfid.downloads_helper import check_download_inception

    def validate(path: str) -> None:
        _check_inception_size(path, "just downloaded")
        _load_torchscript(path)

    try:
        return _download_atomically(lambda folder: check_download_inception(fpath=folder), cached, validate)
    except (OSError, urllib.error.URLError) as e:
        raise MFError(f"Downloading the Inception weights failed ({e}). {_how_to_get_weights()}") from None


def _corrupt_message(path: str, error: Exception) -> str:
    return (
        f"{path} could not be loaded as TorchScript ({type(error).__name__}). It is corrupt or truncated (delete "
        f"it and download it again), or not clean-fid's {INCEPTION_FILENAME}. {_how_to_get_weights()}"
    )


def _load_torchscript(path: str) -> torch.jit.ScriptModule:
    try:
        module = torch.jit.load(path, map_location="cpu")
    except Exception as e:
        raise MFError(_corrupt_message(path, e)) from None
    if not hasattr(module, "layers"):
        raise MFError(f"{path} loads, but it is not clean-fid's Inception network (it has no 'layers' part).")
    return module


def inception_feature_extractor(
    mode: str = "clean", inception_weights: str | os.PathLike | None = None, device: torch.device | str | None = None
) -> torch.nn.Module:
    """clean-fid's ``InceptionV3W`` for ``mode``, built from a local weights file, in eval mode on ``device``.

    Takes (B, 3, H, W) float in [0, 255] (299x299 in ``clean`` mode) and returns (B, 2048).
    """
    from cleanfid.inception_torchscript import InceptionV3W

    _check_mode(mode)
    path = resolve_inception_weights(inception_weights)
    with contextlib.ExitStack() as stack:
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.basename(path) != INCEPTION_FILENAME:
            # InceptionV3W loads <folder>/inception-2015-12-05.pt; give it that name without touching the file.
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="mf-inception-"))
            link = os.path.join(folder, INCEPTION_FILENAME)
            try:
                os.symlink(os.path.abspath(path), link)
            except OSError:
                shutil.copyfile(path, link)
        # download=False: the file is known to be there, and clean-fid must not fetch anything.
        try:
            model = InceptionV3W(folder, download=False, resize_inside=(mode == "legacy_tensorflow"))
        except AttributeError:  # loaded, but without the 'layers' part clean-fid calls
            raise MFError(f"{path} loads, but it is not clean-fid's Inception network (it has no 'layers' part).") from None
        except Exception as e:
            raise MFError(_corrupt_message(path, e)) from None
    model.feature_name = INCEPTION_FEATURE_NAME
    return model.to(device or default_device()).eval()


# --- reference statistics ----------------------------------------------------------------------


def _mf_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mf", "clean-fid-stats")


def clean_fid_stats_filename(name: str, res: int | str, split: str, mode: str) -> str:
    """clean-fid's file name for Inception FID statistics (``cleanfid.features.get_reference_statistics``)."""
    if split == "custom":
        res = "na"
    return f"{name}_{mode}_{split}_{res}.npz".lower()


def clean_fid_reference_stats(name: str, res: int, split: str = "train", mode: str = "clean") -> tuple[np.ndarray, np.ndarray]:
    """clean-fid's precomputed Inception statistics of a dataset, e.g. ("cifar10", 32, "train").

    Read from clean-fid's stats folder (where its ``make_custom_stats`` also writes,
    ``split="custom"``) or mf's cache; downloaded from clean-fid's server only when
    it answers. Returns ``(mu (2048,), sigma (2048, 2048))``.
    """
    import cleanfid

    _check_mode(mode)
    fname = clean_fid_stats_filename(name, res, split, mode)
    cleanfid_dir = os.path.join(os.path.dirname(cleanfid.__file__), "stats")
    for folder in (cleanfid_dir, _mf_cache_dir()):
        path = os.path.join(folder, fname)
        if os.path.isfile(path):
            mu, sigma, _ = load_stats(path)
            return mu, sigma
    advice = (
        "Offline, compute reference statistics from a local copy of the dataset with "
        "mfcli.metrics.make_custom_stats and pass the .npz as the reference (or pass the image folder/array itself)."
    )
    if split == "custom":
        raise MFError(f"There are no custom clean-fid statistics named {name!r} for mode {mode!r} ({fname}). {advice}")
    url = CLEANFID_STATS_URL + fname
    if not network_reachable(url):
        raise MFError(
            f"clean-fid's reference statistics {fname} are not on this machine and {urllib.parse.urlsplit(url).hostname} "
            f"cannot be reached. {advice}"
        )
    from cleanfid.downloads_helper import check_download_url

    # clean-fid's folder sits inside site-packages, which may be read-only; mf's cache is looked in too.
    writable = os.access(cleanfid_dir if os.path.isdir(cleanfid_dir) else os.path.dirname(cleanfid_dir), os.W_OK)
    target = os.path.join(cleanfid_dir if writable else _mf_cache_dir(), fname)
    try:
        _download_atomically(lambda folder: check_download_url(folder, url), target, lambda p: load_stats(p))
    except urllib.error.HTTPError as e:
        raise MFError(
            f"clean-fid has no reference statistics {fname} (HTTP {e.code} for {url}): check the dataset name, "
            f"resolution, split and mode. {advice}"
        ) from None
    except (OSError, urllib.error.URLError) as e:
        raise MFError(f"Downloading clean-fid's reference statistics from {url} failed ({e}). {advice}") from None
    mu, sigma, _ = load_stats(target)
    return mu, sigma


# --- features and FID ------------------------------------------------------------------------


def _check_mode(mode: str) -> None:
    if mode not in FID_MODES:
        raise MFError(f"Unknown FID mode {mode!r}; choose one of {', '.join(FID_MODES)} (clean-fid's modes).")


def _extractor_device(extractor) -> torch.device:
    """Where a feature network lives (its first parameter), so inputs go there; CPU for plain functions."""
    params = extractor.parameters() if isinstance(extractor, torch.nn.Module) else iter(())
    p = next(params, None)
    return p.device if p is not None else torch.device("cpu")


def _feature_name(extractor) -> str:
    return getattr(extractor, "feature_name", None) or type(extractor).__name__


def fid_feature_stats(
    images: ImageSet,
    extractor: FeatureExtractor,
    *,
    mode: str = "clean",
    num: int | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
) -> FeatureStats:
    """Statistics of ``extractor`` features of the first ``num`` images, resized by clean-fid for ``mode``.

    Batches go to ``device`` (default: where the extractor's parameters are).
    """
    device = torch.device(device) if device is not None else _extractor_device(extractor)
    dataset = images.clean_fid_dataset(mode, num)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=num_workers
    )
    stats = FeatureStats()
    with torch.no_grad():
        for batch in loader:  # (B, 3, S, S) float in [0, 255]
            stats.update(extractor(batch.to(device)))
    return stats


def reference_stats_or_images(reference, *, mode: str | None, feature: str):
    """Resolve a reference: ``(mu, sigma)`` when it is statistics, an ``ImageSet`` when it is images,
    or ``None`` when it is a bare dataset name (clean-fid's reference statistics).

    Statistics files are checked against ``mode`` and ``feature`` when they record them.
    """
    if isinstance(reference, FeatureStats):
        return (reference.mu, reference.sigma)
    if isinstance(reference, tuple) and len(reference) == 2:
        return tuple(np.asarray(a, np.float64) for a in reference)
    if isinstance(reference, (str, os.PathLike)):
        path = os.fspath(reference)
        if path.endswith(".npz") and os.path.isfile(path) and is_stats_file(path):
            mu, sigma, meta = load_stats(path)
            _check_meta(path, meta, mode, feature)
            return (mu, sigma)
        if not os.path.exists(path.rsplit(":", 1)[0]) and re.fullmatch(r"[A-Za-z0-9_-]+", path):
            return None
    return open_images(reference, name="reference")


def is_stats_file(path: str) -> bool:
    """Whether an existing ``.npz`` holds feature statistics (``mu`` and ``sigma``) rather than images."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return "mu" in data.files and "sigma" in data.files
    except Exception:
        return True  # unreadable: let load_stats report it


def _check_meta(path: str, meta: dict, mode: str, feature: str) -> None:
    for key, want in (("mode", mode), ("feature", feature)):
        if want is not None and key in meta and meta[key] != want:
            raise MFError(
                f"The reference statistics {path} were computed with {key} {meta[key]!r}, but this evaluation uses "
                f"{want!r}; the numbers would not be comparable. Recompute them with make_custom_stats."
            )


def compute_fid(
    samples,
    reference="cifar10",
    *,
    mode: str = "clean",
    num: int = 50_000,
    dataset_split: str = "train",
    dataset_res: int | None = None,
    inception_weights: str | os.PathLike | None = None,
    feature_extractor: FeatureExtractor | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
) -> float:
    """FID of generated images against a reference, the clean-fid way.

    Args:
        samples: generated images: uint8 array (N, H, W, C), uint8 tensor (N, C, H, W),
            a folder of PNGs or an ``.npz`` image array. The first ``num`` are used.
        reference: a clean-fid dataset name ("cifar10", with ``dataset_split`` and
            ``dataset_res``); an ``.npz`` of statistics (from ``make_custom_stats``);
            ``(mu, sigma)``; or images in any form ``samples`` accepts (all are used).
        mode: "clean" or "legacy_tensorflow".
        num: number of generated images; fewer available is an error, so that
            FID-50k never silently becomes FID-5k.
        dataset_split, dataset_res: clean-fid's split ("train", "test", "custom")
            and resolution (default: the samples' height).
        inception_weights: path of ``inception-2015-12-05.pt`` for offline machines.
        feature_extractor: replaces Inception (clean-fid's ``custom_feat_extractor``):
            (B, 3, S, S) float [0, 255] -> (B, D). The result is then *not* FID.
        device: default: where ``feature_extractor`` lives; for Inception, CUDA if available, else CPU.
        batch_size, num_workers: of the resizing DataLoader (0 workers by default).

    Returns:
        The Fréchet distance as a float.
    """
    _check_mode(mode)
    samples = open_images(samples, name="samples")
    if num < 2:
        raise MFError(f"FID needs num >= 2 samples; got num={num}.")
    if len(samples) < num:
        raise MFError(
            f"FID was asked over {num} samples but {samples.description} has only {len(samples)}. Generate more, "
            f"or pass num={len(samples)} and report the number as FID-{len(samples)}, which is biased upwards "
            "and not comparable with FID over more samples."
        )
    extractor_name = _feature_name(feature_extractor) if feature_extractor is not None else INCEPTION_FEATURE_NAME
    ref = reference_stats_or_images(reference, mode=mode, feature=extractor_name)
    if ref is None:
        if feature_extractor is not None:
            raise MFError(
                "clean-fid's reference statistics are Inception features and cannot be compared with a custom "
                "feature extractor; give the reference as images or as statistics made with the same extractor."
            )
        res = dataset_res if dataset_res is not None else samples.image_size()[0]
        ref = clean_fid_reference_stats(os.fspath(reference), res, dataset_split, mode)
    extractor = feature_extractor or inception_feature_extractor(mode, inception_weights, device)
    device = device if device is not None else _extractor_device(extractor)
    kw = dict(mode=mode, batch_size=batch_size, num_workers=num_workers, device=device)
    stats = fid_feature_stats(samples, extractor, num=num, **kw)
    if isinstance(ref, ImageSet):
        ref_stats = fid_feature_stats(ref, extractor, **kw)
        ref = (ref_stats.mu, ref_stats.sigma)
    return frechet_distance(stats.mu, stats.sigma, *ref)


def make_custom_stats(
    images,
    out_path: str | os.PathLike,
    *,
    mode: str = "clean",
    num: int | None = None,
    inception_weights: str | os.PathLike | None = None,
    feature_extractor: FeatureExtractor | None = None,
    device: torch.device | str | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
) -> str:
    """Reference statistics of a local dataset for offline FID; written as ``.npz`` (mu, sigma, metadata).

    Like clean-fid's ``make_custom_stats`` but written where you say, and recording the
    mode, feature network and image count, so that ``compute_fid`` refuses to compare
    it with samples evaluated differently. Returns the path written.
    """
    _check_mode(mode)
    images = open_images(images, name="reference")
    extractor = feature_extractor or inception_feature_extractor(mode, inception_weights, device)
    device = device if device is not None else _extractor_device(extractor)
    stats = fid_feature_stats(
        images, extractor, mode=mode, num=num, batch_size=batch_size, num_workers=num_workers, device=device
    )
    return save_stats(
        out_path, stats.mu, stats.sigma,
        feature=_feature_name(extractor), mode=mode, num=stats.num, source=images.description,
    )
