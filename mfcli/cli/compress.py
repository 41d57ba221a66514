"""``mf compress``: MFI-ResNet compression of a trained ResNet with MeanFlow modules."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _recipe_raw(recipe: str | None, model: str, dataset: str | None):
    """(path, raw table) of the recipe to use: --recipe, else the shipped compress_<model>_<dataset>."""
    from mfcli.config import find_recipe, read_toml, recipe_dirs
    from mfcli.errors import MFError

    if recipe is not None:
        path = find_recipe(recipe)
        return path, read_toml(path)
    stem = f"compress_{model.lower()}_{dataset or 'cifar10'}"
    shipped = []
    for d in recipe_dirs():
        p = d / f"{stem}.toml"
        if p.is_file():
            return p, read_toml(p)
        shipped += [f.stem for f in d.glob("compress_*.toml")]
    # every budget and module width lives in the recipe: without one the run would train nothing
    raise MFError(f"there is no recipe {stem}; pass one with --recipe FILE. Shipped compress recipes: "
                  f"{', '.join(sorted(set(shipped))) or 'none'} (compress_resnet56_cifar10 suits the CIFAR ResNets).")


def _with_dataset(raw: dict, dataset: str) -> dict:
    """Point [data] at another registered dataset, keeping only the keys that dataset understands."""
    import dataclasses

    from mfcli.plugins import registry

    data = dict(raw.get("data", {}))
    if data.get("name") == dataset:
        return raw
    comp = registry().get("datasets", dataset)
    known = {f.name for f in dataclasses.fields(comp.config)}
    raw = dict(raw)
    raw["data"] = {"name": dataset, **{k: v for k, v in data.items() if k in known}}
    return raw


def register(app: typer.Typer) -> None:
    @app.command("compress", no_args_is_help=True)
    def compress_cmd(
        model: Optional[str] = typer.Argument(None, help="ResNet to compress: resnet20|32|44|56|110, resnet18|34|50, imagenet-resnet*."),
        overrides: Optional[list[str]] = typer.Argument(None, help="Dotted recipe overrides, e.g. meta.epochs=2 data.path=/data/cifar10.npz."),
        incubate: Optional[str] = typer.Option(None, "--incubate", help="Stages (from 1) that get their residual blocks back, e.g. 1,2,3; 'none' keeps every MeanFlow module."),
        weights: Optional[str] = typer.Option(None, "--weights", help="Pretrained baseline weights (.th, state dict or .safetensors); without them the baseline is trained first."),
        dataset: Optional[str] = typer.Option(None, "--dataset", help="Registered dataset (default: the recipe's; cifar10 without a recipe)."),
        recipe: Optional[str] = typer.Option(None, "--recipe", help="Compress recipe file or name (default: the shipped compress_<model>_<dataset>)."),
        resume: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run directory: done phases are skipped."),
        runs_dir: Optional[str] = typer.Option(None, "--runs-dir", help="Parent of run directories (default: the recipe's run.dir)."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, mps (default: the recipe's run.device, auto)."),
    ) -> None:
        """Compress a ResNet: stages -> MeanFlow modules, meta model, selective incubation, hybrid (MFI-ResNet).

        Example: mf compress resnet56 --weights ../shared/data/resnet_cifar10/resnet56-4bfd9763.th --incubate 1,2
        """
        from mfcli import runs
        from mfcli.compress.loop import Interrupted
        from mfcli.compress.pipeline import Compressor, Invocation
        from mfcli.compress.recipe import load_compress_recipe
        from mfcli.console import console
        from mfcli.errors import MFError

        if resume is not None:
            if model or overrides or incubate or weights or dataset or recipe:
                raise MFError("--resume continues a run exactly as it was started; give only --resume RUN_DIR (and --device if needed).")
            doc = runs.read_config(resume)
            cfg = dict(doc.get("config", {}))
            inv_raw = cfg.pop("invocation", None)
            if not isinstance(inv_raw, dict) or cfg.get("task") != "compress":
                raise MFError(f"'{resume}' is an mf run directory but not one of `mf compress`.")
            rec = load_compress_recipe(doc.get("recipe") or "compress recipe", raw=cfg)
            rec.overrides = list(doc.get("overrides", []))
            inv = Invocation(inv_raw["model"], list(inv_raw.get("incubate", [])), inv_raw.get("weights"))
            comp = Compressor(rec, inv, run_dir=resume, device=device)
        else:
            if model is None:
                raise MFError("name the ResNet to compress, e.g. `mf compress resnet56 --weights W.th --incubate 1,2`, or --resume RUN_DIR.")
            if incubate is None:
                raise MFError("name the stages to incubate with --incubate (e.g. --incubate 1,2,3), or --incubate none to keep a MeanFlow module in every stage.")
            path, raw = _recipe_raw(recipe, model, dataset)
            if dataset:
                raw = _with_dataset(raw, dataset)
            rec = load_compress_recipe(path, overrides or [], raw=raw)
            inv = Invocation(model.lower(), [], weights)
            comp = Compressor(rec, inv, incubate_text=incubate, runs_dir=runs_dir, device=device)
            console.print(f"recipe: {path}; {inv.model}, {comp.num_stages} stages, incubating "
                          f"{', '.join(map(str, inv.incubate)) or 'none'}; dataset {rec.data_name}; device {comp.device}")
        try:
            out = comp.run()
        except Interrupted as exc:
            where = f" at step {exc.step}" if exc.step is not None else ""
            console.print(f"[yellow]stopped in phase {exc.phase}{where}; finished phases and the last checkpoint are saved. "
                          f"Resume with: mf compress --resume {comp.run_dir}[/]")
            raise typer.Exit(130)
        console.print(f"[green]done:[/] {out}  (report.json; hybrid.safetensors loads with mfcli.compress.load_compressed)")
