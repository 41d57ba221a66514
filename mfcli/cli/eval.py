"""``mf eval``: sample quality (FID through clean-fid, a classifier-feature Fréchet distance) and accuracy."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

METRICS = ("fid", "fd-resnet56", "accuracy")


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_cmd(
        target: Optional[str] = typer.Argument(None, help="Run directory or weights file (default: newest run); for accuracy, a classifier checkpoint."),
        metric: str = typer.Option("fid", "--metric", "-m", help="fid | fd-resnet56 (offline stand-in, not FID) | accuracy."),
        num: int = typer.Option(50000, "--num", help="Generated samples for fid / fd-resnet56."),
        nfe: int = typer.Option(1, "--nfe", help="Network evaluations per sample."),
        guidance: Optional[float] = typer.Option(None, "--guidance", help="Guidance scale while sampling (see `mf sample --help`)."),
        seed: int = typer.Option(0, "--seed"),
        batch_size: int = typer.Option(256, "--batch-size"),
        samples: Optional[str] = typer.Option(None, "--samples", help="Evaluate existing samples (folder of PNGs or .npz) instead of drawing new ones."),
        reference: Optional[str] = typer.Option(None, "--reference", help="clean-fid dataset name, image folder, .npz images or statistics (default: the run's training data)."),
        mode: str = typer.Option("clean", "--mode", help="clean-fid mode: clean | legacy_tensorflow."),
        inception_weights: Optional[Path] = typer.Option(None, "--inception-weights", help="inception-2015-12-05.pt for offline machines."),
        classifier_weights: Optional[Path] = typer.Option(None, "--classifier-weights", help="Pretrained CIFAR-10 ResNet-56 (resnet56-4bfd9763.th) for fd-resnet56 [env MF_RESNET56_WEIGHTS]."),
        arch: Optional[str] = typer.Option(None, "--arch", help="Architecture of a plain ResNet weights file for accuracy, e.g. resnet56."),
        dataset: str = typer.Option("cifar10", "--dataset", help="Dataset plugin for accuracy (test split)."),
        data: Optional[list[str]] = typer.Option(None, "--data", help="Dataset options key=value, e.g. --data path=cifar10_uint8.npz (repeatable)."),
        device: str = typer.Option("auto", "--device"),
        runs_dir: str = typer.Option("runs", "--runs-dir"),
    ) -> None:
        """Measure quality and print a table; results are merged into eval.json next to the run or checkpoint."""
        from mfcli.console import console, out
        from mfcli.engine import pick_device
        from mfcli.errors import MFError
        from mfcli.metrics import results_table, write_eval_json
        from mfcli.plugins import suggest

        if metric not in METRICS:
            raise MFError(f"unknown metric '{metric}'.{suggest(metric, METRICS)} Metrics: {', '.join(METRICS)}.")
        if num < 2:
            raise MFError(f"--num must be at least 2, got {num}.")
        dev = pick_device(device)
        if metric == "accuracy":
            if target is None:
                raise MFError("name the classifier checkpoint to evaluate: `mf eval CHECKPOINT --metric accuracy` (a compressed model from `mf compress`, or a ResNet weights file with --arch).")
            results, where = _accuracy(target, arch, dataset, data or [], batch_size, dev)
        else:
            results, where = _distribution_metric(metric, target, runs_dir, num, nfe, guidance, seed, batch_size, samples, reference, mode, inception_weights, classifier_weights, dev)
        out.print(results_table(results, title=f"mf eval: {where}"))
        path = write_eval_json(where if Path(where).is_dir() else Path(where).parent, results)
        console.print(f"results merged into {path}")


def _dataset_images(name: str, options: list[str], split: str):
    """(uint8 NCHW tensor, labels) of a dataset plugin's split, configured from key=value options."""
    from mfcli.config import build_dataclass, parse_override
    from mfcli.errors import MFError
    from mfcli.plugins import registry

    comp = registry().get("datasets", name)
    values = {}
    for o in options:
        parts, value = parse_override(f"data.{o}")
        values[parts[-1]] = value
    cfg = build_dataclass(comp.config, values, f"--data for dataset '{name}'")
    ds = comp.factory(cfg, split=split)
    if not hasattr(ds, "tensors"):
        raise MFError(f"dataset '{name}' cannot be held in memory for evaluation.")
    x, y = ds.tensors()
    if x.dtype.is_floating_point:
        raise MFError(f"dataset '{name}' is not an image dataset.")
    return x, y


