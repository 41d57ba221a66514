"""The MFI-ResNet pipeline (Sun et al., arXiv 2511.12422; METHODS §5), phase by phase.

1. baseline            load --weights, or train the ResNet (label-smoothed CE)
2. pairs               each stage's input and output features from the frozen baseline
3. meanflow.stageK     each stage's MeanFlow module, trained with the MeanFlow objective
                       (METHODS §1.1) between its aligned input (t = 1) and its output (t = 0)
   dropin.stageK       optional, not in the paper ([dropin] steps > 0): each stage that keeps
                       its module in the hybrid, trained as a drop-in for its stage inside the
                       frozen baseline on kept stage inputs, towards the baseline's logits
                       (and, with ``feature_weight``, its pooled features)
4. meta                stem + all modules + head, fine-tuned end to end (CE, AdamW, cosine)
5. incubate.stageK     the stages named in --incubate get their residual blocks back,
                       initialised from the baseline's ("deep incubation"), and are trained one
                       at a time inside the otherwise frozen meta model
6. finetune            the hybrid (incubated stages + the other stages' modules) end to end
   eval.* / report     top-1 on the test split, parameters and images/s; report.json

Every phase writes its result atomically before it is marked done in ``phases.json``; a
resumed run skips the done phases and continues the interrupted one from its last checkpoint.

The alignment layer and the MeanFlow objective. The objective's target is stop-gradiented
(Eq. 10), so its gradient with respect to the aligned input z_1 is not the gradient of any
fixed function of the endpoints: trained through it, the alignment could drift towards a
constant map, which makes every t < 1 trivially predictable from z_t and leaves the one-step
map (t = 1) blind. The MeanFlow loss therefore sees z_1 under stop-gradient and trains the
velocity net only, and the alignment is trained by the endpoint loss ||flow(align(x)) - y||²,
which is minimal only when the module's own sampler reproduces the teacher's output; a collapsed
alignment cannot be optimal there, because y is fixed and carries the input's information. The
meta-model fine-tune then trains alignment and velocity net together with the classification loss.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.markup import escape
from safetensors.torch import load_file, save_file
from torch import nn

from mfcli import checkpoint, runs
from mfcli.compress import arch as A
from mfcli.compress.loop import Context, Interrupted, clear_phase_state, run_steps
from mfcli.compress.modules import MeanFlowModule, ModuleSpec, count_params
from mfcli.compress.recipe import ClassifierPhase, CompressRecipe, steps_of
from mfcli.console import console
from mfcli.data import DeviceLoader, epoch_plan, flip_where, images_uint8_to_float
from mfcli.engine import bf16_autocast, pick_device, wants_bf16
from mfcli.errors import MFError
from mfcli.plugins import registry as default_registry

PHASES_FILE = "phases.json"


# --------------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------------
def parse_stages(text: str | None, num_stages: int, model: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3]; '' or 'none' -> []. Stages are numbered from 1."""
    if text is None or text.strip().lower() in ("", "none"):
        return []
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            k = int(part)
        except ValueError:
            raise MFError(f"--incubate takes stage numbers separated by commas (e.g. 1,2,3); '{part}' is not a number.") from None
        if not 1 <= k <= num_stages:
            raise MFError(f"--incubate {text}: {model} has {num_stages} stages, numbered 1 to {num_stages}; there is no stage {k}.")
        out.append(k)
    return sorted(set(out))


def phase_seed(seed: int, phase: str) -> int:
    """A distinct, reproducible seed per phase (so each phase's draws do not depend on the others')."""
    return int.from_bytes(hashlib.sha256(f"mf-compress:{seed}:{phase}".encode()).digest()[:7], "little")


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slowly."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(bool(f()) for f in checks if f is not None)


def compress_bf16(precision: str, device: torch.device) -> bool:
    """``run.precision`` on ``device``: bf16 as for ``mf train`` (auto: on CUDA), and with auto also on a
    CPU that computes in bf16 natively; elsewhere a CPU emulates bf16, and a ResNet-56 drop-in step
    takes more than ten times as long as in fp32 (AVX2-only CPU)."""
    if precision == "auto" and device.type == "cpu":
        return cpu_has_bf16()
    return wants_bf16(precision, device)


def stage_features(base: nn.Module, x: torch.Tensor, last: int | None = None) -> list[torch.Tensor]:
    """[stem output, stage 1 output, ..., stage ``last`` output] of the baseline on images x (all stages by default)."""
    h = base.stem(base.normalize(x))
    out = [h]
    for stage in base.stages[:last]:
        h = stage(h)
        out.append(h)
    return out


