"""Cost of a JVP through the backbones, as ratios measured in one run.

For a small DiT and a small U-Net: (primal + tangent time of ``torch.func.jvp``) ÷ (time
of a plain forward), and the peak memory of the JVP, for

* ``custom``: this package's rules (fused attention primal with the exact blockwise
  tangent; one-matmul linear/conv tangents; cheap norm tangents), and
* ``math``: the baseline, plain ``torch.func.jvp`` with PyTorch's default rules and
  attention written as softmax(QKᵀ/√d)V in plain ops.

Both under ``torch.no_grad()`` (the tangent pass of a MeanFlow step). Times are medians
over paired rounds in which the three calls run back to back in rotating order, so
machine load affects them alike, with the allocator's default behaviour (as in training);
peak memory is measured after all timings (on the CPU with a fixed mmap threshold, which
would otherwise add page faults to the timed calls). Then the attention JVP alone at
several sequence lengths shows that the custom tangent's memory grows linearly in T (the
math one quadratically).

Writes a markdown table between ``<!-- BEGIN jvp_cost -->`` and ``<!-- END jvp_cost -->``
in benchmarks/RESULTS.md. Usage: ``PYTHONPATH=.:plugins python benchmarks/jvp_cost.py [--quick]``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import platform
import statistics
import time
from pathlib import Path

import torch

from mf_backbones.attention import attention, attention_backend
from mf_backbones.dit import DiT, DiTConfig
from mf_backbones.jvp_ops import custom_jvp_rules
from mf_backbones.unet import UNet, UNetConfig

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN, END = "<!-- BEGIN jvp_cost -->", "<!-- END jvp_cost -->"


# ---------------------------------------------------------------------------------------------
# peak memory: CUDA's allocator statistics, or on CPU the resident-set high-water mark


def _cpu_prepare():
    # Return large blocks to the OS at once (fixed mmap threshold), so the resident-set
    # high-water mark follows the tensors' peak instead of the allocator's cache.
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
    except OSError:
        pass


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def peak_memory_mib(fn, device: torch.device) -> float:
    """Peak memory above the level before ``fn()``, in MiB."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    fn()
    return max(0, _rss_kib("VmHWM") - base) / 1024


# ---------------------------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def make_calls(model, batch: int, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn((batch, *model.shape), generator=g).to(device)
    t = torch.rand(batch, generator=g).to(device)
    r = t * torch.rand(batch, generator=g).to(device)
    v = torch.randn(z.shape, generator=g).to(device)
    # MeanFlow's tangent: (v, 1, 0) over (z, t, r), i.e. (v, 1, 1) over (z, t, h = t - r)
    primals, tangents = (z, t, t - r), (v, torch.ones_like(t), torch.ones_like(t))

    def forward():
        with torch.no_grad():
            return model(*primals)

    def jvp_custom():
        with torch.no_grad():
            return torch.func.jvp(model, primals, tangents)

    def jvp_math():
        with torch.no_grad(), attention_backend("math"), custom_jvp_rules(False):
            return torch.func.jvp(model, primals, tangents)

    return {"forward": forward, "custom": jvp_custom, "math": jvp_math}


def measure_model(name, model, batch, device, rounds):
    calls = make_calls(model, batch, device)
    for fn in calls.values():  # warm-up (allocator, kernels)
        fn()
    keys = list(calls)
    samples = {k: [] for k in keys}
    for i in range(rounds):
        order = keys[i % len(keys) :] + keys[: i % len(keys)]
        times = {k: _timed(calls[k], device) for k in order}
        for k in keys:
            samples[k].append(times[k])
    ratios = {k: statistics.median(samples[k][i] / samples["forward"][i] for i in range(rounds)) for k in ("custom", "math")}
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return dict(name=name, params=params, batch=batch, fwd_ms=1e3 * statistics.median(samples["forward"]), ratios=ratios)


def model_memory(model, batch: int, device) -> dict[str, float]:
    calls = make_calls(model, batch, device)
    for fn in calls.values():  # warm-up: one-time allocations are not part of a call's peak
        fn()
    return {k: peak_memory_mib(fn, device) for k, fn in calls.items()}


