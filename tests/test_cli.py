"""The command line: help, version, and every error path is one paragraph with a non-zero exit."""

import pytest

from mfcli import __version__

from mftest import ROOT, run_mf


def test_version_and_help():
    assert run_mf("--version", check=0).stdout.strip() == f"mf {__version__}"
    top = run_mf("--help", check=0).stdout
    for cmd in ("train", "sample", "eval", "compress", "plugins", "recipes"):
        assert cmd in top
    assert "--install-completion" in top  # shell completion through Typer's usual option
    for cmd in (["train"], ["sample"], ["eval"], ["compress"], ["plugins"], ["recipes", "show"]):
        out = run_mf(*cmd, "--help", check=0).stdout
        assert "Usage" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "no/such/recipe.toml"], "no recipe 'no/such/recipe.toml'"),
        (["train"], "name a recipe"),
        (["train", "quickstart", "train.stepz=3"], "Did you mean 'steps'"),
        (["train", "quickstart", "train.steps=0", "--runs-dir", "{tmp}/runs"], "train.steps must be at least 1"),
        (["train", "--resume", "{tmp}"], "not an mf run directory"),
        (["sample", "--runs-dir", "{tmp}/none"], "no run with weights.safetensors"),
        (["sample", "--nfe", "0"], "--nfe must be at least 1"),
        (["sample", "--nfe", "2", "--timesteps", "1,0"], "need 3"),
        (["sample", "{tmp}/missing.safetensors"], "neither a run directory nor a weights file"),
        (["recipes", "show", "quikstart"], "Did you mean 'quickstart'"),
    ],
)
def test_errors_are_one_paragraph(tmp_path, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = run_mf(*args, cwd=ROOT)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    p = tmp_path / "weights.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    proc = run_mf("sample", p)
    assert proc.returncode == 2 and "cannot be read" in proc.stderr and "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(tmp_path):
    proc = run_mf("--debug", "sample", "--runs-dir", tmp_path)
    assert proc.returncode == 2 and "Traceback" in proc.stderr
