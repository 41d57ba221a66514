"""Shared by the compress tests: tiny datasets, a tiny recipe and running the CLI in-process."""

import sys
import textwrap
from pathlib import Path

import numpy as np

from mftest import SHARED_DATA

WEIGHTS = SHARED_DATA / "resnet_cifar10"
CIFAR = SHARED_DATA / "cifar10" / "cifar10_uint8.npz"


def random_npz(path: Path, n_train=64, n_test=32, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x_train=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8), y_train=rng.integers(0, 10, n_train).astype(np.uint8),
             x_test=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), y_test=rng.integers(0, 10, n_test).astype(np.uint8))
    return path


def cifar_subset(path: Path, n_train=512, n_test=200, seed=0) -> Path:
    """A random (class-mixed: the file is sorted by class) subset of the real CIFAR-10 arrays."""
    d = np.load(CIFAR)
    rng = np.random.default_rng(seed)
    tr = rng.permutation(len(d["y_train"]))[:n_train]
    te = rng.permutation(len(d["y_test"]))[:n_test]
    np.savez(path, x_train=d["x_train"][tr], y_train=d["y_train"][tr], x_test=d["x_test"][te], y_test=d["y_test"][te])
    return path


def tiny_recipe(path: Path, npz: Path, *, steps=4, pairs=128, extra: str = "") -> Path:
    """A few steps per phase: for tests of the machinery, not of accuracy."""
    path.write_text(textwrap.dedent(f"""
        task = "compress"
        [run]
        threads = 1
        [data]
        name = "npz"
        path = "{npz}"
        hflip = true
        [pairs]
        num_images = {pairs}
        batch_size = 64
        [meanflow]
        steps = {steps}
        batch_size = 32
        log_every = 1
        ckpt_every = 2
        [meanflow.objective]
        time_sampler = "uniform"
        ratio_r_neq_t = 0.5
        [modules]
        default = {{hidden = 16, time_dim = 4}}
        [meta]
        steps = {steps}
        batch_size = 32
        log_every = 1
        ckpt_every = 2
        [incubate]
        steps = {steps}
        batch_size = 32
        log_every = 1
        ckpt_every = 2
        [finetune]
        steps = {steps}
        batch_size = 32
        distill = 0.5
        log_every = 1
        ckpt_every = 2
        [eval]
        batch_size = 100
        speed_batch_size = 16
        speed_rounds = 1
        """) + textwrap.dedent(extra))
    return path


def run_main(monkeypatch, capsys, *args):
    """``mf ARGS`` in this process (the CLI's own error handling included): (exit code, stdout, stderr)."""
    from mfcli.cli import main

    monkeypatch.setattr(sys, "argv", ["mf", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err