def _accuracy(target, arch, dataset, data, batch_size, dev):
    from mfcli.metrics import classifier_accuracy

    model = load_classifier(target, arch).to(dev)
    x, y = _dataset_images(dataset, data, "test")
    res = classifier_accuracy(model, x, y, batch_size=batch_size, device=dev)
    return {"accuracy": {**res, "dataset": dataset, "checkpoint": str(target)}}, str(target)


def load_classifier(path: str, arch: str | None):
    """A classifier from a compressed checkpoint (mf compress) or a ResNet weights file (with --arch)."""
    from mfcli.errors import MFError

    p = Path(path)
    if not p.is_file():
        raise MFError(f"classifier checkpoint '{path}' does not exist.")
    if p.suffix == ".safetensors" and arch is None:
        from mfcli.compress import load_compressed

        return load_compressed(p)
    if arch is None:
        raise MFError(f"'{path}' is a plain weights file: say which architecture it is with --arch (e.g. --arch resnet56).")
    return _registered_resnet(arch, p)


def _registered_resnet(arch: str, weights):
    """A ResNet classifier through the backbone registry (the core imports no plugin by name)."""
    from mfcli.plugins import registry

    comp = registry().get("backbones", "resnet")
    return comp.factory(comp.config(arch=arch, weights=os.fspath(weights)), shape=(3, 32, 32), num_classes=10)


def _distribution_metric(metric, target, runs_dir, num, nfe, guidance, seed, batch_size, samples, reference, mode, inception_weights, classifier_weights, dev):
    import torch

    from mfcli import runs, viz
    from mfcli.console import console
    from mfcli.errors import MFError
    from mfcli.metrics import classifier_fd, compute_fid

    where = None
    run_recipe = None
    if samples is None:
        from mfcli.sampling import draw, load_model

        run_dir, weights = runs.resolve_run(target, runs_dir)
        m = load_model(weights, dev)
        if len(m.shape) != 3:
            raise MFError(f"{metric} needs an image model; this run's samples have shape {m.shape}.")
        console.print(f"drawing {num} samples at {nfe} NFE from {weights}")
        x, _ = draw(m.net, m.objective, m.shape, m.num_classes, num=num, nfe=nfe, generator=torch.Generator().manual_seed(seed), device=dev, guidance=guidance, batch_size=batch_size)
        gen = viz.to_uint8(x)  # (N, H, W, C) uint8, the way the images would be saved
        if gen.shape[-1] == 1:
            gen = gen.repeat(3, axis=-1)
        where, run_recipe = run_dir, m.recipe
    else:
        gen = samples
        where = Path(samples) if Path(samples).is_dir() else Path(samples).parent
    ref = reference
    if ref is None:
        if run_recipe is None:
            raise MFError("with --samples, say what to compare with: --reference (a dataset name, an image folder, .npz images or statistics).")
        # Offline-friendly default: the run's own training data, as images.
        from mfcli.engine import build_parts

        ds, _, _ = build_parts(run_recipe, split="train")
        imgs, _ = ds.tensors()
        ref = imgs.permute(0, 2, 3, 1).numpy()
        if ref.shape[-1] == 1:
            ref = ref.repeat(3, axis=-1)
    n = num if samples is None else min(num, _count(gen))
    if metric == "fid":
        value = compute_fid(gen, ref, mode=mode, num=n, inception_weights=os.fspath(inception_weights) if inception_weights else None, device=dev)
        results = {f"fid_{mode}": value, "num_samples": n, "nfe": nfe}
    else:
        w = classifier_weights or os.environ.get("MF_RESNET56_WEIGHTS")
        if not w:
            raise MFError("fd-resnet56 needs the pretrained CIFAR-10 ResNet-56 weights (resnet56-4bfd9763.th): pass --classifier-weights PATH or set MF_RESNET56_WEIGHTS.")
        clf = _registered_resnet("resnet56", w).to(dev).eval()
        value = classifier_fd(gen, ref, clf, num=n, batch_size=batch_size, device=dev)
        results = {"fd_resnet56": value, "num_samples": n, "nfe": nfe, "note": "Fréchet distance in ResNet-56 features (offline stand-in, not FID)"}
    if guidance is not None:
        results["guidance"] = guidance
    return results, str(where)


def _count(samples) -> int:
    from mfcli.metrics import open_images

    return len(open_images(samples))
