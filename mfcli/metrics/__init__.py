"""Evaluation metrics of mf: FID (through clean-fid), an offline classifier stand-in, accuracy.

Images to evaluate are uint8: numpy arrays (N, H, W, C), torch tensors (N, C, H, W),
folders of image files or ``.npz`` arrays (see ``open_images``). Every Fréchet
distance goes through the same float64 statistics and distance code.

Fréchet distance (``frechet.py``)
    ``FeatureStats()``: streaming float64 mean/covariance; ``.update(feats (B, D))``,
        ``.merge(other)``, ``.mu (D,)``, ``.sigma (D, D)``.
    ``feature_stats(features_or_batches) -> (mu, sigma)``
    ``frechet_distance(mu1, sigma1, mu2, sigma2) -> float``
    ``save_stats(path, mu, sigma, **meta) -> path``; ``load_stats(path) -> (mu, sigma, meta)``

FID through clean-fid (``fid.py``)
    ``compute_fid(samples, reference="cifar10", *, mode="clean", num=50_000,
        dataset_split="train", dataset_res=None, inception_weights=None,
        feature_extractor=None, device=None, batch_size=64, num_workers=0) -> float``
    ``make_custom_stats(images, out_path, *, mode="clean", num=None,
        inception_weights=None, feature_extractor=None, device=None, ...) -> path``
    ``inception_feature_extractor(mode="clean", inception_weights=None, device=None)``
    ``resolve_inception_weights(inception_weights=None) -> path``
    ``clean_fid_reference_stats(name, res, split="train", mode="clean") -> (mu, sigma)``

Classifier metrics (``classifier.py``)
    ``classifier_fd(samples, reference, classifier, *, num=None, batch_size=256,
        device=None) -> float``: Fréchet distance in ``classifier.features`` (the
        offline stand-in; report it as ``classifier_fd_key("resnet56") == "fd_resnet56"``,
        never as FID).
    ``classifier_feature_stats(images, classifier, ...) -> FeatureStats``
    ``classifier_accuracy(model, images, labels=None, *, batch_size=256, device=None)
        -> {"top1_pct", "top5_pct", "num_images", "params", "params_nonzero",
        "images_per_s", "batch_size", "device"}``
    ``count_parameters(model) -> {"params", "params_nonzero"}``

Results (``report.py``)
    ``write_eval_json(run_dir, results) -> path`` (merge, atomic);
    ``read_eval_json(run_dir) -> dict``; ``results_table(results, title) -> rich.table.Table``

Helpers: ``open_images(source)``, ``images_to_uint8(x in [-1, 1]) -> uint8``,
``RandomConvFeatures`` (a fixed random feature net for testing the FID pipeline offline).
"""

from mfcli.metrics.classifier import (
    classifier_accuracy,
    classifier_fd,
    classifier_fd_key,
    classifier_feature_stats,
    count_parameters,
)
from mfcli.metrics.fid import (
    FID_MODES,
    clean_fid_reference_stats,
    compute_fid,
    inception_feature_extractor,
    make_custom_stats,
    resolve_inception_weights,
)
from mfcli.metrics.frechet import FeatureStats, feature_stats, frechet_distance, load_stats, save_stats
from mfcli.metrics.images import ImageSet, images_to_uint8, open_images
from mfcli.metrics.report import metric_label, read_eval_json, results_table, write_eval_json
from mfcli.metrics.standin import RandomConvFeatures

__all__ = [
    "FID_MODES",
    "FeatureStats",
    "ImageSet",
    "RandomConvFeatures",
    "classifier_accuracy",
    "classifier_fd",
    "classifier_fd_key",
    "classifier_feature_stats",
    "clean_fid_reference_stats",
    "compute_fid",
    "count_parameters",
    "feature_stats",
    "frechet_distance",
    "images_to_uint8",
    "inception_feature_extractor",
    "load_stats",
    "make_custom_stats",
    "metric_label",
    "open_images",
    "read_eval_json",
    "resolve_inception_weights",
    "results_table",
    "save_stats",
    "write_eval_json",
]