def measure_attention(T, device, heads=4, d=64, batch=1, rounds=3, memory=False):
    """{backend: ms} (or {backend: peak MiB} with ``memory``) of the attention JVP at length T."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, dq, dk, dv = [torch.randn(batch, heads, T, d, generator=g).to(device) for _ in range(6)]

    def run(backend):
        def fn():
            with torch.no_grad(), attention_backend(backend), custom_jvp_rules(backend != "math"):
                return torch.func.jvp(attention, (q, k, v), (dq, dk, dv))

        return fn

    out = {}
    for backend in ("auto", "math"):
        fn = run(backend)
        fn()
        if memory:
            out[backend] = peak_memory_mib(fn, device)
            continue
        out[backend] = 1e3 * statistics.median(_timed(fn, device) for _ in range(rounds))
    return out


def measure_ops(device, rounds=7):
    """JVP ÷ forward of single layers, custom rule vs PyTorch's default rule (plain-ops attention)."""
    from mf_backbones import jvp_ops

    g = torch.Generator(device="cpu").manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device)

    cases = {
        "linear 1024×256 → 1024": (lambda x, w=r(1024, 256), b=r(1024): jvp_ops.linear(x, w, b), r(4, 256, 256)),
        "conv 3×3, 128 ch, 16×16": (lambda x, w=r(128, 128, 3, 3), b=r(128): jvp_ops.conv2d(x, w, b, 1, 1), r(4, 128, 16, 16)),
        "layer norm (4, 256, 256)": (lambda x: jvp_ops.layer_norm(x, (256,), None, None, 1e-6), r(4, 256, 256)),
        "group norm 32 groups (4, 128, 32, 32)": (lambda x, w=r(128), b=r(128): jvp_ops.group_norm(x, 32, w, b, 1e-6), r(4, 128, 32, 32)),
        "attention (4, 4 heads, 256, 64)": (lambda x: attention(x, x.flip(2), x.flip(3)), r(4, 4, 256, 64)),
    }
    rows = []
    for name, (fn, x) in cases.items():
        dx = torch.randn(x.shape, generator=g).to(device)

        def fwd():
            with torch.no_grad():
                return fn(x)

        def custom():
            with torch.no_grad():
                return torch.func.jvp(fn, (x,), (dx,))

        def default():
            with torch.no_grad(), attention_backend("math"), custom_jvp_rules(False):
                return torch.func.jvp(fn, (x,), (dx,))

        calls = {"forward": fwd, "custom": custom, "default": default}
        for f in calls.values():
            f()
        samples = {k: [] for k in calls}
        keys = list(calls)
        for i in range(rounds):
            for k in keys[i % 3 :] + keys[: i % 3]:
                samples[k].append(_timed(calls[k], device))
        ratio = {k: statistics.median(samples[k][i] / samples["forward"][i] for i in range(rounds)) for k in ("custom", "default")}
        rows.append((name, 1e3 * statistics.median(samples["forward"]), ratio))
    return rows


