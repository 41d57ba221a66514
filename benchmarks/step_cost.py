"""Step cost of each objective relative to flow matching, on one backbone and one batch.

A step is forward + loss + backward (the optimizer update is the same for all and left out).
Time: the variants run in paired, interleaved rounds (a random order per round); each round
gives each variant's time divided by flow matching's time in the same round, and the table
reports the median of those ratios, so slow phases of a shared machine cancel out.
Memory: the peak of the bytes of tensors allocated during one step and alive at once (tracked
per storage by a dispatch mode, gradient buffers pre-allocated), i.e. activations plus
transients, relative to flow matching.

    PYTHONPATH=.:plugins python benchmarks/step_cost.py --backbone mlp --backbone convnet
    PYTHONPATH=.:plugins python benchmarks/step_cost.py --backbone dit --config depth=4 --config hidden=256
    PYTHONPATH=.:plugins python benchmarks/step_cost.py --backbone unet --no-preset --shape 3,32,32 \
        --batch 128 --device cuda --precision bf16      # the MeanFlow CIFAR U-Net as trained on a GPU

Backbones come from the mf_backbones registry (``--config key=value`` sets fields of its config
dataclass, values parsed as TOML); ``convnet`` is a small GroupNorm conv net defined here for when
no image backbone is available. The table goes into benchmarks/RESULTS.md between
``<!-- BEGIN step_cost -->`` and ``<!-- END step_cost -->``, one section per backbone.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import math
import random
import statistics
import sys
import time
import tomllib
import weakref
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import mf_objectives.meanflow as meanflow_module
from mf_objectives.common import jvp_u
from mf_objectives.flow_matching import FlowMatching, FMConfig
from mf_objectives.imf import IMFConfig, ImprovedMeanFlow
from mf_objectives.meanflow import MeanFlow, MFConfig
from mf_objectives.mmf import MMFConfig, ModularMeanFlow
from mf_objectives.splitmf import SplitMeanFlow, SplitMFConfig

from common import machine, sync  # benchmarks/common.py (this script's folder is on sys.path)

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN, END = "<!-- BEGIN step_cost -->", "<!-- END step_cost -->"

# small sizes that run on a CPU in seconds; only the fields a backbone's config has are applied
PRESETS = {
    "mlp": dict(shape=(2,), batch=4096, config=dict(width=256, depth=4)),
    "convnet": dict(shape=(3, 16, 16), batch=64, config=dict()),
    "dit": dict(shape=(4, 16, 16), batch=32, config=dict(variant="DiT-S/2", depth=6, hidden=256, heads=4, patch=2)),
    "dit-ic": dict(shape=(4, 16, 16), batch=32,
                   config=dict(variant="iMF-B/2", depth=6, hidden=256, heads=4, patch=2, head_depth=2)),
    "unet": dict(shape=(3, 32, 32), batch=32,
                 config=dict(variant="UNet-XS", channels=32, channel_mult=[1, 2, 2], num_blocks=1,
                             attn_resolutions=[16], dropout=0.0)),
}


# -- a small conv net (GroupNorm, SiLU, one down/up level), private to this benchmark ----------


def _sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=t.device) / (dim // 2))
    a = t.float()[:, None] * freqs[None]
    return torch.cat([a.cos(), a.sin()], 1).to(t.dtype)


class _Res(nn.Module):
    def __init__(self, c_in, c_out, emb):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.e = nn.Linear(emb, c_out)
        self.n2, self.c2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.c1(nn.functional.silu(self.n1(x))) + self.e(emb)[:, :, None, None]
        return self.skip(x) + self.c2(nn.functional.silu(self.n2(h)))


class ConvNet(nn.Module):
    has_v_head, num_classes, conditions = False, 0, frozenset()

    def __init__(self, shape, ch=64):
        super().__init__()
        c = shape[0]
        self.emb = nn.Sequential(nn.Linear(256, 4 * ch), nn.SiLU(), nn.Linear(4 * ch, 4 * ch))
        self.inp = nn.Conv2d(c, ch, 3, padding=1)
        self.d1, self.d2 = _Res(ch, ch, 4 * ch), _Res(ch, 2 * ch, 4 * ch)
        self.mid = _Res(2 * ch, 2 * ch, 4 * ch)
        self.u2, self.u1 = _Res(4 * ch, ch, 4 * ch), _Res(2 * ch, ch, 4 * ch)
        self.out = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, c, 3, padding=1))

    def forward(self, z, t, h, cond=None):
        emb = self.emb(torch.cat([_sinusoid(t, 128), _sinusoid(h, 128)], 1))
        a1 = self.d1(self.inp(z), emb)
        a2 = self.d2(nn.functional.avg_pool2d(a1, 2), emb)
        m = self.mid(a2, emb)
        b2 = self.u2(torch.cat([m, a2], 1), emb)
        b1 = self.u1(torch.cat([nn.functional.interpolate(b2, scale_factor=2.0), a1], 1), emb)
        return self.out(b1)


# -- backbones from the registry ---------------------------------------------------------------


def registered_backbones() -> dict:
    import mf_backbones

    found = {}
    mf_backbones.register_backbones(lambda name, factory, config, help="": found.__setitem__(name, (factory, config)))
    return found


def build_backbone(name: str, overrides: dict, shape=None, use_preset: bool = True):
    preset = PRESETS.get(name, dict(shape=(3, 16, 16), batch=32, config={}))
    if not use_preset:  # the config's own defaults (a backbone's named variant at full size)
        preset = dict(preset, config={})
    shape = tuple(shape or preset["shape"])
    if name == "convnet":
        return ConvNet(shape), shape, preset["batch"], {}
    registry = registered_backbones()
    if name not in registry:  # a module in the package that MODULES does not list yet
        try:
            registry.update(importlib.import_module(f"mf_backbones.{name}").COMPONENTS)
        except ImportError:
            sys.exit(f"unknown backbone {name!r}; registered: {', '.join(sorted(registry))}, or 'convnet'")
    factory, config_cls = registry[name]
    fields = {f.name for f in dataclasses.fields(config_cls)}
    values = {k: v for k, v in preset["config"].items() if k in fields}
    unknown = set(overrides) - fields
    if unknown:
        sys.exit(f"{name}: unknown config keys {sorted(unknown)}; known: {sorted(fields)}")
    values.update(overrides)
    return factory(config_cls(**values), shape=shape, num_classes=0), shape, preset["batch"], values


# -- the variants --------------------------------------------------------------------------------


def _whole_batch_u_and_dudt(net, z, t, h, cond, tangent, *, mode="fused", differentiable=False):
    """Reference style: one jvp over the whole batch, r = t samples included."""
    return jvp_u(net, z, t, h, cond, tangent, mode=mode, differentiable=differentiable)


class WholeBatchMeanFlow(MeanFlow):
    """MeanFlow with the tangent computed on every sample, as the public implementations do."""

    def terms(self, *args, **kwargs):
        saved = meanflow_module.u_and_dudt
        meanflow_module.u_and_dudt = _whole_batch_u_and_dudt
        try:
            return super().terms(*args, **kwargs)
        finally:
            meanflow_module.u_and_dudt = saved


def variants(ratio: float, has_v_head: bool) -> dict:
    v = {
        "fm": FlowMatching(FMConfig()),
        f"mf ρ={ratio} fused": MeanFlow(MFConfig(ratio_r_neq_t=ratio, jvp_mode="fused")),
        f"mf ρ={ratio} split": MeanFlow(MFConfig(ratio_r_neq_t=ratio, jvp_mode="split")),
        f"mf ρ={ratio} whole-batch jvp (reference style)":
            WholeBatchMeanFlow(MFConfig(ratio_r_neq_t=ratio, jvp_mode="fused")),
        "mf ρ=0.75 fused": MeanFlow(MFConfig(ratio_r_neq_t=0.75, jvp_mode="fused")),
        "mf ρ=0.75 split": MeanFlow(MFConfig(ratio_r_neq_t=0.75, jvp_mode="split")),
        "imf ρ=0.5 (boundary v)": ImprovedMeanFlow(IMFConfig(v_source="boundary")),
        f"mmf ρ={ratio} λ=1": ModularMeanFlow(MMFConfig(ratio_r_neq_t=ratio, lambda_schedule="fixed")),
        "splitmf ρ=0.5": SplitMeanFlow(SplitMFConfig()),
    }
    if has_v_head:
        v["imf ρ=0.5 (v head)"] = ImprovedMeanFlow(IMFConfig(v_source="head"))
    return v


def step(obj, net, x, autocast=None):
    """One step as ``mf train`` runs it: the loss under the run's autocast (bf16 or none), then backward."""
    with autocast() if autocast else contextlib.nullcontext():
        loss, _ = obj.loss(net, x)
    loss.backward()


