"""The training engine: exact resume, signals, non-finite losses, DDP gradient synchronisation."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from dataclasses import dataclass

import pytest
import torch

from mfcli import hookimpl
from mfcli.checkpoint import load_weights
from mfcli.config import load_recipe
from mfcli.engine import Dist, Trainer, launch, lr_at
from mfcli.errors import MFError
from mfcli.plugins import load_registry

from mftest import ROOT

RECIPE = """
[data]
name = "toy"
distribution = "8gaussians"
num_points = 4096
batch_size = 64
[backbone]
name = "mlp"
width = 32
depth = 2
[objective]
name = "mf"
[train]
steps = 8
lr = 1e-3
ckpt_every = 4
log_every = 2
ema_decays = [0.9, 0.99]
tensorboard = false
"""


def recipe(tmp_path, *overrides, text=RECIPE, reg=None):
    p = tmp_path / "r.toml"
    p.write_text(textwrap.dedent(text))
    return load_recipe(p, list(overrides), registry=reg)


def test_lr_schedule():
    from mfcli.config import TrainConfig

    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, schedule="cosine", min_lr=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(50, TrainConfig(steps=100, lr=0.3)) == 0.3


def test_ema_matches_hand_computation():
    from mfcli.engine import EMA

    net = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(1.0)
    ema = EMA(net, [0.5])
    with torch.no_grad():
        net.weight.fill_(3.0)
    ema.update(net)  # 0.5 * 1 + 0.5 * 3
    assert torch.allclose(ema.shadows[0]["weight"], torch.full((1, 2), 2.0))
    ema.update(net, every=2)  # decay 0.25: 0.25 * 2 + 0.75 * 3
    assert torch.allclose(ema.shadows[0]["weight"], torch.full((1, 2), 2.75))


def test_resume_is_bit_identical(tmp_path):
    straight = launch(recipe(tmp_path), nprocs=1, runs_dir=str(tmp_path / "a"))
    half = launch(recipe(tmp_path, "train.steps=4"), nprocs=1, runs_dir=str(tmp_path / "b"))
    from mfcli import runs
    from mfcli.config import recipe_from_resolved, apply_overrides

    resumed_recipe = recipe_from_resolved(apply_overrides(runs.read_config(half)["config"], ["train.steps=8"]))
    launch(resumed_recipe, nprocs=1, run_dir=half, resume=True)
    for name in ("weights.safetensors", "weights_raw.safetensors"):
        a, _ = load_weights(straight / name)
        b, meta = load_weights(half / name)
        assert meta["step"] == 8
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    log = [r["step"] for r in __import__("mfcli.runs", fromlist=["read_log"]).read_log(half / "log.jsonl")]
    assert log == [2, 4, 6, 8]
    with pytest.raises(MFError, match="already finished"):
        launch(resumed_recipe, nprocs=1, run_dir=half, resume=True)


def test_compiled_backbone_trains_like_the_eager_one(tmp_path):
    """train.compile = true: the MeanFlow steps (JVP included) through torch.compile give the
    eager run's weights (up to float rounding of fused kernels)."""
    eager = launch(recipe(tmp_path, "train.steps=4"), nprocs=1, runs_dir=str(tmp_path / "eager"))
    compiled = launch(recipe(tmp_path, "train.steps=4", "train.compile=true"), nprocs=1, runs_dir=str(tmp_path / "compiled"))
    a, _ = load_weights(eager / "weights_raw.safetensors")
    b, _ = load_weights(compiled / "weights_raw.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    fresh = launch(recipe(tmp_path, "train.steps=1"), nprocs=1, runs_dir=str(tmp_path / "one"))
    c, _ = load_weights(fresh / "weights_raw.safetensors")
    assert any(not torch.allclose(c[k], a[k], rtol=1e-5, atol=1e-6) for k in a)  # 4 steps moved the weights


@dataclass
class _NaNCfg:
    nan_from: int = 3  # first step whose loss is NaN
    nan_until: int = 10**9  # first step whose loss is finite again


class _NaNObjective:
    """Flow matching whose loss is NaN for steps in [nan_from, nan_until)."""

    guidance = "none"

    def __init__(self, cfg, *, num_classes=0):
        from mf_objectives.flow_matching import FlowMatching, FMConfig

        self.cfg, self.inner = cfg, FlowMatching(FMConfig(), num_classes=num_classes)

    def loss(self, net, x, y=None, *, step=0, **kw):
        loss, logs = self.inner.loss(net, x, y, step=step, **kw)
        if self.cfg.nan_from <= step < self.cfg.nan_until:
            loss = loss * float("nan")
        return loss, logs


def _nan_registry():
    mod = types.ModuleType("nanplug")

    @hookimpl
    def register_objectives(register):
        register("nan-fm", _NaNObjective, _NaNCfg)

    mod.register_objectives = register_objectives
    return load_registry(extra_plugins={"nanplug": mod})


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    reg = _nan_registry()
    r = recipe(tmp_path, "objective.name=nan-fm", "objective.nan_from=2", "objective.nan_until=5", "train.max_nonfinite=10", reg=reg)
    tr = Trainer(r, tmp_path, reg=reg)
    tr.fit()
    assert tr.step == 8 and tr.nonfinite_total == 3
    assert all(torch.isfinite(v).all() for v in tr.net.state_dict().values())


def test_persistent_nonfinite_loss_stops_without_saving_nan_weights(tmp_path):
    reg = _nan_registry()
    r = recipe(tmp_path, "objective.name=nan-fm", "objective.nan_from=5", "train.max_nonfinite=3", "train.steps=20", reg=reg)
    tr = Trainer(r, tmp_path, reg=reg)
    with pytest.raises(MFError, match="not finite for 3 steps in a row"):
        tr.fit()
    state, meta = load_weights(tmp_path / "weights.safetensors")
    assert meta["step"] == 4  # the last good checkpoint (ckpt_every = 4) is all that was written
    assert all(torch.isfinite(v).all() for v in state.values())


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 130)])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, sig, code):
    p = tmp_path / "r.toml"
    p.write_text(textwrap.dedent(RECIPE))
    env = dict(os.environ, COLUMNS="200")
    proc = subprocess.Popen([sys.executable, "-m", "mfcli", "train", str(p), "train.steps=1000000", "train.ckpt_every=1000000", "train.log_every=1"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "runs" / "00001-r" / "log.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and log.stat().st_size > 0):
        time.sleep(0.2)
    assert log.exists(), proc.communicate(timeout=60)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "checkpoint saved" in err and "mf train --resume" in err
    _, meta = load_weights(tmp_path / "runs" / "00001-r" / "weights.safetensors")
    assert 1 <= meta["step"] < 1000000


# ------------------------------------------------------------------------------------------
# DDP: 2 processes, gloo, CPU
# ------------------------------------------------------------------------------------------
@dataclass
class _PinnedCfg:
    ratio_r_neq_t: float = 0.5


class _PinnedMF:
    """MeanFlow whose (t, r, noise) are functions of the data point, so that a sample gets the same
    draws whichever rank sees it: the DDP run and the single-process run then see identical losses."""

    guidance = "none"

    def __init__(self, cfg, *, num_classes=0):
        from mf_objectives.meanflow import MeanFlow, MFConfig

        self.inner = MeanFlow(MFConfig(ratio_r_neq_t=cfg.ratio_r_neq_t), num_classes=num_classes)

    def loss(self, net, x, y=None, *, step=0):
        key = (x * 7.31 + step).sum(1)
        a, b = torch.sigmoid(torch.sin(key * 13.7) * 2), torch.sigmoid(torch.cos(key * 5.3) * 2)
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        r = torch.where(torch.sin(key * 3.1) > 0, t, r)  # about half with r = t
        noise = torch.stack([torch.sin(key * 11.1 + i) * 1.5 for i in range(x.shape[1])], 1)
        return self.inner.loss(net, x, y, step=step, t=t, r=r, noise=noise)


def _pinned_registry():
    mod = types.ModuleType("pinplug")

    @hookimpl
    def register_objectives(register):
        register("pinned-mf", _PinnedMF, _PinnedCfg)

    mod.register_objectives = register_objectives
    return load_registry(extra_plugins={"pinplug": mod})


def _ddp_worker(rank, world_size, port, recipe_path, overrides, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        reg = _pinned_registry()
        r = load_recipe(recipe_path, overrides, registry=reg)
        tr = Trainer(r, out_dir / f"rank{rank}", dist_info=Dist(rank, world_size, rank), reg=reg, device="cpu")
        (out_dir / f"rank{rank}").mkdir(exist_ok=True)
        tr.fit()
        torch.save({k: v.clone() for k, v in tr.net.state_dict().items()}, out_dir / f"params{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_match_single_process_on_the_concatenated_batch(tmp_path):
    import torch.multiprocessing as mp

    from mfcli.engine import free_port

    p = tmp_path / "r.toml"
    p.write_text(textwrap.dedent(RECIPE))
    overrides = ["objective.name=pinned-mf", "train.steps=6", "train.ckpt_every=100", "train.grad_clip=1.0"]
    mp.spawn(_ddp_worker, args=(2, free_port(), p, overrides, tmp_path), nprocs=2, join=True)
    p0, p1 = (torch.load(tmp_path / f"params{i}.pt", weights_only=True) for i in (0, 1))

    reg = _pinned_registry()
    single = Trainer(load_recipe(p, overrides, registry=reg), tmp_path / "single", reg=reg, device="cpu")
    (tmp_path / "single").mkdir()
    init = {k: v.clone() for k, v in single.net.state_dict().items()}
    single.fit()
    for k, v in single.net.state_dict().items():
        assert torch.equal(p0[k], p1[k]), f"ranks disagree on {k}"
        assert not torch.equal(v, init[k]), f"{k} did not train"
        torch.testing.assert_close(p0[k], v, rtol=1e-5, atol=1e-6, msg=f"DDP differs from the single-process run on {k}")
