"""Metrics that use a classifier: a Fréchet distance in its features, and its accuracy.

``classifier_fd`` is the offline stand-in for FID on CIFAR-10 when Inception
weights are unavailable: the Fréchet distance between the penultimate features
(64-d for the CIFAR ResNets of He et al. 2016) of a pretrained classifier. It shares
``FeatureStats`` and ``frechet_distance`` with FID but it is a different number on a
different scale: report it as ``fd_<classifier>`` (e.g. ``fd_resnet56``), never as FID.

A classifier here is any ``nn.Module`` that takes (B, 3, H, W) float images in
[-1, 1] (normalising internally), returns logits from ``forward`` and, for the
Fréchet distance, (B, D) features from ``features(x)``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from mfcli.errors import MFError
from mfcli.metrics.frechet import FeatureStats, frechet_distance
from mfcli.metrics.images import ImageSet, open_images, uint8_to_model


def classifier_fd_key(classifier_name: str) -> str:
    """The results key of the stand-in metric, e.g. ``"resnet56" -> "fd_resnet56"``."""
    return "fd_" + classifier_name.lower().replace("-", "").replace(" ", "_")


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _eval_mode:
    """Put a module in eval mode for a block and restore its previous mode after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def classifier_feature_stats(
    images, classifier: nn.Module, *, num: int | None = None, batch_size: int = 256, device: torch.device | str | None = None
) -> FeatureStats:
    """Statistics of ``classifier.features`` over the first ``num`` images (all by default).

    Args:
        images: uint8 images in any form ``open_images`` accepts (array, tensor, folder, .npz).
        classifier: module with ``features(x: (B, 3, H, W) in [-1, 1]) -> (B, D)``.
        device: where to run; default the device of the classifier's parameters.
    """
    if not callable(getattr(classifier, "features", None)):
        raise MFError(
            f"The classifier {type(classifier).__name__} has no features(x) method, so its features cannot be "
            "used for a Fréchet distance; use a classifier that exposes its penultimate features."
        )
    images = open_images(images)
    device = torch.device(device) if device is not None else _model_device(classifier)
    stats = FeatureStats()
    with _eval_mode(classifier), torch.no_grad():
        for batch in images.batches(batch_size, num):  # (B, H, W, 3) uint8
            stats.update(classifier.features(uint8_to_model(batch, device)))
    return stats