# -- measurement ----------------------------------------------------------------------------------


class PeakMemory(TorchDispatchMode):
    """Peak bytes of storages created inside the mode and alive at the same time."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.skipped = 0
        self.seen: set[int] = set()

    def _free(self, key, nbytes):
        self.live -= nbytes
        self.seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                try:
                    st = t.untyped_storage()
                    key, n = st.data_ptr(), st.nbytes()
                except (RuntimeError, NotImplementedError):  # a wrapper without storage of its own
                    self.skipped += 1
                    continue
                if n and key not in self.seen:
                    self.seen.add(key)
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key, n)
        return out


def peak_memory(obj, net, x, autocast=None) -> int:
    net.zero_grad(set_to_none=False)  # gradient buffers exist already: the peak is activations + transients
    torch.manual_seed(0)
    with PeakMemory() as pm:
        step(obj, net, x, autocast)
    return pm.peak


def measure(net, x, objs: dict, rounds: int, warmup: int, seed: int = 0, autocast=None):
    rng = random.Random(seed)
    names = list(objs)
    for _ in range(warmup):
        for n in names:
            net.zero_grad(set_to_none=False)
            step(objs[n], net, x, autocast)
    times = {n: [] for n in names}
    for _ in range(rounds):
        order = names[:]
        rng.shuffle(order)
        for n in order:
            net.zero_grad(set_to_none=False)
            sync(x.device)
            t0 = time.perf_counter()
            step(objs[n], net, x, autocast)
            sync(x.device)
            times[n].append(time.perf_counter() - t0)
    ratios = {n: statistics.median(a / b for a, b in zip(times[n], times["fm"])) for n in names}
    mem = {n: peak_memory(objs[n], net, x, autocast) for n in names}
    return {n: dict(ms=1e3 * statistics.median(times[n]), ratio=ratios[n], mem=mem[n], mem_ratio=mem[n] / mem["fm"])
            for n in names}


# -- RESULTS.md -----------------------------------------------------------------------------------


def section(backbone, shape, batch, values, params, res, args) -> str:
    """One backbone's table; its title names the device and precision when not the CPU in fp32, so
    that CPU and GPU sections of the same backbone sit side by side in RESULTS.md."""
    cfg = ", ".join(f"{k}={v}" for k, v in values.items()) or "defaults"
    device = torch.device(args.device)
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type  # one table per GPU model
    where = "" if device.type == "cpu" and args.precision == "fp32" else f" ({kind}, {args.precision})"
    precision = "fp32" if args.precision == "fp32" else "bf16 autocast (as `mf train` runs it)"
    if device.type == "cuda":
        precision += ", TF32 matmuls (as `mf train`)"
    lines = [
        f"### {backbone}{where}",
        "",
        f"{backbone} ({cfg}; {params / 1e6:.2f}M parameters), input {tuple(shape)}, batch {batch}, {precision}, "
        f"{machine(device)}; median of {args.rounds} paired rounds.",
        "",
        "| objective | step ms | step × fm | peak act. MB | memory × fm |",
        "|---|---:|---:|---:|---:|",
    ]
    for n, r in res.items():
        lines.append(f"| {n} | {r['ms']:.1f} | {r['ratio']:.2f} | {r['mem'] / 2**20:.1f} | {r['mem_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def write_results(sections: dict[str, str]) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        body, tail = rest.split(END, 1)
    else:
        head, body, tail = text.rstrip("\n") + "\n\n", "", "\n"
    # keep the sections of backbones not measured in this run
    old, intro = {}, ""
    parts = body.split("\n### ")
    for p in parts[1:]:
        old[p.split("\n", 1)[0].strip()] = "### " + p.strip("\n") + "\n"
    old.update(sections)
    intro = (
        "\n## Step cost vs flow matching (`benchmarks/step_cost.py`)\n\n"
        "Step = forward + loss + backward. ρ = ratio_r_neq_t. \"fused\": one `torch.func.jvp` on the r ≠ t "
        "samples whose primal carries the gradient; \"split\": gradient forward + no-grad JVP; "
        "\"whole-batch jvp\": the tangent on every sample as public ports do. Peak act. = peak bytes of tensors "
        "allocated in the step and alive at once. mf and imf default to split (docs/objectives.md). "
        "On a shared CPU the time ratios of repeated runs differ by up to about ±0.07.\n\n"
    )
    body = intro + "\n".join(old[k] for k in old) + "\n"
    RESULTS.write_text(head + BEGIN + "\n" + body + END + tail)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", action="append", help="registered backbone name or 'convnet' (repeatable)")
    ap.add_argument("--config", action="append", default=[], help="backbone config key=value (TOML value)")
    ap.add_argument("--shape", type=lambda s: tuple(int(a) for a in s.split(",")), default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--ratio", type=float, default=0.25, help="ratio_r_neq_t of the main mf rows")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", action="append", default=[], help="measure only variants containing this text (+ fm)")
    ap.add_argument("--no-preset", action="store_true",
                    help="the backbone config's own defaults (full size), not the small CPU preset's (input shape and batch still "
                         "come from the preset unless --shape and --batch are given)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast of the loss, as mf train on a GPU")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device is visible")
        # as mf train sets them (mfcli.engine): TF32 for the fp32 matmuls and convolutions, i.e. the JVP
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == "bf16" else None
    overrides = {}
    for kv in args.config:
        k, v = kv.split("=", 1)
        try:
            overrides[k] = tomllib.loads(f"v = {v}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[k] = v
    sections = {}
    for name in args.backbone or ["mlp"]:
        torch.manual_seed(0)
        net, shape, batch, values = build_backbone(name, overrides if len(args.backbone or []) <= 1 else {}, args.shape,
                                                   use_preset=not args.no_preset)
        net = net.to(device)
        batch = args.batch or batch
        x = torch.randn(batch, *shape, device=device)
        objs = variants(args.ratio, bool(getattr(net, "has_v_head", False)))
        if args.only:
            objs = {k: v for k, v in objs.items() if k == "fm" or any(o in k for o in args.only)}
        res = measure(net, x, objs, args.rounds, args.warmup, autocast=autocast)
        params = sum(p.numel() for p in net.parameters())
        text = section(name, shape, batch, values, params, res, args)
        sections[text.split("\n", 1)[0][4:].strip()] = text  # keyed by its title, as write_results reads old ones
        print(text, flush=True)
    if not args.no_write:
        write_results(sections)


if __name__ == "__main__":
    main()