def table(device, model_rows, attn_rows, op_rows=()) -> str:
    lines = [
        f"Device: {device.type}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
        + f", torch {torch.__version__}, fp32, no-grad JVP with tangent (v, 1, 1) over (z, t, h).",
        "",
        "| model | params | batch | forward (ms) | JVP ÷ forward, custom | JVP ÷ forward, math | peak MiB forward | peak MiB JVP custom | peak MiB JVP math |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in model_rows:
        lines.append(
            f"| {r['name']} | {r['params']:.1f}M | {r['batch']} | {r['fwd_ms']:.1f} | **{r['ratios']['custom']:.2f}** | "
            f"{r['ratios']['math']:.2f} | {r['mem']['forward']:.0f} | {r['mem']['custom']:.0f} | {r['mem']['math']:.0f} |"
        )
    lines += [
        "",
        "Attention alone (batch 1, 4 heads, head dim 64): JVP time and peak memory vs sequence length T.",
        "",
        "| T | custom ms | math ms | custom peak MiB | math peak MiB | math ÷ custom memory |",
        "|---|---|---|---|---|---|",
    ]
    for T, r in attn_rows:
        (tc, mc), (tm, mm) = r["auto"], r["math"]
        lines.append(f"| {T} | {tc:.1f} | {tm:.1f} | {mc:.0f} | {mm:.0f} | {mm / max(mc, 1e-9):.1f} |")
    if op_rows:
        lines += [
            "",
            "Single layers: JVP ÷ forward with the custom rule and with PyTorch's default rule (attention: plain ops).",
            "",
            "| layer | forward (ms) | JVP ÷ forward, custom | JVP ÷ forward, default |",
            "|---|---|---|---|",
        ]
        for name, fwd_ms, ratio in op_rows:
            lines.append(f"| {name} | {fwd_ms:.2f} | **{ratio['custom']:.2f}** | {ratio['default']:.2f} |")
    lines.append("")
    lines.append("Ratios are medians over paired, rotating-order rounds measured in one run.")
    return "\n".join(lines)


def write_results(text: str):
    block = f"{BEGIN}\n{text}\n{END}"
    if RESULTS.exists():
        content = RESULTS.read_text()
        if BEGIN in content and END in content:
            head, rest = content.split(BEGIN, 1)
            content = head + block + rest.split(END, 1)[1]
        else:
            content = content.rstrip("\n") + "\n\n" + block + "\n"
    else:
        content = "# Benchmark results\n\n## JVP cost (`benchmarks/jvp_cost.py`)\n\n" + block + "\n"
    RESULTS.write_text(content)


def build_models(device):
    """(name, model, batch) of the benchmarked backbones, the same in every process (seeded)."""
    torch.manual_seed(0)
    cpu = device.type == "cpu"
    out = []
    for patch, batch in ((4, 16 if cpu else 256), (2, 8 if cpu else 128)):  # 64 and 256 tokens
        dit = DiT(DiTConfig(variant=f"DiT-S/{patch}", depth=6, hidden=256, heads=4), shape=(3, 32, 32)).to(device).eval()
        out.append((f"DiT (6 blocks, 256 wide, patch {patch}, {(32 // patch) ** 2} tokens)", dit, batch))
    unet = UNet(UNetConfig(variant="UNet-S"), shape=(3, 32, 32)).to(device).eval()
    out.append(("U-Net (UNet-S, 32×32, attention at 16×16)", unet, 8 if cpu else 128))
    return out


def memories(device, lengths) -> dict:
    return {"models": [model_memory(model, batch, device) for _, model, batch in build_models(device)],
            "attention": {str(T): measure_attention(T, device, memory=True) for T in lengths}}


def memory_in_subprocess(threads: int, lengths) -> dict:
    import json
    import subprocess
    import sys

    cmd = [sys.executable, __file__, "--memory-json", "--threads", str(threads), "--lengths", ",".join(map(str, lengths))]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and sequence lengths (smoke test)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--no-write", action="store_true", help="print the table without updating RESULTS.md")
    ap.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (1 is steadiest on a shared machine)")
    ap.add_argument("--memory-json", action="store_true", help=argparse.SUPPRESS)  # the CPU memory pass (a subprocess)
    ap.add_argument("--lengths", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_json:
        import json

        _cpu_prepare()
        print(json.dumps(memories(torch.device("cpu"), [int(x) for x in args.lengths.split(",")])))
        return
    rounds = args.rounds or (3 if args.quick else 9)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    texts = []
    for device in devices:
        cpu = device.type == "cpu"
        lengths = (256, 1024, 2048) if args.quick else (256, 1024, 2048, 4096)
        models = build_models(device)
        rows = [measure_model(name, model, batch, device, rounds) for name, model, batch in models]
        attn_ms = {T: measure_attention(T, device) for T in lengths}
        ops = measure_ops(device)
        # Peak memory: on the CPU in a fresh process with a fixed mmap threshold (see
        # _cpu_prepare), so that the resident-set high-water mark follows the tensors; that
        # setting would put page faults into every large allocation of a timed call, while
        # training runs with the allocator's default behaviour, and so do the timings here.
        mem = memory_in_subprocess(args.threads, lengths) if cpu else memories(device, lengths)
        for row, m in zip(rows, mem["models"]):
            row["mem"] = m
        attn = [(T, {b: (attn_ms[T][b], mem["attention"][str(T)][b]) for b in attn_ms[T]}) for T in lengths]
        texts.append(table(device, rows, attn, ops))
        print(texts[-1], flush=True)
    if not args.no_write:
        write_results("\n\n".join(texts))


if __name__ == "__main__":
    main()
