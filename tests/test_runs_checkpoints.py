"""Run directories and atomic, safe checkpoints."""

import json
import os

import pytest
import torch

from mfcli import checkpoint, runs
from mfcli.errors import MFError


def test_run_dirs_are_numbered_and_never_reused(tmp_path):
    a = runs.new_run_dir(tmp_path, "quickstart")
    b = runs.new_run_dir(tmp_path, "quickstart")
    c = runs.new_run_dir(tmp_path, "my recipe/x")
    assert [p.name for p in (a, b, c)] == ["00001-quickstart", "00002-quickstart", "00003-my-recipe-x"]
    (tmp_path / "00007-old").mkdir()
    assert runs.new_run_dir(tmp_path, "q").name == "00008-q"
    assert runs.list_runs(tmp_path)[-1].name == "00008-q"


def test_newest_run_needs_weights(tmp_path):
    with pytest.raises(MFError, match="no run with weights"):
        runs.newest_run(tmp_path)
    a = runs.new_run_dir(tmp_path, "a")
    (a / "weights.safetensors").write_bytes(b"x")
    runs.new_run_dir(tmp_path, "b")  # newer, but no checkpoint yet
    assert runs.newest_run(tmp_path) == a
    assert runs.resolve_run(None, tmp_path) == (a, a / "weights.safetensors")
    with pytest.raises(MFError, match="neither a run directory nor a weights file"):
        runs.resolve_run(str(tmp_path / "nope"), tmp_path)


def test_config_json_records_version_and_overrides(tmp_path):
    from mfcli import __version__

    runs.write_config(tmp_path, {"train": {"steps": 3}}, "recipes/x.toml", ["train.steps=3"])
    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc["mf_version"] == __version__ and doc["overrides"] == ["train.steps=3"] and doc["config"]["train"]["steps"] == 3


def test_weights_roundtrip_and_metadata(tmp_path):
    state = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    p = tmp_path / "weights.safetensors"
    checkpoint.save_weights(p, state, {"train": {"steps": 1}}, step=7, shape=[2])
    loaded, meta = checkpoint.load_weights(p)
    assert torch.equal(loaded["a"], state["a"]) and torch.equal(loaded["b"], state["b"])
    assert meta["config"] == {"train": {"steps": 1}} and meta["step"] == 7 and meta["shape"] == [2]
    assert [f.name for f in tmp_path.iterdir()] == ["weights.safetensors"]  # no temp file left behind


def test_truncated_and_foreign_checkpoints_are_clear_errors(tmp_path):
    p = tmp_path / "w.safetensors"
    checkpoint.save_weights(p, {"a": torch.randn(100)}, {})
    data = p.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MFError, match="truncated or not a safetensors"):
        checkpoint.load_weights(tmp_path / "trunc.safetensors")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(MFError, match="not an mf checkpoint"):
        checkpoint.load_weights(tmp_path / "foreign.safetensors")
    with pytest.raises(MFError, match="does not exist"):
        checkpoint.load_weights(tmp_path / "missing.safetensors")


def test_atomic_write_keeps_old_file_when_writer_dies(tmp_path):
    p = tmp_path / "train_state.pt"
    checkpoint.save_train_state(p, {"step": 1})

    def dying_writer(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        runs.atomic_write_with(p, dying_writer)
    assert checkpoint.load_train_state(p) == {"step": 1}  # the previous checkpoint is intact
    assert sorted(os.listdir(tmp_path)) == ["train_state.pt"]  # and the partial temp file is gone


def test_train_state_is_weights_only_loadable(tmp_path):
    p = tmp_path / "train_state.pt"
    st = {"step": 3, "model": {"w": torch.ones(2)}, "rng_cpu": torch.get_rng_state(), "optimizer": torch.optim.Adam([torch.nn.Parameter(torch.ones(1))]).state_dict()}
    checkpoint.save_train_state(p, st)
    back = torch.load(p, weights_only=True)
    assert back["step"] == 3 and torch.equal(back["rng_cpu"], st["rng_cpu"])
    p.write_bytes(p.read_bytes()[:40])
    with pytest.raises(MFError, match="truncated or foreign"):
        checkpoint.load_train_state(p)


def test_jsonl_log_skips_torn_last_line(tmp_path):
    log = runs.JsonlLog(tmp_path / "log.jsonl")
    log.write({"step": 1})
    log.write({"step": 2})
    log.close()
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    assert [r["step"] for r in runs.read_log(tmp_path / "log.jsonl")] == [1, 2]