def classifier_fd(
    samples,
    reference,
    classifier: nn.Module,
    *,
    num: int | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> float:
    """Fréchet distance between samples and a reference in a classifier's features (not FID).

    Args:
        samples: uint8 images (array (N, H, W, C), tensor (N, C, H, W), folder or .npz);
            the first ``num`` are used (all by default; fewer than ``num`` is an error).
        reference: uint8 images in the same forms (all are used), or their statistics
            as ``FeatureStats``, ``(mu, sigma)`` or an ``.npz`` from ``save_stats``.
        classifier: module with ``features(x)`` on [-1, 1] images; put it on the device you want.

    Returns:
        The Fréchet distance as a float (label it ``fd_<classifier>``).
    """
    from mfcli.metrics.fid import reference_stats_or_images

    samples = open_images(samples, name="samples")
    if num is not None and len(samples) < num:
        raise MFError(f"The Fréchet distance was asked over {num} samples, but {samples.description} has only {len(samples)}.")
    ref = reference_stats_or_images(reference, mode=None, feature=getattr(classifier, "feature_name", None))
    if ref is None:
        raise MFError(
            f"The reference {reference!r} is neither images nor a statistics file. A Fréchet distance in classifier "
            "features needs reference images (for example the training set as a uint8 array) or their statistics."
        )
    if isinstance(ref, ImageSet) and ref.image_size() != samples.image_size():
        raise MFError(
            f"The samples are {samples.image_size()} pixels but the reference images are {ref.image_size()}; "
            "compare images of one size in the classifier's features."
        )
    stats = classifier_feature_stats(samples, classifier, num=num, batch_size=batch_size, device=device)
    if isinstance(ref, ImageSet):
        ref_stats = classifier_feature_stats(ref, classifier, batch_size=batch_size, device=device)
        ref = (ref_stats.mu, ref_stats.sigma)
    return frechet_distance(stats.mu, stats.sigma, *ref)


# --- accuracy ----------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"params": all parameters, "params_nonzero": parameters that are not exactly zero}``.

    Shared parameters are counted once; the non-zero count shows what unstructured
    pruning removed even when the tensors keep their shapes.
    """
    params = list(model.parameters())  # already de-duplicated by nn.Module
    return {
        "params": int(sum(p.numel() for p in params)),
        "params_nonzero": int(sum(int(torch.count_nonzero(p.detach())) for p in params)),
    }


def _to_model_input(x, device) -> torch.Tensor:
    """uint8 (N, H, W, C) numpy / uint8 (N, C, H, W) tensor / float tensor in [-1, 1] -> float (N, C, H, W)."""
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8:
            raise MFError(f"Image arrays must be uint8 (N, H, W, C); got {x.dtype}.")
        return uint8_to_model(x, device)
    if x.dtype == torch.uint8:
        return uint8_to_model(x, device)
    return x.to(device=device, dtype=torch.float32)


def _batches(images, labels, batch_size) -> Iterable[tuple]:
    if labels is None:  # a DataLoader or any iterable of (x, y)
        if isinstance(images, (np.ndarray, torch.Tensor)):
            raise MFError("classifier_accuracy was given images as an array but no labels; pass labels=.")
        yield from images
        return
    n = len(images)
    if len(labels) != n:
        raise MFError(f"classifier_accuracy got {n} images but {len(labels)} labels.")
    for start in range(0, n, batch_size):
        yield images[start : start + batch_size], labels[start : start + batch_size]


def classifier_accuracy(
    model: nn.Module,
    images,
    labels=None,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> dict[str, float | int | None]:
    """Top-1/top-5 accuracy of a classifier, with its size and measured throughput.

    Args:
        model: classifier mapping (B, C, H, W) float in [-1, 1] to (B, num_classes) logits.
        images: (N, C, H, W) tensor (uint8, or float in [-1, 1]), (N, H, W, C) uint8
            numpy array, or a DataLoader/iterable of ``(x, y)`` batches in those forms.
        labels: (N,) integer labels when ``images`` is a tensor or array.
        device: default the device of the model's parameters.

    Returns:
        ``{"top1_pct", "top5_pct", "num_images", "params", "params_nonzero",
        "images_per_s", "batch_size", "device"}``. ``top5_pct`` is None when there are
        fewer than 5 classes. ``images_per_s`` counts forward passes only
        (synchronised on CUDA), leaving out the first batch as warm-up when there
        are several.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    correct1 = correct5 = total = 0
    timed_images, timed_s = 0, 0.0
    num_classes = None
    with _eval_mode(model), torch.no_grad():
        for i, (x, y) in enumerate(_batches(images, labels, batch_size)):
            x = _to_model_input(x, device)
            y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).to(device).long().view(-1)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            logits = model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            if i > 0:
                timed_images, timed_s = timed_images + x.shape[0], timed_s + elapsed
            else:
                first = (x.shape[0], elapsed)
            num_classes = logits.shape[1]
            k = min(5, num_classes)
            top = logits.topk(k, dim=1).indices  # (B, k), best first
            hit = top == y[:, None]
            correct1 += int(hit[:, 0].sum())
            correct5 += int(hit.any(dim=1).sum())
            total += y.shape[0]
    if total == 0:
        raise MFError("classifier_accuracy was given no images.")
    if timed_images == 0:  # a single batch: it is the only measurement there is
        timed_images, timed_s = first
    return {
        "top1_pct": 100.0 * correct1 / total,
        "top5_pct": 100.0 * correct5 / total if num_classes >= 5 else None,
        "num_images": total,
        **count_parameters(model),
        "images_per_s": timed_images / timed_s if timed_s > 0 else float("inf"),
        "batch_size": batch_size,
        "device": str(device),
    }
