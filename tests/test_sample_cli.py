"""`mf sample` on tiny trained models: classes, guidance kinds, schedules and the error paths."""

import math
import textwrap

import numpy as np
import pytest
import torch

from mfcli.config import load_recipe
from mfcli.engine import launch
from mfcli.sampling import draw, load_model

from mftest import run_mf

TOY = """
[data]
name = "toy"
distribution = "8gaussians"
conditional = {cond}
num_points = 8192
batch_size = 256
[backbone]
name = "mlp"
width = 128
depth = 3
[objective]
name = "{objective}"
{objective_extra}
[train]
steps = {steps}
lr = 2e-3
log_every = 100
ckpt_every = 100000
ema_decays = [0.99]
tensorboard = false
"""


def _train(tmp_path_factory, name, **kw):
    d = tmp_path_factory.mktemp(name)
    p = d / f"{name}.toml"
    p.write_text(textwrap.dedent(TOY.format(**kw)))
    return launch(load_recipe(p), nprocs=1, runs_dir=str(d / "runs"))


@pytest.fixture(scope="module")
def cond_fm(tmp_path_factory):
    return _train(tmp_path_factory, "cond_fm", cond="true", objective="fm", objective_extra="", steps=600)


@pytest.fixture(scope="module")
def folded_mf(tmp_path_factory):
    return _train(tmp_path_factory, "folded_mf", cond="true", objective="mf", objective_extra="cfg_omega = 2.0", steps=20)


@pytest.fixture(scope="module")
def uncond_mf(tmp_path_factory):
    return _train(tmp_path_factory, "uncond_mf", cond="false", objective="mf", objective_extra="", steps=20)


def _centers():
    k = torch.arange(8, dtype=torch.float64)
    return torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], 1) * 2.0


@pytest.mark.slow
def test_class_selection_puts_samples_on_that_mode(cond_fm, tmp_path):
    proc = run_mf("sample", cond_fm, "--class", "3", "--num", "400", "--nfe", "8", "--out", tmp_path, check=0)
    x = torch.from_numpy(np.load(tmp_path / "samples.npz")["samples"]).double()
    labels = np.load(tmp_path / "samples.npz")["labels"]
    assert (labels == 3).all()
    nearest = torch.cdist(x, _centers()).argmin(1)
    assert (nearest == 3).double().mean() > 0.8, torch.bincount(nearest, minlength=8)
    assert "samples/s" in proc.stderr


@pytest.mark.slow
def test_classes_range_spreads_labels_evenly(cond_fm, tmp_path):
    run_mf("sample", cond_fm, "--classes", "0-3", "--num", "8", "--out", tmp_path, check=0)
    assert np.load(tmp_path / "samples.npz")["labels"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3]


@pytest.mark.slow
def test_classic_cfg_costs_two_evaluations_and_says_so(cond_fm, tmp_path):
    proc = run_mf("sample", cond_fm, "--guidance", "3", "--num", "16", "--out", tmp_path, check=0)
    assert "classifier-free guidance 3.0: 2 network evaluations per step" in proc.stderr
    m = load_model(cond_fm / "weights.safetensors")
    calls = []
    net = m.net
    m.net.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    g = lambda: torch.Generator().manual_seed(0)
    plain, _ = draw(net, m.objective, m.shape, m.num_classes, num=16, nfe=2, generator=g())
    guided, _ = draw(net, m.objective, m.shape, m.num_classes, num=16, nfe=2, generator=g(), guidance=3.0)
    assert calls == [16, 16, 32, 32]  # one batched call per step, twice the batch with guidance
    assert not torch.allclose(plain, guided)


@pytest.mark.slow
def test_folded_guidance_is_reported_and_not_applied_twice(folded_mf, tmp_path):
    proc = run_mf("sample", folded_mf, "--num", "4", "--out", tmp_path, check=0)
    assert "folded into this model at training (effective scale 2.0)" in proc.stderr
    proc = run_mf("sample", folded_mf, "--guidance", "5", "--num", "4", "--out", tmp_path, check=0)
    assert "cannot change it and is ignored" in proc.stderr


@pytest.mark.slow
def test_schedules_and_raw_weights(uncond_mf, tmp_path):
    run_mf("sample", uncond_mf, "--nfe", "2", "--timesteps", "1,0.3,0", "--num", "10", check=0)
    assert (uncond_mf / "samples" / "nfe2-seed0" / "samples.npz").is_file()
    run_mf("sample", uncond_mf, "--raw", "--num", "10", check=0)
    a = np.load(uncond_mf / "samples" / "nfe1-seed0-raw" / "samples.npz")["samples"]
    assert a.shape == (10, 2) and np.isfinite(a).all()


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--guidance", "2"], "guidance needs a class-conditional model"),
        (["--class", "1"], "unconditional: it has no classes"),
        (["--nfe", "0"], "--nfe must be at least 1"),
        (["--num", "0"], "--num must be at least 1"),
        (["--guidance-interval", "0.2,0.8"], "only to models that take the guidance interval"),
        (["--guidance-interval", "0.8,0.2"], "0 <= t_min <= t_max <= 1"),
    ],
)
def test_unconditional_model_errors(uncond_mf, args, message):
    proc = run_mf("sample", uncond_mf, *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_class_out_of_range(cond_fm):
    proc = run_mf("sample", cond_fm, "--class", "9")
    assert proc.returncode == 2 and "class 9 does not exist: this model has classes 0-7" in proc.stderr
