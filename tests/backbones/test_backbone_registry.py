"""The backbones register through the plugin hook with config dataclasses, and honour the component shape
of mfcli.api (forward(z, t, h, cond), num_classes, conditions, has_v_head)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mf_backbones


def registered() -> dict:
    found = {}

    def register(name, factory, config, help=""):
        assert name not in found, f"duplicate backbone {name}"
        found[name] = (factory, config, help)

    mf_backbones.register_backbones(register)
    return found


def test_all_backbones_register_with_documented_configs():
    found = registered()
    assert {"mlp", "dit", "dit-ic", "unet", "resnet"} <= set(found)
    for name, (factory, config, help_text) in found.items():
        assert callable(factory) and help_text, name
        assert dataclasses.is_dataclass(config)
        config()  # every field has a default


TINY = {
    "dit": dict(variant="DiT-S/2", depth=1, hidden=32, heads=4),
    "dit-ic": dict(depth=2, head_depth=1, hidden=32, heads=4),
    "unet": dict(variant="UNet-XS", channels=8),
}


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("num_classes", [0, 10])
def test_generative_backbones_follow_the_component_shape(name, num_classes):
    factory, config, _ = registered()[name]
    model = factory(config(**TINY[name]), shape=(3, 16, 16), num_classes=num_classes)
    assert model.num_classes == num_classes
    assert isinstance(model.conditions, frozenset) and isinstance(model.has_v_head, bool)
    assert ("y" in model.conditions) == bool(num_classes)
    z = torch.randn(2, 3, 16, 16)
    cond = {"y": torch.tensor([0, num_classes])} if num_classes else None
    assert model(z, torch.rand(2), torch.rand(2), cond).shape == z.shape
    if model.has_v_head:
        u, v = model(z, torch.rand(2), torch.rand(2), {**(cond or {}), "return_v": True})
        assert u.shape == v.shape == z.shape


def test_resnet_component_is_a_classifier():
    factory, config, _ = registered()["resnet"]
    assert factory.task == "classify"
    model = factory(config(arch="resnet20"), shape=(3, 32, 32), num_classes=10)
    assert model.task == "classify" and model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
