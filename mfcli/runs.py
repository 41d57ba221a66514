"""Run directories: ``runs/NNNNN-<recipe>/`` with config.json, log.jsonl, checkpoints, images."""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from mfcli.errors import MFError

RUN_RE = re.compile(r"^(\d{5})-(.+)$")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either the old or the new content, never a torn file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_with(path: str | Path, write) -> None:
    """Like atomic_write_bytes, for writers that want a file name: ``write(tmp_path)``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_runs(runs_dir: str | Path) -> list[Path]:
    """Run directories under ``runs_dir``, oldest first (by their number)."""
    d = Path(runs_dir)
    if not d.is_dir():
        return []
    runs = [p for p in d.iterdir() if p.is_dir() and RUN_RE.match(p.name)]
    return sorted(runs, key=lambda p: int(RUN_RE.match(p.name).group(1)))


def new_run_dir(runs_dir: str | Path, name: str) -> Path:
    """Create the next ``NNNNN-name`` directory; never reuses an existing one."""
    d = Path(runs_dir)
    d.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"
    existing = list_runs(d)
    n = int(RUN_RE.match(existing[-1].name).group(1)) + 1 if existing else 1
    while True:
        p = d / f"{n:05d}-{safe}"
        try:
            p.mkdir()
            return p
        except FileExistsError:  # another process took this number
            n += 1


def newest_run(runs_dir: str | Path = "runs", need: str = "weights.safetensors") -> Path:
    """The newest run that has ``need`` in it; a clear error when there is none."""
    runs = [r for r in list_runs(runs_dir) if (r / need).exists()]
    if not runs:
        raise MFError(f"no run with {need} under '{runs_dir}/'. Train one first (`mf train recipes/quickstart.toml`) or pass a run directory or weights file.")
    return runs[-1]


def resolve_run(arg: str | None, runs_dir: str | Path = "runs") -> tuple[Path, Path]:
    """(run_dir, weights_file) for a run directory, a weights file, or None (newest run)."""
    if arg is None:
        run = newest_run(runs_dir)
        return run, run / "weights.safetensors"
    p = Path(arg)
    if p.is_dir():
        w = p / "weights.safetensors"
        if not w.exists():
            raise MFError(f"'{arg}' has no weights.safetensors: the run has not reached its first checkpoint yet.")
        return p, w
    if p.is_file():
        return p.parent, p
    raise MFError(f"'{arg}' is neither a run directory nor a weights file.")


def write_config(run_dir: Path, resolved: dict[str, Any], recipe_path: str, overrides: list[str]) -> None:
    from mfcli import __version__

    doc = {
        "mf_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "recipe": str(recipe_path),
        "overrides": list(overrides),
        "command": sys.argv,
        "config": resolved,
    }
    atomic_write_bytes(run_dir / "config.json", json.dumps(doc, indent=2).encode())


def read_config(run_dir: Path) -> dict[str, Any]:
    p = Path(run_dir) / "config.json"
    if not p.is_file():
        raise MFError(f"'{run_dir}' is not an mf run directory (no config.json).")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise MFError(f"{p} is damaged: {exc}.") from exc


class JsonlLog:
    """Append-only ``log.jsonl``: one JSON object per line, flushed as written."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_log(path: Path) -> list[dict[str, Any]]:
    if not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill: skip it
            continue
    return out
