"""benchmarks/step_cost.py: its RESULTS.md block is replaced in place and nothing else is touched."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
step_cost = pytest.importorskip("step_cost")


def test_results_block_replaced_in_place(tmp_path, monkeypatch):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nother text\n\n<!-- BEGIN other -->\nkeep\n<!-- END other -->\n")
    monkeypatch.setattr(step_cost, "RESULTS", path)
    step_cost.write_results({"mlp": "### mlp\n\nfirst\n"})
    step_cost.write_results({"convnet": "### convnet\n\nsecond\n"})
    step_cost.write_results({"mlp": "### mlp\n\nthird\n"})
    text = path.read_text()
    assert text.startswith("# Results\n\nother text\n\n<!-- BEGIN other -->\nkeep\n<!-- END other -->\n")
    assert text.count(step_cost.BEGIN) == 1 and text.count(step_cost.END) == 1
    assert "third" in text and "second" in text and "first" not in text


def test_measure_runs_on_a_tiny_mlp():
    torch.manual_seed(0)
    net, shape, _, _ = step_cost.build_backbone("mlp", {"width": 16, "depth": 1})
    x = torch.randn(64, *shape)
    res = step_cost.measure(net, x, step_cost.variants(0.25, False), rounds=1, warmup=0)
    assert res["fm"]["ratio"] == 1.0 and res["fm"]["mem_ratio"] == 1.0
    assert all(r["mem"] > 0 and r["ms"] > 0 for r in res.values())


def test_gpu_section_sits_beside_the_cpu_one(tmp_path, monkeypatch):
    """A section's title names its device and precision unless CPU fp32, and sections are keyed by
    title: a CUDA bf16 table of a backbone must not replace its CPU table."""
    import argparse

    path = tmp_path / "RESULTS.md"
    monkeypatch.setattr(step_cost, "RESULTS", path)
    res = {"fm": dict(ms=2.0, ratio=1.0, mem=2**20, mem_ratio=1.0)}
    cpu = argparse.Namespace(device="cpu", precision="fp32", threads=1, rounds=3)
    bf16 = argparse.Namespace(device="cpu", precision="bf16", threads=1, rounds=3)
    a = step_cost.section("dit", (3, 8, 8), 4, {}, 10, res, cpu)
    b = step_cost.section("dit", (3, 8, 8), 4, {}, 10, res, bf16)
    assert a.startswith("### dit\n") and ", fp32, CPU" in a
    assert b.startswith("### dit (cpu, bf16)\n") and "bf16 autocast" in b
    step_cost.write_results({"dit": a})
    step_cost.write_results({"dit (cpu, bf16)": b})
    text = path.read_text()
    assert text.count("### dit\n") == 1 and text.count("### dit (cpu, bf16)\n") == 1


def test_main_keeps_one_table_per_device_and_precision(tmp_path, monkeypatch):
    path = tmp_path / "RESULTS.md"
    monkeypatch.setattr(step_cost, "RESULTS", path)
    args = ["--backbone", "mlp", "--config", "width=8", "--config", "depth=1", "--batch", "32", "--rounds", "1",
            "--warmup", "0", "--only", "ρ=0.25 split", "--threads", str(torch.get_num_threads())]
    step_cost.main(args)
    step_cost.main(args + ["--precision", "bf16"])
    step_cost.main(args)  # replaces the fp32 table, keeps the bf16 one
    text = path.read_text()
    assert text.count("### mlp\n") == 1 and text.count("### mlp (cpu, bf16)\n") == 1
    assert text.count("| mf ρ=0.25 split |") == 2
