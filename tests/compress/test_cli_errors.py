"""Bad input to `mf compress` is one paragraph and a non-zero exit, and leaves no run directory behind."""

import pytest

from helpers_compress import WEIGHTS, random_npz, run_main, tiny_recipe
from mftest import ROOT, run_mf


@pytest.fixture
def setup(tmp_path, shared_data, resnet_registered):
    npz = random_npz(tmp_path / "r.npz")
    recipe = tiny_recipe(tmp_path / "tiny.toml", npz)
    return tmp_path, recipe


def _w(name):
    return next(WEIGHTS.glob(f"{name}-*.th"))


W = ["--weights", "{w20}"]


@pytest.mark.parametrize("args,message", [
    (["resnet57", "--incubate", "1"], "Unknown ResNet 'resnet57'. Did you mean 'resnet56'?"),
    (["resnet20", "--incubate", "1,4", *W], "resnet20 has 3 stages, numbered 1 to 3; there is no stage 4"),
    (["resnet20", "--incubate", "0", *W], "there is no stage 0"),
    (["resnet20", "--incubate", "1,x", *W], "'x' is not a number"),
    (["resnet20", *W], "name the stages to incubate with --incubate"),
    (["resnet56", "--incubate", "1", *W], "do not fit a resnet56"),
    (["resnet20", "--incubate", "1", "--weights", "{tmp}/none.th"], "does not exist"),
    (["resnet20", "--incubate", "1", "--weights", "{tmp}/torn.th"], "truncated, corrupt"),
    (["resnet20", "--incubate", "1", *W, "data.path={tmp}/missing.npz"], "No such .npz file"),
    (["resnet20", "--incubate", "1", *W, "modules.stage4.hidden=8"], "resnet20 has 3 stages, numbered 1 to 3"),
    (["resnet20", "--incubate", "1", *W, "meta.stepz=3"], "unknown key 'stepz'. Did you mean 'steps'?"),
    (["resnet20", "--incubate", "1", *W, "--dataset", "npx"], "unknown dataset 'npx'. Did you mean 'npz'?"),
    (["resnet20", "--incubate", "1"], "no --weights given and"),
    # --dataset swaps the recipe's npz table for torchvision's CIFAR-10, keeping only keys it knows (hflip)
    (["resnet20", "--incubate", "1", *W, "--dataset", "cifar10", "data.root={tmp}/nodata", "data.download=false"],
     "CIFAR-10 (train split) was not found under"),
])
def test_bad_input_is_a_clear_error(setup, monkeypatch, capsys, args, message):
    tmp, recipe = setup
    w20 = _w("resnet20")
    (tmp / "torn.th").write_bytes(w20.read_bytes()[:5000])
    args = [a.replace("{tmp}", str(tmp)).replace("{w20}", str(w20)) for a in args]
    runs_dir = tmp / "runs"
    code, _, err = run_main(monkeypatch, capsys, "compress", *args, "--recipe", recipe, "--runs-dir", runs_dir)
    assert code == 2, err
    assert message in " ".join(err.split()), err
    assert "Traceback" not in err
    assert not runs_dir.exists() or not any(runs_dir.iterdir())  # validated before anything was written


def test_a_model_without_a_shipped_recipe_needs_recipe(setup, monkeypatch, capsys):
    tmp, _ = setup
    code, _, err = run_main(monkeypatch, capsys, "compress", "resnet20", "--incubate", "1", "--runs-dir", tmp / "runs")
    assert code == 2 and "there is no recipe compress_resnet20_cifar10; pass one with --recipe" in " ".join(err.split()), err
    assert "compress_resnet56_cifar10" in err


def test_resume_needs_a_compress_run(setup, monkeypatch, capsys):
    tmp, _ = setup
    code, _, err = run_main(monkeypatch, capsys, "compress", "--resume", tmp)
    assert code == 2 and "not an mf run directory" in err
    (tmp / "config.json").write_text('{"config": {"train": {}}}')
    code, _, err = run_main(monkeypatch, capsys, "compress", "--resume", tmp)
    assert code == 2 and "not one of `mf compress`" in err
    code, _, err = run_main(monkeypatch, capsys, "compress", "--resume", tmp, "resnet20")
    assert code == 2 and "give only --resume RUN_DIR" in err


def test_help_in_a_subprocess():
    out = run_mf("compress", "--help", check=0, cwd=ROOT).stdout
    for opt in ("--incubate", "--weights", "--dataset", "--recipe", "--resume"):
        assert opt in out
