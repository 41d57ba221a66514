"""``mf train RECIPE [key=value ...]``: train from a recipe into a new run directory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("train", no_args_is_help=False)
    def train(
        recipe: Optional[str] = typer.Argument(None, help="Recipe file or name (`mf recipes ls`)."),
        overrides: Optional[list[str]] = typer.Argument(None, help="Dotted overrides, e.g. train.steps=2000 data.batch_size=64."),
        resume: Optional[Path] = typer.Option(None, "--resume", help="Continue a run directory from its last checkpoint."),
        gpus: Optional[int] = typer.Option(None, "--gpus", help="GPUs to use on this machine (default: all visible)."),
        procs: Optional[int] = typer.Option(None, "--procs", help="Processes on the CPU (gloo), e.g. to try DDP without GPUs."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, mps (default: the recipe's train.device, auto)."),
        runs_dir: Optional[str] = typer.Option(None, "--runs-dir", help="Parent of run directories (default: the recipe's run.dir)."),
    ) -> None:
        """Train a model. Several GPUs: one process per GPU (DDP); several machines: run under torchrun."""
        import torch

        from mfcli import runs
        from mfcli.config import find_recipe, load_recipe, recipe_from_resolved, apply_overrides
        from mfcli.console import console
        from mfcli.engine import StopTraining, launch
        from mfcli.errors import MFError

        if resume is not None:
            if recipe is not None:  # `mf train --resume RUN train.steps=N`: the first word is an override
                overrides = [recipe, *(overrides or [])]
            cfg = runs.read_config(resume)
            resolved = apply_overrides(cfg["config"], overrides or [])
            rec = recipe_from_resolved(resolved)
            rec.overrides = list(cfg.get("overrides", [])) + list(overrides or [])
            run_dir = Path(resume)
        else:
            if recipe is None:
                raise MFError("name a recipe: `mf train recipes/quickstart.toml` (`mf recipes ls` lists them), or --resume RUN_DIR.")
            rec = load_recipe(find_recipe(recipe), overrides or [])
            run_dir = None
        if gpus is not None and gpus < 0:
            raise MFError(f"--gpus must be 0 or more, got {gpus}.")
        if procs is not None:
            if procs < 1:
                raise MFError(f"--procs must be at least 1, got {procs}.")
            nprocs, device = procs, device or "cpu"
        elif torch.cuda.is_available() and (device or rec.train.device) in ("auto", "cuda"):
            avail = torch.cuda.device_count()
            if gpus is not None and gpus > avail:
                raise MFError(f"--gpus {gpus} asked for, but this machine has {avail} visible GPU(s).")
            nprocs = gpus if gpus else avail
        else:
            if gpus:
                raise MFError(f"--gpus {gpus} asked for, but no CUDA GPU is available here.")
            nprocs = 1
        try:
            out = launch(rec, nprocs=nprocs, run_dir=run_dir, resume=resume is not None, device=device, runs_dir=runs_dir)
        except StopTraining:
            raise typer.Exit(130)
        console.print(f"[green]done:[/] {out}  (sample with `mf sample {out}`)")
