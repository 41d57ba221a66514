"""The plugin system: built-ins via entry points, a real third-party distribution, clear errors."""

import json
import os
import subprocess
import sys
import textwrap
import types
from dataclasses import dataclass

import pytest

from mfcli import hookimpl
from mfcli.errors import MFError
from mfcli.plugins import load_registry

from mftest import run_mf


def test_builtins_are_registered_through_entry_points():
    import importlib.metadata as md

    eps = {ep.name: ep.value for ep in md.entry_points(group="mf")}
    assert {"objectives": "mf_objectives", "backbones": "mf_backbones", "datasets": "mf_datasets"}.items() <= eps.items()
    reg = load_registry()
    assert {"mf", "fm"} <= set(reg.components["objectives"])
    assert "mlp" in reg.components["backbones"] and "toy" in reg.components["datasets"]
    assert reg.get("backbones", "mlp").plugin == "backbones"


@dataclass
class _Cfg:
    n: int = 1


def _plugin(**hooks):
    mod = types.ModuleType("fake_plugin")
    for name, fn in hooks.items():
        setattr(mod, name, hookimpl(fn))
    return mod


def test_duplicate_name_is_an_error_naming_both_plugins():
    def register_datasets(register):
        register("toy", object, _Cfg)

    with pytest.raises(MFError, match=r"duplicate dataset name 'toy': registered by plugin 'datasets' and again by plugin 'dup'"):
        load_registry(extra_plugins={"dup": _plugin(register_datasets=register_datasets)})


def test_misspelled_hook_is_an_error_with_suggestion():
    def register_objectivs(register):
        pass

    with pytest.raises(MFError, match=r"plugin 'typo' implements an unknown hook 'register_objectivs'.*Did you mean 'register_objectives'"):
        load_registry(extra_plugins={"typo": _plugin(register_objectivs=register_objectivs)})


def test_config_must_be_a_dataclass():
    def register_backbones(register):
        register("x", object, dict)

    with pytest.raises(MFError, match="not a dataclass"):
        load_registry(extra_plugins={"bad": _plugin(register_backbones=register_backbones)})


def test_unknown_component_suggests():
    reg = load_registry()
    with pytest.raises(MFError, match=r"unknown objective 'mff'.*Did you mean 'mf'"):
        reg.get("objectives", "mff")


PLUGIN_SRC = '''
"""A third-party mf plugin: a 2-D ring dataset."""
from dataclasses import dataclass
import math
import torch
from mfcli import hookimpl

__version__ = "0.3.1"

@dataclass
class RingConfig:
    radius: float = 1.5
    num_points: int = 4096

class Ring(torch.utils.data.Dataset):
    num_classes = 0
    shape = (2,)
    def __init__(self, cfg, *, split="train"):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        a = torch.rand(cfg.num_points, generator=g) * 2 * math.pi
        self.points = torch.stack([torch.cos(a), torch.sin(a)], 1) * cfg.radius
    def __len__(self):
        return len(self.points)
    def __getitem__(self, i):
        return self.points[i], 0
    def tensors(self):
        return self.points, torch.zeros(len(self.points), dtype=torch.long)

@hookimpl
def register_datasets(register):
    register("ring", Ring, RingConfig, help="points on a circle")
'''


def _build_dist(tmp_path, name, module, source, ep_name=None):
    src = tmp_path / f"src_{name}"
    (src / module).mkdir(parents=True)
    (src / module / "__init__.py").write_text(source)
    (src / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{name}"
        version = "0.3.1"
        [project.entry-points.mf]
        {ep_name or name} = "{module}"
        [tool.setuptools]
        packages = ["{module}"]
    """))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(src)], check=True, capture_output=True, text=True)
    return site


@pytest.mark.slow
def test_third_party_plugin_distribution_is_discovered_and_usable(tmp_path):
    site = _build_dist(tmp_path, "mf-ring", "mf_ring", PLUGIN_SRC, ep_name="ring")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    listing = json.loads(run_mf("plugins", "--json", env=env, check=0).stdout)
    ring = [p for p in listing if p["name"] == "ring"]
    assert ring and ring[0]["distribution"] == "mf-ring" and ring[0]["version"] == "0.3.1"
    assert ring[0]["components"] == {"datasets": ["ring"]}
    table = run_mf("plugins", env=env, check=0).stdout
    assert "mf-ring" in table and "ring" in table

    recipe = tmp_path / "ring.toml"
    recipe.write_text(textwrap.dedent("""
        [data]
        name = "ring"
        radius = 2.0
        batch_size = 64
        [backbone]
        name = "mlp"
        width = 32
        depth = 2
        [objective]
        name = "fm"
        [train]
        steps = 4
        log_every = 2
        ema_decays = [0.9]
        tensorboard = false
    """))
    run_mf("recipes", "validate", recipe, env=env, check=0)
    bad = run_mf("recipes", "validate", recipe, "data.raduis=1", env=env, check=2)
    assert "Did you mean 'radius'" in bad.stderr
    run_mf("train", recipe, "--runs-dir", tmp_path / "runs", env=env, check=0, cwd=tmp_path)
    assert (tmp_path / "runs" / "00001-ring" / "weights.safetensors").is_file()
    # without the plugin on the path the recipe names an unknown dataset
    missing = run_mf("recipes", "validate", recipe, check=2)
    assert "unknown dataset 'ring'" in missing.stderr


@pytest.mark.slow
def test_plugin_that_fails_to_import_is_named(tmp_path):
    site = _build_dist(tmp_path, "mf-broken", "mf_broken", "raise ImportError('needs libfoo')\n", ep_name="broken")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    proc = run_mf("plugins", env=env, check=2)
    assert "plugin 'broken'" in proc.stderr and "mf-broken" in proc.stderr and "needs libfoo" in proc.stderr
    assert "Traceback" not in proc.stderr
