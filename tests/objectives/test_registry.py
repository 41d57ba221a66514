"""Every objective registers through the plugin hook and builds from its default config."""

import dataclasses

import pytest
import torch
from helpers_objectives import TinyNet

import mf_objectives
from mfcli.api import GUIDANCE_MODES


def _registered():
    out = {}
    mf_objectives.register_objectives(lambda name, factory, config, help="": out.__setitem__(name, (factory, config,
                                                                                                    help)))
    return out


def test_all_objectives_registered():
    assert set(_registered()) == {"fm", "mf", "imf", "mmf", "splitmf"}


@pytest.mark.parametrize("name", ["fm", "mf", "imf", "mmf", "splitmf"])
@pytest.mark.parametrize("num_classes", [0, 3])
def test_build_from_default_config_and_step(name, num_classes):
    factory, config, help_text = _registered()[name]
    assert dataclasses.is_dataclass(config) and help_text
    obj = factory(config(), num_classes=num_classes)
    assert obj.guidance in GUIDANCE_MODES
    net = TinyNet(num_classes=num_classes)
    x = torch.randn(16, 2, 3, dtype=torch.float64)
    y = torch.randint(0, num_classes, (16,)) if num_classes else None
    loss, logs = obj.loss(net, x, y, step=0)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss) and "mse" in logs
    assert all(torch.is_tensor(v) and v.dim() == 0 and not v.requires_grad for v in logs.values())


@pytest.mark.parametrize("name", ["fm", "mf", "imf", "mmf", "splitmf"])
def test_step_under_bf16_autocast(name):
    from mf_backbones.mlp import MLP, MLPConfig

    factory, config, _ = _registered()[name]
    kwargs = {"cfg_omega": 2.0} if name in ("mf", "mmf") else {}
    obj = factory(config(**kwargs), num_classes=3)
    if name == "imf":
        net = TinyNet(shape=(2,), num_classes=3).float()
    else:
        net = MLP(MLPConfig(width=32, depth=2), shape=(2,), num_classes=3)
    x, y = torch.randn(32, 2), torch.randint(0, 3, (32,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = obj.loss(net, x, y)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
