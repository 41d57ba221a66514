"""Helpers shared by the tests (importable as `mftest`: pytest puts tests/ on sys.path)."""
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MF_SHARED_DATA", ROOT.parent / "shared" / "data"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


def run_mf(*args, cwd=None, env=None, timeout=600, check=None):
    """Run the installed `mf` in a subprocess; returns CompletedProcess with text output."""
    e = dict(os.environ)
    e.pop("MF_DEBUG", None)
    e["COLUMNS"] = "200"
    e.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "mfcli", *map(str, args)], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


