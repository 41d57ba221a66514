"""Rich progress bar for training: step, loss, raw MSE, throughput and ETA."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from mfcli.console import console


class TrainProgress:
    def __init__(self, total: int, start: int = 0, disable: bool = False):
        self.disable = disable
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            disable=disable,
            transient=False,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, stats="")
        self.last_line = 0

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def update(self, step: int, rec: dict[str, Any] | None) -> None:
        if self.disable:
            return
        if rec is None:
            self.progress.update(self.task, completed=step)
            return
        stats = f"loss {rec.get('loss', float('nan')):.4g}  mse {rec.get('mse', float('nan')):.4g}  {rec['images_per_s']:.0f} img/s"
        self.progress.update(self.task, completed=step, stats=stats)
        if not console.is_terminal:  # logs and CI: a plain line per log step instead of a live bar
            console.print(f"step {step}: {stats}")
