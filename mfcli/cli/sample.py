"""``mf sample [RUN_OR_WEIGHTS]``: one-step (or few-step) samples from a trained model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("sample")
    def sample_cmd(
        run: Optional[str] = typer.Argument(None, help="Run directory or weights file (default: the newest run)."),
        nfe: int = typer.Option(1, "--nfe", help="Network evaluations per sample (1 = one step)."),
        guidance: Optional[float] = typer.Option(None, "--guidance", help="Guidance scale; how it acts depends on how the model was trained."),
        guidance_interval: Optional[str] = typer.Option(None, "--guidance-interval", help="t_min,t_max for models that take the interval as input."),
        num: int = typer.Option(64, "--num", help="Number of samples."),
        seed: int = typer.Option(0, "--seed", help="Noise seed."),
        batch_size: int = typer.Option(256, "--batch-size", help="Samples per network call."),
        class_: Optional[str] = typer.Option(None, "--class", "--classes", help="Class labels: 3, 0-9 or 1,4,7 (default: all, evenly)."),
        raw: bool = typer.Option(False, "--raw", help="Use the raw weights instead of the EMA weights."),
        timesteps: Optional[str] = typer.Option(None, "--timesteps", help="Explicit schedule for nfe > 1, e.g. 1,0.5,0."),
        out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: RUN/samples/nfe<K>-...)."),
        individual: bool = typer.Option(False, "--png", help="Also write every sample as its own PNG."),
        runs_dir: str = typer.Option("runs", "--runs-dir", help="Where to look for the newest run."),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, mps."),
    ) -> None:
        """Draw samples: a PNG grid (or a scatter plot over the data for 2-D models), an .npz, optionally PNGs."""
        import numpy as np
        import torch
        from rich.progress import Progress

        from mfcli import runs, viz
        from mfcli.console import console
        from mfcli.engine import pick_device
        from mfcli.errors import MFError
        from mfcli.sampler import make_timesteps
        from mfcli.sampling import draw, guidance_plan, load_model, parse_classes

        if nfe < 1:
            raise MFError(f"--nfe must be at least 1, got {nfe}.")
        ts = None
        if timesteps:
            try:
                ts = [float(v) for v in timesteps.split(",")]
            except ValueError as exc:
                raise MFError(f"--timesteps '{timesteps}' must be comma-separated numbers, e.g. 1,0.5,0.") from exc
        make_timesteps(nfe, ts)  # validate before loading anything
        interval = None
        if guidance_interval:
            try:
                lo, hi = (float(v) for v in guidance_interval.split(","))
            except ValueError as exc:
                raise MFError(f"--guidance-interval '{guidance_interval}' must be two numbers t_min,t_max.") from exc
            if not 0.0 <= lo <= hi <= 1.0:
                raise MFError(f"--guidance-interval needs 0 <= t_min <= t_max <= 1, got {lo},{hi}.")
            interval = (lo, hi)
        run_dir, weights = runs.resolve_run(run, runs_dir)
        if raw:
            weights = weights.with_name("weights_raw.safetensors")
        dev = pick_device(device)
        m = load_model(weights, dev)
        classes = parse_classes(class_, m.num_classes)
        plan, msg = guidance_plan(m.objective, m.num_classes, guidance, interval)
        if interval is not None and "t_min" not in plan:
            raise MFError("--guidance-interval applies only to models that take the guidance interval as an input (improved MeanFlow).")
        if msg:
            console.print(f"[cyan]{msg}[/]")
        tag = f"nfe{nfe}" + (f"-g{guidance:g}" if guidance is not None else "") + f"-seed{seed}" + ("-raw" if raw else "")
        out_dir = out or (run_dir / "samples" / tag)
        out_dir.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        with Progress(console=console, transient=True) as prog:
            task = prog.add_task("sampling", total=num)
            x, labels = draw(m.net, m.objective, m.shape, m.num_classes, num=num, nfe=nfe, generator=gen, device=dev,
                             guidance=guidance, interval=interval, classes=classes, timesteps=ts, batch_size=batch_size,
                             on_batch=lambda b: prog.advance(task, b))
        dt = time.perf_counter() - t0
        arrays = {"samples": x.numpy()}
        if labels is not None:
            arrays["labels"] = labels.numpy()
        if len(m.shape) == 3:
            arrays["images_uint8"] = viz.to_uint8(x)
        np.savez(out_dir / "samples.npz", **arrays)
        if len(m.shape) == 1:
            data = None
            try:
                from mfcli.engine import build_parts

                ds, _, _ = build_parts(m.recipe, split="test")
                data = ds.tensors()[0][: max(num, 2000)]
            except MFError:
                pass
            png = viz.scatter_png(x, data, out_dir / "samples.png", title=f"{nfe}-NFE samples ({num})")
        else:
            png = viz.grid_png(x[:256], out_dir / "grid.png")
            if individual:
                from PIL import Image

                for i, img in enumerate(arrays["images_uint8"]):
                    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(out_dir / f"{i:06d}.png")
        console.print(f"{num} samples at {nfe} NFE in {dt:.2f}s ({num / dt:.1f} samples/s) -> {png}, {out_dir / 'samples.npz'}")