def classification_loss(logits: torch.Tensor, y: torch.Tensor, cfg, teacher_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Label-smoothed cross-entropy; with teacher logits, (1-α) CE + α T² KL(teacher || student)
    (α = ``cfg.distill``, T = ``cfg.distill_temperature``)."""
    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    if teacher_logits is None or cfg.distill == 0:
        return loss
    T = cfg.distill_temperature
    kl = F.kl_div(F.log_softmax(logits / T, dim=1), F.log_softmax(teacher_logits / T, dim=1), log_target=True, reduction="batchmean")
    return (1 - cfg.distill) * loss + cfg.distill * T**2 * kl


def dropin_loss(logits: torch.Tensor, pooled: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor,
                teacher_pooled: torch.Tensor, cfg) -> torch.Tensor:
    """The drop-in phase's loss: :func:`classification_loss` towards the baseline's logits, plus
    ``cfg.feature_weight`` times the squared distance (summed over channels, averaged over the batch)
    between the pooled features the head receives, (B, D), and the baseline's on the same images."""
    loss = classification_loss(logits, y, cfg, teacher_logits)
    if cfg.feature_weight > 0:
        loss = loss + cfg.feature_weight * (pooled - teacher_pooled).pow(2).sum(1).mean()
    return loss


def random_crop(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-image random crop of the black-padded batch (the usual CIFAR translation augmentation).

    x (B, C, H, W) in [-1, 1]; padding is -1 (black), as when padding [0, 1] images with zeros.
    """
    if pad <= 0:
        return x
    b, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), value=-1.0)
    i = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
    j = torch.randint(0, 2 * pad + 1, (b,), device=x.device)
    rows = (i[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (j[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    out = xp[torch.arange(b, device=x.device)[:, None, None], :, rows, cols]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


class PairBatches:
    """Endless, resumable batches of kept tensors with the same first dimension, e.g. (stage
    input, stage output). Floating tensors come as float32, image-shaped ones in ``memory_format``.

    Order from ``mfcli.data.epoch_plan(seed, epoch)``, like the image loaders; state = (epoch, position).
    """

    def __init__(self, *tensors: torch.Tensor, batch_size: int, seed: int, device,
                 memory_format: torch.memory_format = torch.contiguous_format, what: str = "pairs.num_images or lower meanflow.batch_size"):
        n = len(tensors[0])
        if any(len(t) != n for t in tensors):
            raise AssertionError("kept tensors of different lengths")
        if n < batch_size:
            raise MFError(f"{n} kept feature pairs are fewer than one batch of {batch_size}; raise {what}.")
        self.tensors, self.n, self.batch_size, self.seed, self.device = tensors, n, batch_size, seed, device
        self.per_epoch = n // batch_size
        self.memory_format = memory_format
        self.epoch, self.position, self._perm, self._perm_epoch = 0, 0, None, None

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._perm_epoch != self.epoch:
            self._perm, _ = epoch_plan(self.seed, self.epoch, self.n)
            self._perm_epoch = self.epoch
        idx = self._perm[self.position * self.batch_size:(self.position + 1) * self.batch_size]
        self.position += 1
        if self.position == self.per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return tuple(self._batch(t[idx]) for t in self.tensors)

    def _batch(self, t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t.to(self.device)
        t = t.to(self.device, torch.float32)
        return t.contiguous(memory_format=self.memory_format) if t.dim() == 4 else t

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n": self.n, "batch_size": self.batch_size}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        if (int(st["seed"]), int(st["n"]), int(st["batch_size"])) != (self.seed, self.n, self.batch_size):
            raise MFError("the feature-pair order of the checkpoint does not match this run (seed, pairs or batch size changed).")
        self.epoch, self.position = int(st["epoch"]), int(st["position"])


class OnlinePairs:
    """(stage input, stage output) computed from image batches by the frozen baseline at every step."""

    def __init__(self, loader: DeviceLoader, baseline: nn.Module, stage: int):
        self.loader, self.baseline, self.stage = loader, baseline, stage

    def __iter__(self):
        return self

    @torch.no_grad()
    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = next(self.loader)
        return tuple(stage_features(self.baseline, x, self.stage)[-2:])

    def state_dict(self) -> dict[str, int]:
        return self.loader.state_dict()

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.loader.load_state_dict(st)


def make_optimizer(params: list[nn.Parameter], cfg) -> torch.optim.Optimizer:
    if getattr(cfg, "optimizer", "adamw") == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, device, ctx: Context | None = None,
         phase: str = "eval") -> float:
    """Top-1 accuracy (%) over uint8 ``images`` (N, C, H, W), in order, in eval mode."""
    model.eval()
    correct, n = 0, len(images)
    bar = ctx.progress(n) if ctx else None
    with bar if bar else contextlib.nullcontext():
        for i in range(0, n, batch_size):
            if ctx:
                ctx.check_stop(phase)
            x = images_uint8_to_float(images[i:i + batch_size].to(device))
            pred = model(x).argmax(1)
            correct += int((pred.cpu() == labels[i:i + batch_size]).sum())
            if bar:
                bar.update(min(n, i + batch_size), f"top-1 {100.0 * correct / min(n, i + batch_size):.2f} %")
    return 100.0 * correct / n


@torch.no_grad()
def images_per_second(models: dict[str, nn.Module], shape: tuple[int, ...], *, batch_size: int, rounds: int, device) -> dict[str, float]:
    """Inference throughput of each model on one random batch, timed in interleaved rounds (median).

    Interleaving makes the ratios fair on a machine whose load changes while it measures.
    """
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(batch_size, *shape, generator=gen) * 2 - 1).to(device)
    for m in models.values():
        m.eval()
        m(x)  # warm-up: first-call allocations and kernel selection
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            m(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[k].append(time.perf_counter() - t0)
    return {k: batch_size / statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------
@dataclass
class Invocation:
    """What the command line asked for (kept in config.json, so --resume needs nothing else)."""

    model: str
    incubate: list[int] = field(default_factory=list)
    weights: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "incubate": list(self.incubate), "weights": self.weights}


class Compressor:
    """Validates everything up front, then runs the phases that are not done yet."""

    def __init__(self, recipe: CompressRecipe, inv: Invocation, *, incubate_text: str | None = None,
                 run_dir: Path | None = None, runs_dir: str | None = None, device: str | None = None, quiet: bool = False):
        self.recipe, self.inv, self.quiet = recipe, inv, quiet
        if recipe.run.threads > 0:
            torch.set_num_threads(recipe.run.threads)
        self.device = pick_device(device or recipe.run.device)
        self.memory_format = torch.channels_last if recipe.run.channels_last else torch.contiguous_format
        self.bf16 = compress_bf16(recipe.run.precision, self.device)
        if self.bf16 and self.device.type == "cpu" and not cpu_has_bf16() and not quiet:
            console.print("[yellow]run.precision = bf16, but this CPU has no bf16 instructions (AVX512-BF16 or AMX): "
                          "bf16 steps will be slower than fp32 here; set run.precision=fp32.[/]")
        self.reg = default_registry()
        self.train_set = self._dataset("train")
        self.test_set = self._dataset("test")
        self.shape = tuple(self.train_set.shape)
        self.num_classes = int(self.train_set.num_classes)
        resuming = run_dir is not None
        done = self._done(run_dir) if resuming else {}
        # the baseline's architecture (unknown names are an error here), with its weights when they are still needed
        weights = inv.weights if "baseline" not in done else None
        self.base = A.build_base(inv.model, num_classes=self.num_classes, shape=self.shape, weights=weights, registry=self.reg)
        self.io = A.stage_io(self.base, self.shape)
        self.num_stages = len(self.io)
        if incubate_text is not None:
            inv.incubate = parse_stages(incubate_text, self.num_stages, inv.model)
        for k in inv.incubate:
            if not 1 <= k <= self.num_stages:
                raise MFError(f"{inv.model} has {self.num_stages} stages; there is no stage {k} to incubate.")
        extra = [k for k in recipe.modules.stages if k > self.num_stages]
        if extra:
            raise MFError(f"{recipe.path} [modules.stage{extra[0]}]: {inv.model} has {self.num_stages} stages, numbered 1 to {self.num_stages}.")
        self.specs: dict[int, ModuleSpec] = {}
        for k in range(1, self.num_stages + 1):
            c = recipe.modules.for_stage(k)
            self.specs[k] = A.module_spec(self.io[k - 1], align_kernel=c.align_kernel, time_dim=c.time_dim, hidden=c.hidden,
                                          steps=recipe.modules.steps_for(k, self.num_stages), per_step_nets=c.per_step_nets,
                                          net=c.net)
        if not inv.weights and "baseline" not in done and steps_of(recipe.baseline, len(self.train_set)) == 0:
            raise MFError(f"no --weights given and {recipe.path} [baseline] has no training budget (epochs and steps are 0): "
                          "pass --weights PATH or set baseline.epochs=N.")
        if recipe.pairs.num_images > len(self.train_set):
            raise MFError(f"pairs.num_images = {recipe.pairs.num_images}, but the training split has {len(self.train_set)} images.")
        self.mf_objective = self.reg.build("objectives", "mf", recipe.objective, num_classes=0)
        if recipe.dropin.num_images > len(self.train_set):
            raise MFError(f"dropin.num_images = {recipe.dropin.num_images}, but the training split has {len(self.train_set)} images.")
        # the stages whose module reaches the hybrid get the drop-in phase, when it has a budget
        self.dropin_stages = [k for k in range(1, self.num_stages + 1) if k not in inv.incubate] \
            if steps_of(recipe.dropin, recipe.dropin.num_images or len(self.train_set)) > 0 else []
        self.run_dir = Path(run_dir) if run_dir else None
        self.runs_dir = runs_dir
        self._cache: dict[str, Any] = {}

    # -- set-up ---------------------------------------------------------------------------------
    def _dataset(self, split: str):
        ds = self.reg.build("datasets", self.recipe.data_name, self.recipe.data, split=split)
        shape = tuple(getattr(ds, "shape", ()))
        if len(shape) != 3 or not callable(getattr(ds, "tensors", None)) or int(getattr(ds, "num_classes", 0)) < 2:
            raise MFError(f"mf compress needs a labelled image dataset held as tensors; dataset '{self.recipe.data_name}' "
                          f"({split} split) has shape {shape} and {getattr(ds, 'num_classes', 0)} classes.")
        return ds

    @staticmethod
    def _done(run_dir: Path | None) -> dict[str, Any]:
        if run_dir is None:
            return {}
        p = Path(run_dir) / PHASES_FILE
        if not p.is_file():
            return {}
        try:
            return json.loads(p.read_text()).get("done", {})
        except json.JSONDecodeError as exc:
            raise MFError(f"{p} is damaged ({exc}); the run cannot be resumed safely.") from exc

    def phase_names(self) -> list[str]:
        names = ["baseline", "eval.baseline", "pairs"]
        names += [f"meanflow.stage{k}" for k in range(1, self.num_stages + 1)]
        names += [f"dropin.stage{k}" for k in self.dropin_stages]
        names += ["meta", "eval.meta"]
        names += [f"incubate.stage{k}" for k in self.inv.incubate]
        return names + ["finetune", "eval.hybrid", "report"]

    def create_run_dir(self) -> Path:
        name = self.recipe.run.name or f"compress-{self.inv.model}"
        self.run_dir = runs.new_run_dir(self.runs_dir or self.recipe.run.dir, name)
        resolved = {"invocation": self.inv.to_json(), **self.recipe.resolved()}
        runs.write_config(self.run_dir, resolved, self.recipe.path, self.recipe.overrides)
        return self.run_dir

    # -- bookkeeping ----------------------------------------------------------------------------
    def _mark_done(self, name: str, seconds: float, **info: Any) -> None:
        p = self.run_dir / PHASES_FILE
        doc = json.loads(p.read_text()) if p.is_file() else {"done": {}}
        doc["done"][name] = {"seconds": round(seconds, 2), **info}
        runs.atomic_write_bytes(p, json.dumps(doc, indent=2).encode())

    def _json(self, name: str) -> dict[str, Any]:
        p = self.run_dir / name
        return json.loads(p.read_text()) if p.is_file() else {}

    def _write_json(self, name: str, doc: dict[str, Any]) -> None:
        runs.atomic_write_bytes(self.run_dir / name, json.dumps(doc, indent=2).encode())

    def _config(self) -> dict[str, Any]:
        return {"invocation": self.inv.to_json(), **self.recipe.resolved()}

    def _save_model(self, path: Path, model: nn.Module, **meta: Any) -> None:
        A.save_compressed(path, model, base=self.inv.model, num_classes=self.num_classes, shape=self.shape,
                          config=self._config(), **meta)

    def _place(self, model: nn.Module) -> nn.Module:
        """On the run's device, in its memory layout (NHWC with ``run.channels_last``)."""
        return model.to(self.device, memory_format=self.memory_format)

    def _load_into(self, model: nn.Module, path: Path) -> nn.Module:
        state, _ = checkpoint.load_weights(path)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise MFError(f"{path} does not match this run's model ({str(exc).splitlines()[0]}); was the run directory edited?") from exc
        return self._place(model)

    # -- the models of each phase, rebuilt from the run directory -------------------------------
    def baseline(self) -> nn.Module:
        if "baseline" not in self._cache:
            m = self._load_into(copy.deepcopy(self.base), self.run_dir / "baseline.safetensors").eval()
            for p in m.parameters():
                p.requires_grad_(False)
            self._cache["baseline"] = m
        return self._cache["baseline"]

    def mf_module(self, k: int) -> MeanFlowModule:
        """Stage k's module: from the drop-in phase when it has run for k, else from phase 3."""
        path = self.run_dir / f"dropin_stage{k}.safetensors"
        if k not in self.dropin_stages or not path.is_file():
            path = self.run_dir / f"meanflow_stage{k}.safetensors"
        return self._load_into(MeanFlowModule(self.specs[k]), path)

    def assembled_meta(self) -> nn.Module:
        """Baseline stem and head with every stage replaced by its trained module."""
        mods = {k: self.mf_module(k) for k in range(1, self.num_stages + 1)}
        meta = A.replace_stages(self.baseline(), mods)
        for p in meta.parameters():
            p.requires_grad_(True)
        return self._place(meta)

    def meta(self) -> nn.Module:
        m = A.replace_stages(self.base, {k: MeanFlowModule(self.specs[k]) for k in range(1, self.num_stages + 1)})
        return self._load_into(m, self.run_dir / "meta.safetensors")

    def incubated_stage(self, k: int) -> nn.Module:
        stage = copy.deepcopy(self.base.stages[k - 1])
        return self._load_into(stage, self.run_dir / f"incubate_stage{k}.safetensors")

    def assembled_hybrid(self) -> nn.Module:
        hybrid = A.replace_stages(self.meta(), {k: self.incubated_stage(k) for k in self.inv.incubate})
        for p in hybrid.parameters():
            p.requires_grad_(True)
        return self._place(hybrid)

    def hybrid(self) -> nn.Module:
        m = A.replace_stages(self.base, {k: MeanFlowModule(self.specs[k]) for k in range(1, self.num_stages + 1) if k not in self.inv.incubate})
        return self._load_into(m, self.run_dir / "hybrid.safetensors")

    # -- running --------------------------------------------------------------------------------
    def run(self) -> Path:
        if self.run_dir is None:
            self.create_run_dir()
        ctx = Context(self.run_dir, self.device, quiet=self.quiet)
        self.ctx = ctx
        names = self.phase_names()
        done = self._done(self.run_dir)
        old = {}

        def on_signal(signum, frame):
            if ctx.stop_requested:  # a second Ctrl-C: stop now (every file on disk is still whole)
                raise KeyboardInterrupt
            ctx.stop_requested = True
            console.print("[yellow]stopping after this step; saving a checkpoint (Ctrl-C again to stop at once)[/]")

        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                old[s] = signal.signal(s, on_signal)
            except ValueError:  # not the main thread
                pass
        try:
            ctx.write({"event": "start", "phases": names, "done": sorted(done), "device": str(self.device)})
            for i, name in enumerate(names, 1):
                if name in done:
                    continue
                ctx.label = f"[{i}/{len(names)}] {name}"
                if not self.quiet:
                    console.print(f"[bold cyan]{escape(ctx.label)}[/]")
                t0, c0 = time.perf_counter(), time.process_time()
                info = self._run_phase(name) or {}
                clear_phase_state(self.run_dir)
                prev = self._json(PHASES_FILE).get("partial_seconds", {}).get(name, [0.0, 0.0])
                prev = [float(prev), 0.0] if isinstance(prev, (int, float)) else prev
                seconds = time.perf_counter() - t0 + prev[0]
                # CPU time of this process: on a shared machine the honest measure of the work done
                cpu = time.process_time() - c0 + prev[1]
                self._mark_done(name, seconds, cpu_seconds=round(cpu, 2), **info)
                ctx.write({"event": "phase_done", "phase": name, "seconds": seconds, "cpu_seconds": cpu, **info})
        except Interrupted as exc:
            self._add_partial_seconds(exc.phase, time.perf_counter() - t0, time.process_time() - c0)
            ctx.write({"event": "interrupted", "phase": exc.phase, "step": exc.step})
            raise
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            ctx.close()
        return self.run_dir

    def _add_partial_seconds(self, name: str, seconds: float, cpu: float) -> None:
        """Time spent in a phase before an interruption, added when the resumed phase finishes."""
        p = self.run_dir / PHASES_FILE
        doc = json.loads(p.read_text()) if p.is_file() else {"done": {}}
        part = doc.setdefault("partial_seconds", {})
        wall, c = part.get(name, [0.0, 0.0]) if not isinstance(part.get(name), (int, float)) else (part[name], 0.0)
        part[name] = [wall + seconds, c + cpu]
        runs.atomic_write_bytes(p, json.dumps(doc, indent=2).encode())

    def _run_phase(self, name: str) -> dict[str, Any] | None:
        if name == "baseline":
            return self.phase_baseline()
        if name == "pairs":
            return self.phase_pairs()
        if name.startswith("meanflow.stage"):
            return self.phase_meanflow(int(name.removeprefix("meanflow.stage")))
        if name.startswith("dropin.stage"):
            return self.phase_dropin(int(name.removeprefix("dropin.stage")))
        if name == "meta":
            return self.phase_meta()
        if name.startswith("incubate.stage"):
            return self.phase_incubate(int(name.removeprefix("incubate.stage")))
        if name == "finetune":
            return self.phase_finetune()
        if name.startswith("eval."):
            return self.phase_eval(name.removeprefix("eval."))
        if name == "report":
            return self.phase_report()
        raise AssertionError(name)

    # -- classifier training shared by baseline, meta, incubation and fine-tune -----------------
    def _train_classifier(self, phase: str, model: nn.Module, cfg: ClassifierPhase, *, trained: nn.Module,
                          set_modes=None) -> dict[str, Any]:
        images, labels = self.train_set.tensors()
        steps = steps_of(cfg, len(images))
        if steps == 0:
            return {"steps": 0}
        seed = phase_seed(self.recipe.run.seed, phase)
        torch.manual_seed(seed)
        loader = DeviceLoader(images, labels, batch_size=cfg.batch_size, device=self.device,
                              hflip=bool(getattr(self.train_set, "hflip", False)), seed=seed)
        params = [p for p in trained.parameters() if p.requires_grad]
        opt = make_optimizer(params, cfg)
        self._place(model)
        if set_modes is None:
            model.train()
        else:
            set_modes()

        teacher = self.baseline() if cfg.distill > 0 and phase != "baseline" else None

        def step_fn(batch):
            x, y = batch
            x = random_crop(x, cfg.crop_pad).contiguous(memory_format=self.memory_format)
            soft = None
            with bf16_autocast(self.bf16, self.device):  # run.precision
                logits = model(x).float()
                if teacher is not None:  # optional (not in the paper): soft targets of the frozen baseline
                    with torch.no_grad():
                        soft = teacher(x).float()
            loss = classification_loss(logits, y, cfg, soft)
            loss.backward()
            return {"loss": loss.detach(), "acc": (logits.detach().argmax(1) == y).float().mean() * 100}

        last = run_steps(self.ctx, phase, total=steps, modules=trained, optimizer=opt, batches=loader, step_fn=step_fn,
                         cfg=cfg, images_per_step=cfg.batch_size)
        return {"steps": steps, "train_loss": last.get("loss"), "train_acc": last.get("acc")}

    # -- phase 1 --------------------------------------------------------------------------------
    def phase_baseline(self) -> dict[str, Any]:
        model = self._place(copy.deepcopy(self.base))
        if self.inv.weights:
            info = {"source": str(self.inv.weights)}
        else:
            torch.manual_seed(phase_seed(self.recipe.run.seed, "baseline-init"))
            model = self._place(A.build_base(self.inv.model, num_classes=self.num_classes, shape=self.shape, registry=self.reg))
            info = {"source": "trained", **self._train_classifier("baseline", model, self.recipe.baseline, trained=model)}
        self._save_model(self.run_dir / "baseline.safetensors", model, phase="baseline")
        return info

    # -- phase 2 --------------------------------------------------------------------------------
    def phase_pairs(self) -> dict[str, Any]:
        cfg = self.recipe.pairs
        if cfg.num_images == 0:
            return {"mode": "online"}
        images, _ = self.train_set.tensors()
        gen = torch.Generator().manual_seed(phase_seed(self.recipe.run.seed, "pairs"))
        index = torch.randperm(len(images), generator=gen)[: cfg.num_images]  # the split may be sorted by class
        base = self.baseline()
        dtype = torch.float16 if cfg.dtype == "float16" else torch.float32
        feats: list[list[torch.Tensor]] = [[] for _ in range(self.num_stages + 1)]
        with torch.no_grad(), self.ctx.progress(cfg.num_images) as bar:
            for i in range(0, cfg.num_images, cfg.batch_size):
                self.ctx.check_stop("pairs")
                x = images_uint8_to_float(images[index[i:i + cfg.batch_size]].to(self.device))
                for kept, h in zip(feats, stage_features(base, x)):
                    kept.append(h.to("cpu", dtype))
                bar.update(min(cfg.num_images, i + cfg.batch_size))
        tensors = {f"feat{k}": torch.cat(f).contiguous() for k, f in enumerate(feats)}
        tensors["index"] = index
        runs.atomic_write_with(self.run_dir / "pairs.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "mf-pairs-1"}))
        return {"mode": "kept", "num_images": cfg.num_images,
                "megabytes": round(sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20, 1)}

    def _pairs(self) -> dict[str, torch.Tensor]:
        if "pairs" not in self._cache:
            p = self.run_dir / "pairs.safetensors"
            try:
                self._cache["pairs"] = load_file(str(p))
            except Exception as exc:
                raise MFError(f"{p} cannot be read ({exc}); delete 'pairs' from {PHASES_FILE} to recompute it.") from exc
        return self._cache["pairs"]

    # -- phase 3 --------------------------------------------------------------------------------
    def phase_meanflow(self, k: int) -> dict[str, Any]:
        cfg, phase = self.recipe.meanflow, f"meanflow.stage{k}"
        seed = phase_seed(self.recipe.run.seed, phase)
        torch.manual_seed(seed)
        module = self._place(MeanFlowModule(self.specs[k])).train()
        if self.recipe.pairs.num_images:
            pairs = self._pairs()
            batches = PairBatches(pairs[f"feat{k - 1}"], pairs[f"feat{k}"], batch_size=cfg.batch_size, seed=seed, device=self.device,
                                  memory_format=self.memory_format)
            n = len(pairs["index"])
        else:
            images, labels = self.train_set.tensors()
            loader = DeviceLoader(images, labels, batch_size=cfg.batch_size, device=self.device,
                                  hflip=bool(getattr(self.train_set, "hflip", False)), seed=seed)
            batches, n = OnlinePairs(loader, self.baseline(), k), len(images)
        steps = self.recipe.modules.for_stage(k).train_steps or steps_of(cfg, n)
        if steps == 0:
            self._save_module(k, module)
            return {"steps": 0}
        align_params = list(module.align.parameters())
        opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        step_fn = meanflow_step(module, self.mf_objective, align_weight=cfg.align_weight, align_params=align_params)
        last = run_steps(self.ctx, phase, total=steps, modules=module, optimizer=opt, batches=batches, step_fn=step_fn,
                         cfg=cfg, images_per_step=cfg.batch_size)
        self._save_module(k, module)
        return {"steps": steps, "mf_loss": last.get("loss"), "endpoint_rel_err": last.get("rel_err"),
                "params": count_params(module)}

    def _save_module(self, k: int, module: MeanFlowModule) -> None:
        checkpoint.save_weights(self.run_dir / f"meanflow_stage{k}.safetensors", module.state_dict(), self._config(),
                                spec=module.spec.to_json(), stage=k)

    # -- phase 3b -------------------------------------------------------------------------------
    def _dropin_data(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(stage k's input, the baseline's logits, its pooled features (the head's input), labels) for
        ``views`` views of each kept training image: the image itself, then random crops with random flips.

        Recomputed (deterministically: the views come from the phase's own seed) when a run is
        resumed rather than written to the run directory.
        """
        cfg = self.recipe.dropin
        images, labels = self.train_set.tensors()
        n = cfg.num_images or len(images)
        index = torch.arange(len(images))
        if n < len(images):
            index = torch.randperm(len(images), generator=torch.Generator().manual_seed(phase_seed(self.recipe.run.seed, "dropin")))[:n]
        base = self.baseline()
        dtype = torch.float16 if cfg.dtype == "float16" else torch.float32
        inputs, logits, pooled = [], [], []
        batch = self.recipe.pairs.batch_size
        torch.manual_seed(phase_seed(self.recipe.run.seed, f"dropin-views{k}"))
        chunks = [(view, j) for view in range(cfg.views) for j in range(0, n, batch)]
        with torch.no_grad(), self.ctx.progress(n * cfg.views) as bar:
            for view, j in chunks:
                self.ctx.check_stop(f"dropin.stage{k}")
                x = images_uint8_to_float(images[index[j:j + batch]].to(self.device))
                if view > 0:
                    x = random_crop(x, cfg.crop_pad)
                    x = flip_where(x, torch.rand(len(x), device=x.device) < 0.5)
                feats = stage_features(base, x.contiguous(memory_format=self.memory_format))  # fp32 targets
                inputs.append(feats[k - 1].to("cpu", dtype))
                p = base.head.pooled(feats[-1])
                pooled.append(p.float().cpu())
                logits.append(base.head.fc(p).float().cpu())
                bar.update(view * n + j + len(x))
        return torch.cat(inputs).contiguous(), torch.cat(logits), torch.cat(pooled), labels[index].long().repeat(cfg.views)

    def phase_dropin(self, k: int) -> dict[str, Any]:
        cfg, phase = self.recipe.dropin, f"dropin.stage{k}"
        inputs, teacher_logits, teacher_pooled, labels = self._dropin_data(k)
        seed = phase_seed(self.recipe.run.seed, phase)
        torch.manual_seed(seed)
        module = self.mf_module(k).train()
        base = self.baseline()  # frozen, eval mode: the stages after k and the head
        batches = PairBatches(inputs, teacher_logits, teacher_pooled, labels, batch_size=cfg.batch_size, seed=seed, device=self.device,
                              memory_format=self.memory_format, what="dropin.num_images or lower dropin.batch_size")
        opt = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

        def step_fn(batch):
            x, soft_logits, soft_pooled, y = batch
            with bf16_autocast(self.bf16, self.device):  # run.precision
                h = module(x)
                for stage in base.stages[k:]:
                    h = stage(h)
                pooled = base.head.pooled(h).float()
            logits = base.head.fc(pooled)
            loss = dropin_loss(logits, pooled, y, soft_logits, soft_pooled, cfg)
            loss.backward()
            pred = logits.detach().argmax(1)
            return {"loss": loss.detach(), "acc": (pred == y).float().mean() * 100,
                    "agree": (pred == soft_logits.argmax(1)).float().mean() * 100,
                    "feat_se": (pooled.detach() - soft_pooled).pow(2).sum(1).mean()}

        steps = steps_of(cfg, len(labels))
        last = run_steps(self.ctx, phase, total=steps, modules=module, optimizer=opt, batches=batches, step_fn=step_fn,
                         cfg=cfg, images_per_step=cfg.batch_size)
        checkpoint.save_weights(self.run_dir / f"dropin_stage{k}.safetensors", module.state_dict(), self._config(),
                                spec=module.spec.to_json(), stage=k)
        return {"steps": steps, "kept": len(labels), "views": cfg.views, "train_loss": last.get("loss"), "train_acc": last.get("acc"),
                "teacher_agreement": last.get("agree")}

    # -- phase 4 --------------------------------------------------------------------------------
    def phase_meta(self) -> dict[str, Any]:
        meta = self.assembled_meta()
        info = self._train_classifier("meta", meta, self.recipe.meta, trained=meta)
        self._save_model(self.run_dir / "meta.safetensors", meta, phase="meta")
        return info

    # -- phase 5 --------------------------------------------------------------------------------
    def phase_incubate(self, k: int) -> dict[str, Any]:
        model = self.meta()
        if self.recipe.incubate.progressive:  # the stages incubated before this one, in place
            for j in self.inv.incubate[: self.inv.incubate.index(k)]:
                model.stages[j - 1] = self.incubated_stage(j)
        # deep incubation: the stage's residual blocks, initialised from the baseline's
        model.stages[k - 1] = copy.deepcopy(self.baseline().stages[k - 1])
        for p in model.parameters():
            p.requires_grad_(False)
        stage = model.stages[k - 1]
        for p in stage.parameters():
            p.requires_grad_(True)

        def set_modes():  # frozen parts keep their BatchNorm statistics
            model.eval()
            stage.train()

        info = self._train_classifier(f"incubate.stage{k}", model, self.recipe.incubate, trained=stage, set_modes=set_modes)
        checkpoint.save_weights(self.run_dir / f"incubate_stage{k}.safetensors", stage.state_dict(), self._config(), stage=k)
        return info

    # -- phase 6 --------------------------------------------------------------------------------
    def phase_finetune(self) -> dict[str, Any]:
        hybrid = self.assembled_hybrid()
        info = self._train_classifier("finetune", hybrid, self.recipe.finetune, trained=hybrid)
        self._save_model(self.run_dir / "hybrid.safetensors", hybrid, phase="hybrid", incubated=self.inv.incubate)
        return info

    # -- evaluation and report ------------------------------------------------------------------
    def _model(self, which: str) -> nn.Module:
        return {"baseline": self.baseline, "meta": self.meta, "hybrid": self.hybrid}[which]()

    def phase_eval(self, which: str) -> dict[str, Any]:
        images, labels = self.test_set.tensors()
        n = self.recipe.eval.num_images or len(images)
        if n < len(images):  # a fixed, class-balanced-in-expectation subset (the split may be sorted by class)
            gen = torch.Generator().manual_seed(phase_seed(self.recipe.run.seed, "eval-subset"))
            idx = torch.randperm(len(images), generator=gen)[:n]
            images, labels = images[idx], labels[idx]
        acc = top1(self._model(which), images, labels, batch_size=self.recipe.eval.batch_size, device=self.device,
                   ctx=self.ctx, phase=f"eval.{which}")
        evals = self._json("evals.json")
        evals[which] = {"top1": acc, "num_images": n}
        self._write_json("evals.json", evals)
        if not self.quiet:
            console.print(f"{which}: top-1 {acc:.2f} % on {n} test images")
        return {"top1": acc, "num_images": n}

    def phase_report(self) -> dict[str, Any]:
        from mfcli.compress.report import build_report, print_report

        models = {k: self._model(k) for k in ("baseline", "meta", "hybrid")}
        speed = images_per_second(models, self.shape, batch_size=self.recipe.eval.speed_batch_size,
                                  rounds=self.recipe.eval.speed_rounds, device=self.device)
        doc = build_report(models, evals=self._json("evals.json"), speed=speed, phases=self._json(PHASES_FILE).get("done", {}),
                           model_name=self.inv.model, incubate=self.inv.incubate, device=self.device,
                           speed_batch_size=self.recipe.eval.speed_batch_size)
        self._write_json("report.json", doc)
        if not self.quiet:
            print_report(doc)
        h = doc["models"]["hybrid"]
        return {"hybrid_params": h["params"], "reduction_percent": h["reduction_percent"], "hybrid_top1": h["top1"]}


def meanflow_step(module: MeanFlowModule, objective, *, align_weight: float, align_params: list[nn.Parameter]):
    """One phase-3 step: the MeanFlow loss for the velocity net(s), the endpoint loss for the alignment.

    The MeanFlow objective (METHODS §1.1: JVP target, stop-gradient, adaptive weight) is the
    registered ``mf`` objective, called with the stage output as its t = 0 end (``x``) and the
    aligned input as its t = 1 end (``noise``), so v = z_1 - y and u(z_1, r=0, t=1) ≈ z_1 - y.
    """

    def step(batch):
        x_in, y = batch
        z1 = module.align(x_in)
        z1_sg = z1.detach()  # see the module docstring: the alignment is not trained through the MeanFlow target
        losses, mses = [], []
        for i, net in enumerate(module.nets):
            x0, e1 = module.segment_ends(z1_sg, y, i)
            loss_i, logs_i = objective.loss(net, x0, None, noise=e1)
            losses.append(loss_i)
            mses.append(logs_i["mse"])
        loss = torch.stack(losses).mean()
        loss.backward()
        if align_weight > 0:
            end = F.mse_loss(module.flow(z1), y)
            torch.autograd.backward(align_weight * end, inputs=align_params)
        else:
            with torch.no_grad():
                end = F.mse_loss(module.flow(z1_sg), y)
        return {"loss": loss.detach(), "mse": torch.stack(mses).mean(), "endpoint_mse": end.detach(),
                "rel_err": end.detach() / y.pow(2).mean().clamp_min(1e-12)}

    return step
