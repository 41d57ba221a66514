"""eval.json next to a run, and the results table."""

import json
import os

import numpy as np
import pytest
import torch
from rich.console import Console

from mfcli.errors import MFError
from mfcli.metrics import read_eval_json, results_table, write_eval_json
from mfcli.metrics import report


def test_results_merge_into_eval_json(tmp_path):
    write_eval_json(tmp_path, {"fd_resnet56": np.float64(12.5), "sample": {"nfe": 1, "omega": 2.0}})
    path = write_eval_json(tmp_path, {"fid_clean": torch.tensor(3.25), "sample": {"num": np.int64(50000)}})
    assert path == os.path.join(tmp_path, "eval.json")
    with open(path) as f:
        stored = json.load(f)
    assert stored == {"fd_resnet56": 12.5, "fid_clean": 3.25, "sample": {"nfe": 1, "omega": 2.0, "num": 50000}}
    assert read_eval_json(tmp_path) == stored
    write_eval_json(tmp_path, {"fid_clean": 3.0})
    assert read_eval_json(tmp_path)["fid_clean"] == 3.0  # a new value replaces the old one


def test_non_finite_values_become_null_so_the_file_stays_valid_json(tmp_path):
    write_eval_json(tmp_path, {"a": float("nan"), "b": np.float32("inf")})
    text = open(os.path.join(tmp_path, "eval.json")).read()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")) == {"a": None, "b": None}


def test_a_failed_write_leaves_the_previous_file_and_no_temp_files(tmp_path, monkeypatch):
    write_eval_json(tmp_path, {"a": 1})
    before = open(os.path.join(tmp_path, "eval.json")).read()

    def broken_dump(obj, f, **kw):
        f.write('{"a": ')  # half written, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(report.json, "dump", broken_dump)
    with pytest.raises(KeyboardInterrupt):
        write_eval_json(tmp_path, {"b": 2})
    assert open(os.path.join(tmp_path, "eval.json")).read() == before
    assert os.listdir(tmp_path) == ["eval.json"]


def test_damaged_eval_json_is_reported_not_overwritten(tmp_path):
    (tmp_path / "eval.json").write_text("{not json")
    with pytest.raises(MFError, match="cannot be read as JSON"):
        write_eval_json(tmp_path, {"a": 1})
    assert (tmp_path / "eval.json").read_text() == "{not json"
    with pytest.raises(MFError, match="does not exist"):
        write_eval_json(tmp_path / "missing_run", {"a": 1})
    with pytest.raises(MFError, match="Cannot store"):
        write_eval_json(tmp_path.parent, {"a": object()})


def test_table_labels_the_stand_in_as_not_fid():
    results = {"fid_clean": 3.14159, "fd_resnet56": 12.0, "accuracy": {"top1_pct": 93.39, "params": 855770}}
    console = Console(record=True, width=160)
    console.print(results_table(results, title="run 00001"))
    text = console.export_text()
    assert "run 00001" in text and "3.1416" in text and "855,770" in text and "93.3900" in text
    fd_line = next(line for line in text.splitlines() if "fd_resnet56" in line)
    assert "not FID" in fd_line and "12.0000" in fd_line
    fid_line = next(line for line in text.splitlines() if "fid_clean" in line)
    assert "FID (clean-fid, clean)" in fid_line
