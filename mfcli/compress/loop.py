"""The step loop shared by every training phase of ``mf compress``.

One phase = a fixed number of optimizer steps over an endless batch source. The loop sets the
learning rate (linear warm-up, then cosine to ``min_lr``), skips and counts steps whose
gradients are not finite, logs a line to ``log.jsonl`` every ``log_every`` steps, draws a
rich progress bar, and writes ``phase_state.pt`` atomically every ``ckpt_every`` steps and
when a stop is requested (Ctrl-C / SIGTERM): trained modules, optimizer, batch-source position
and RNG state, so that a resumed phase continues bit for bit on the CPU (DESIGN §6).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from mfcli import checkpoint, runs
from mfcli.console import console
from mfcli.errors import MFError

PHASE_STATE = "phase_state.pt"


class Interrupted(Exception):
    """A stop was requested; the phase saved what it had (or has nothing worth saving)."""

    def __init__(self, phase: str, step: int | None):
        super().__init__(phase)
        self.phase, self.step = phase, step


class Batches(Protocol):
    def __next__(self) -> Any: ...
    def state_dict(self) -> dict[str, int]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Context:
    """What every phase shares: the run directory, device, log, stop flag and phase numbering."""

    def __init__(self, run_dir: Path, device: torch.device, *, quiet: bool = False):
        self.run_dir, self.device, self.quiet = Path(run_dir), device, quiet
        self.log = runs.JsonlLog(self.run_dir / "log.jsonl")
        self.stop_requested = False
        self.label = ""  # "[3/11] meanflow stage 1" while a phase runs

    def write(self, record: dict[str, Any]) -> None:
        self.log.write({**record, "time": time.time()})

    def check_stop(self, phase: str) -> None:
        """For loops that keep nothing worth saving (evaluation, feature extraction)."""
        if self.stop_requested:
            raise Interrupted(phase, None)

    def progress(self, total: int, completed: int = 0) -> "PhaseProgress":
        return PhaseProgress(self.label, total, completed, disable=self.quiet)

    def close(self) -> None:
        self.log.close()


class PhaseProgress:
    """A rich bar labelled with the phase; plain lines instead when stderr is not a terminal."""

    def __init__(self, label: str, total: int, completed: int = 0, disable: bool = False):
        self.label, self.disable = label, disable
        self.progress = Progress(
            TextColumn(f"[bold]{escape(label)}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, disable=disable,
        )
        self.task = self.progress.add_task(label, total=total, completed=completed, stats="")

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, completed: int, stats: str | None = None) -> None:
        if self.disable:
            return
        if stats is None:
            self.progress.update(self.task, completed=completed)
            return
        self.progress.update(self.task, completed=completed, stats=stats)
        if not console.is_terminal:
            console.print(f"{escape(self.label)}: {completed}: {stats}")


def cosine_lr(step: int, total: int, *, lr: float, min_lr: float, warmup_steps: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``total``."""
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total - warmup_steps)
    frac = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * frac))


def load_phase_state(run_dir: Path, phase: str) -> dict[str, Any] | None:
    """The mid-phase checkpoint of ``phase``, or None when there is none for this phase."""
    p = Path(run_dir) / PHASE_STATE
    if not p.is_file():
        return None
    st = checkpoint.load_train_state(p)
    return st if st.get("phase") == phase else None


def run_steps(
    ctx: Context,
    phase: str,
    *,
    total: int,
    modules: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Batches,
    step_fn: Callable[[Any], dict[str, torch.Tensor]],
    cfg: Any,
    images_per_step: int,
    max_nonfinite: int = 20,
) -> dict[str, float]:
    """Run ``total`` optimizer steps of ``phase``; returns the last logged averages.

    ``step_fn(batch)`` computes the losses and calls backward (it may call it more than once,
    for parameter groups with different losses); it returns detached scalars to log.
    ``modules`` holds everything this phase trains (its state is what a checkpoint keeps).
    ``cfg`` gives lr, min_lr, warmup_steps, grad_clip, log_every and ckpt_every.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    step, nonfinite = 0, 0
    st = load_phase_state(ctx.run_dir, phase)
    if st is not None:
        try:
            modules.load_state_dict(st["model"])
            optimizer.load_state_dict(st["optimizer"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise MFError(f"the checkpoint of phase '{phase}' in {ctx.run_dir} does not fit this run's model: {exc}") from exc
        batches.load_state_dict(st["batches"])
        torch.set_rng_state(st["rng_cpu"])
        if "rng_cuda" in st and ctx.device.type == "cuda":
            torch.cuda.set_rng_state(st["rng_cuda"], ctx.device)
        step, nonfinite = int(st["step"]), int(st.get("nonfinite", 0))

    def save() -> None:
        state = {"phase": phase, "step": step, "model": modules.state_dict(), "optimizer": optimizer.state_dict(),
                 "batches": batches.state_dict(), "rng_cpu": torch.get_rng_state(), "nonfinite": nonfinite}
        if ctx.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(ctx.device)
        checkpoint.save_train_state(ctx.run_dir / PHASE_STATE, state)

    window: list[dict[str, float]] = []
    last: dict[str, float] = {}
    run_bad = 0
    t_last, n_last = time.perf_counter(), 0
    with ctx.progress(total, step) as bar:
        while step < total:
            lr = cosine_lr(step, total, lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            logs = step_fn(next(batches))
            clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            gnorm = torch.nn.utils.clip_grad_norm_(params, clip)
            if torch.isfinite(gnorm):
                optimizer.step()
                run_bad = 0
                window.append({k: float(v) for k, v in logs.items()} | {"grad_norm": float(gnorm), "lr": lr})
            else:  # a non-finite loss or gradient: skip the update, never save NaN weights
                optimizer.zero_grad(set_to_none=True)
                nonfinite += 1
                run_bad += 1
                if run_bad >= max_nonfinite:
                    raise MFError(f"phase '{phase}': the loss or its gradients were not finite for {run_bad} steps in a row "
                                  f"(step {step}); stopped without saving them. The last checkpoint in {ctx.run_dir} is intact. "
                                  f"Lower the phase's lr or set its grad_clip, then resume.")
            step += 1
            n_last += images_per_step
            stop = ctx.stop_requested
            if step % cfg.log_every == 0 or step == total or stop:
                now = time.perf_counter()
                rec: dict[str, Any] = {"phase": phase, "step": step, "nonfinite": nonfinite,
                                       "images_per_s": n_last / max(now - t_last, 1e-9)}
                if window:
                    for k in window[-1]:
                        rec[k] = sum(w[k] for w in window) / len(window)
                ctx.write(rec)
                last = {k: v for k, v in rec.items() if isinstance(v, (int, float))}
                shown = "  ".join(f"{k} {rec[k]:.4g}" for k in ("loss", "acc", "rel_err") if k in rec)
                bar.update(step, f"{shown}  {rec['images_per_s']:.0f} img/s")
                t_last, n_last, window = now, 0, []
            else:
                bar.update(step)
            if step % cfg.ckpt_every == 0 and step < total or stop:
                save()
            if stop:
                raise Interrupted(phase, step)
    return last


def clear_phase_state(run_dir: Path) -> None:
    """Drop the mid-phase checkpoint once the phase's result is safely written."""
    p = Path(run_dir) / PHASE_STATE
    if p.exists():
        p.unlink()
