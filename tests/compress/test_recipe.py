"""The compress recipe: shipped recipes validate; errors name the table and key and suggest the nearest."""

import textwrap
from pathlib import Path

import pytest

from mfcli.compress.recipe import load_compress_recipe, steps_of
from mfcli.config import load_recipe
from mfcli.errors import MFError

ROOT = Path(__file__).resolve().parents[2]

BASE = """
task = "compress"
[data]
name = "npz"
path = "x.npz"
[meta]
steps = 10
[modules]
default = {hidden = 32}
[modules.stage3]
hidden = 64
steps = 3
"""


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(textwrap.dedent(text))
    return p


@pytest.mark.parametrize("name", ["compress_resnet50_cifar10", "compress_resnet56_cifar10"])
def test_shipped_compress_recipes_validate(name):
    rec = load_compress_recipe(ROOT / "recipes" / f"{name}.toml")
    assert rec.data_name == "npz" and rec.data.path.endswith("cifar10_uint8.npz")
    res = rec.resolved()
    assert res["task"] == "compress"
    again = load_compress_recipe("x", raw=res)  # a run's config.json rebuilds the same recipe
    assert again.resolved() == res


def test_modules_merge_default_and_stage_tables(tmp_path):
    rec = load_compress_recipe(write(tmp_path, BASE))
    assert rec.modules.for_stage(1).hidden == 32 and rec.modules.for_stage(3).hidden == 64
    assert rec.modules.steps_for(1, 3) == 1  # not the last stage
    assert rec.modules.steps_for(2, 2) == 2  # the last stage: last_stage_steps
    assert rec.modules.steps_for(3, 3) == 3  # set explicitly
    assert rec.meta.steps == 10 and rec.meta.optimizer == "adamw"  # default filled in


def test_overrides_apply_and_are_validated(tmp_path):
    rec = load_compress_recipe(write(tmp_path, BASE), ["meta.lr=0.5", "modules.stage2.hidden=7", "meanflow.objective.norm_p=0.5"])
    assert rec.meta.lr == 0.5 and rec.modules.for_stage(2).hidden == 7 and rec.objective.norm_p == 0.5
    with pytest.raises(MFError, match=r"unknown section 'metta'.*Did you mean 'meta'"):
        load_compress_recipe(write(tmp_path, BASE), ["metta.lr=1"])


@pytest.mark.parametrize("edit,message", [
    (("steps = 10", "stepz = 10"), r"\[meta\]: unknown key 'stepz'.*Did you mean 'steps'"),
    (("steps = 10", 'steps = "ten"'), r"\[meta\] steps: expected int, got str 'ten'"),
    (("steps = 10", "steps = 10\nepochs = 2"), r"give steps or epochs, not both"),
    (("hidden = 64", "hiden = 64"), r"\[modules.stage3\]: unknown key 'hiden'.*Did you mean 'hidden'"),
    (("[modules.stage3]", "[modules.stag3]"), r"unknown key 'stag3'.*Did you mean 'stage3'"),
    (("default = {hidden = 32}", "default = {hidden = 32, align_kernel = 5}"), r"align_kernel must be 1 or 3"),
    (("hidden = 64", 'hidden = 64\nnet = "resnet"'), r"net must be 'mlp' or 'conv', got 'resnet'"),
    (("hidden = 64", "hidden = 64\ntrain_steps = -1"), r"train_steps must be 0 \(use \[meanflow\]\) or more, got -1"),
    (('name = "npz"', 'name = "nzp"'), r"unknown dataset 'nzp'.*Did you mean 'npz'"),
    (("[meta]", "[dropin]\nnum_images = -5\nsteps = 3\n[meta]"), r"\[dropin\].*num_images must be 0 \(the whole training split\) or more, got -5"),
    (("[meta]", "[dropin]\ndistill = 1.5\n[meta]"), r"\[dropin\].*need 0 <= distill <= 1"),
    (("[meta]", "[dropin]\nfeature_weight = -0.5\n[meta]"), r"\[dropin\].*feature_weight must be 0 \(off\) or more, got -0.5"),
    (("[meta]", "[incubate]\nprogressive = 1\n[meta]"), r"\[incubate\] progressive: expected bool"),
    (('path = "x.npz"', 'path = "x.npz"\nroot = "y"'), r"\[data\] \(dataset 'npz'\): unknown key 'root'"),
    (("[meta]", "[metta]"), r"unknown table \[metta\].*Did you mean 'meta'"),
    (('task = "compress"', ""), r"not a compress recipe"),
])
def test_errors_name_the_key(tmp_path, edit, message):
    with pytest.raises(MFError, match=message):
        load_compress_recipe(write(tmp_path, BASE.replace(*edit)))


def test_meanflow_objective_is_validated_against_the_registered_mf_config(tmp_path):
    text = BASE + "[meanflow.objective]\nnorm_pp = 1.0\n"
    with pytest.raises(MFError, match=r"\[meanflow.objective\] \(objective 'mf'\): unknown key 'norm_pp'.*Did you mean 'norm_p'"):
        load_compress_recipe(write(tmp_path, text))


def test_train_and_compress_recipes_refuse_each_other(tmp_path):
    with pytest.raises(MFError, match="is a compress recipe.*mf compress"):
        load_recipe(ROOT / "recipes" / "compress_resnet56_cifar10.toml")
    with pytest.raises(MFError, match="not a compress recipe"):
        load_compress_recipe(ROOT / "recipes" / "quickstart.toml")


def test_steps_of_epochs_and_steps(tmp_path):
    rec = load_compress_recipe(write(tmp_path, BASE.replace("steps = 10", "epochs = 1.5\nbatch_size = 100")))
    assert steps_of(rec.meta, 1000) == 15
    assert steps_of(rec.incubate, 1000) == 0  # neither given: the phase is skipped
