"""The training engine: one loop for every objective, backbone and dataset.

Single process on CUDA / MPS / CPU, or one process per GPU (DDP). The objective sees the bare
module (``torch.func.jvp`` cannot go through DDP), so gradients are all-reduced explicitly
after the backward pass and the ranks are checked to agree (METHODS §1.8, PERFORMANCE.md).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mfcli import checkpoint, runs
from mfcli.config import Recipe
from mfcli.errors import MFError
from mfcli.plugins import Registry, registry as default_registry


# --------------------------------------------------------------------------------------------
# Devices and distributed set-up
# --------------------------------------------------------------------------------------------
def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MFError(f"device '{name}' was asked for, but CUDA is not available on this machine.")
    if name == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(name)


def wants_bf16(precision: str, device: torch.device) -> bool:
    """A ``precision`` setting (auto | fp32 | bf16) on ``device``: whether to autocast to bf16 (auto: on CUDA only)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def bf16_autocast(enabled: bool, device: torch.device):
    """bf16 autocast on ``device`` when enabled, else a no-op context."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def dist_from_env() -> Dist:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); single process when absent."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), ws, int(os.environ.get("LOCAL_RANK", "0")))


# --------------------------------------------------------------------------------------------
# Optimisation helpers
# --------------------------------------------------------------------------------------------
def lr_at(step: int, cfg) -> float:
    """Linear warm-up to ``lr``, then constant or cosine decay to ``min_lr``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        frac = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))
    return cfg.lr


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    if len(cfg.betas) != 2:
        raise MFError(f"train.betas must have two values, got {cfg.betas}.")
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


class EMA:
    """One or several exponential moving averages of the weights (floating-point tensors only)."""

    def __init__(self, model: torch.nn.Module, decays: list[float]):
        for d in decays:
            if not 0.0 <= d < 1.0:
                raise MFError(f"train.ema_decays must lie in [0, 1), got {d}.")
        self.decays = list(decays)
        self.shadows = [{k: v.detach().clone() for k, v in model.state_dict().items()} for _ in decays]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, every: int = 1) -> None:
        state = model.state_dict()
        for decay, shadow in zip(self.decays, self.shadows):
            d = decay**every
            for k, v in state.items():
                s = shadow[k]
                if s.is_floating_point():
                    s.lerp_(v.detach(), 1.0 - d)
                else:
                    s.copy_(v)

    def state_dict(self) -> dict[str, Any]:
        return {f"ema{i}": sh for i, sh in enumerate(self.shadows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, sh in enumerate(self.shadows):
            for k, v in state[f"ema{i}"].items():
                sh[k].copy_(v)


def all_reduce_grads(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Average the gradients over ranks in one flat bucket (the JVP bypasses DDP's hooks)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        if p.grad is None:
            p.grad = flat[offset : offset + n].view_as(p).clone()
        else:
            p.grad.copy_(flat[offset : offset + n].view_as(p))
        offset += n


def params_checksum(model: torch.nn.Module) -> torch.Tensor:
    return torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()


# --------------------------------------------------------------------------------------------
# Building a model from a recipe
# --------------------------------------------------------------------------------------------
def build_parts(recipe: Recipe, reg: Registry | None = None, split: str = "train"):
    """(dataset, backbone, objective) from a recipe; the dataset may be None for split=None."""
    reg = reg or default_registry()
    dataset = reg.build("datasets", recipe.names["data"], recipe.data, split=split) if split else None
    shape = tuple(dataset.shape) if dataset is not None else None
    num_classes = int(dataset.num_classes) if dataset is not None else None
    return dataset, shape, num_classes


def build_model(recipe: Recipe, shape, num_classes: int, reg: Registry | None = None):
    reg = reg or default_registry()
    net = reg.build("backbones", recipe.names["backbone"], recipe.backbone, shape=tuple(shape), num_classes=num_classes)
    obj = reg.build("objectives", recipe.names["objective"], recipe.objective, num_classes=num_classes)
    return net, obj


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
class StopTraining(Exception):
    pass


class Trainer:
    def __init__(self, recipe: Recipe, run_dir: Path | None = None, *, dist_info: Dist | None = None, device: str | None = None, quiet: bool = False, reg: Registry | None = None):
        from mfcli.data import make_loader

        self.recipe, self.run_dir = recipe, Path(run_dir) if run_dir else None
        self.cfg = recipe.train
        self.dist = dist_info or Dist()
        self.quiet = quiet or not self.dist.main
        self.device = pick_device(device or self.cfg.device, self.dist.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.reg = reg or default_registry()
        # Seeds per rank: model init identical everywhere (seed), the objective's draws differ by rank.
        torch.manual_seed(self.cfg.seed)
        self.dataset, self.shape, self.num_classes = build_parts(recipe, self.reg)
        self.net, self.objective = build_model(recipe, self.shape, self.num_classes, self.reg)
        if self.cfg.init_from:
            self._init_from(self.cfg.init_from)
        self._attach_teacher()
        self.augment = None
        if recipe.loader.augment == "edm":
            from mfcli.augment import AUGMENT_DIM, EDMAugment

            if "augment" not in getattr(self.net, "conditions", ()):
                raise MFError(f"data.augment = 'edm' gives the network {AUGMENT_DIM} augmentation labels, but the "
                              f"'{recipe.names['backbone']}' backbone as configured takes none; use the unet backbone "
                              f"with augment_dim = {AUGMENT_DIM}, or data.augment = 'none'.")
            self.augment = EDMAugment(recipe.loader.augment_p)
        self.net.to(self.device)
        if self.dist.enabled:
            for p in self.net.parameters():  # start every rank from rank 0's weights
                dist.broadcast(p.data, 0)
        torch.manual_seed(self.cfg.seed + 1000 * self.dist.rank)
        if self.cfg.steps < 1:
            raise MFError(f"train.steps must be at least 1, got {self.cfg.steps}.")
        if recipe.loader.batch_size % self.dist.world_size:
            raise MFError(f"data.batch_size {recipe.loader.batch_size} is not divisible by the {self.dist.world_size} processes.")
        # The loader cuts every global batch into one slice per rank, so DDP sees the single-process batch.
        self.loader = make_loader(
            self.dataset, batch_size=recipe.loader.batch_size, device=self.device, seed=self.cfg.seed,
            rank=self.dist.rank, world_size=self.dist.world_size, on_device=recipe.loader.on_device,
            num_workers=recipe.loader.num_workers,
        )
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.params, self.cfg)
        self.ema = EMA(self.net, self.cfg.ema_decays) if self.cfg.ema_decays else None
        self.step = 0
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.bf16 = wants_bf16(self.cfg.precision, self.device)
        self.train_fn = torch.compile(self.net) if self.cfg.compile else self.net
        self._stop_signal: int | None = None
        self.log = None
        self.tb = None

    def _init_from(self, path: str) -> None:
        """Start from another run's weights (SplitMeanFlow's student starts from its teacher)."""
        src = Path(path)
        weights = src / "weights.safetensors" if src.is_dir() else src
        state, _ = checkpoint.load_weights(weights)
        try:
            self.net.load_state_dict(state)
        except RuntimeError as exc:
            raise MFError(f"train.init_from '{path}' does not fit this recipe's backbone: {exc}") from exc

    def _attach_teacher(self) -> None:
        """Objectives that distil a teacher name its weights in their config; the engine loads it."""
        path = getattr(self.recipe.objective, "teacher_weights", "")
        if not path or not hasattr(self.objective, "set_teacher"):
            return
        from mfcli.sampling import load_model

        src = Path(path)
        teacher = load_model(src / "weights.safetensors" if src.is_dir() else src, self.device)
        if tuple(teacher.shape) != tuple(self.shape) or teacher.num_classes != self.num_classes:
            raise MFError(f"the teacher '{path}' was trained on data of shape {teacher.shape} with {teacher.num_classes} classes; this run has {self.shape} with {self.num_classes}.")
        for p in teacher.net.parameters():
            p.requires_grad_(False)
        self.objective.set_teacher(teacher.net)

    # -- state --------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        st = {
            "step": self.step,
            "model": self.net.state_dict(),
            "optimizer": self.opt.state_dict(),
            "loader": self.loader.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "nonfinite_total": self.nonfinite_total,
        }
        if self.dist.enabled:  # every rank's generator, so a resumed DDP run draws the same numbers
            states = [None] * self.dist.world_size
            dist.all_gather_object(states, torch.get_rng_state())
            st["rng_cpu_ranks"] = states
        if self.device.type == "cuda":
            st["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        if self.ema:
            st["ema"] = self.ema.state_dict()
        return st

    def load_state(self, st: dict[str, Any]) -> None:
        try:
            self.net.load_state_dict(st["model"])
            self.opt.load_state_dict(st["optimizer"])
            if self.ema:
                self.ema.load_state_dict(st["ema"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise MFError(f"the train state in '{self.run_dir}' does not match this recipe's model: {exc}") from exc
        self.loader.load_state_dict(st["loader"])
        self.step = int(st["step"])
        self.nonfinite_total = int(st.get("nonfinite_total", 0))
        ranks = st.get("rng_cpu_ranks")
        if ranks and len(ranks) == self.dist.world_size:
            torch.set_rng_state(ranks[self.dist.rank])
        elif self.dist.rank == 0:
            torch.set_rng_state(st["rng_cpu"])
        if "rng_cuda" in st and self.device.type == "cuda":
            torch.cuda.set_rng_state(st["rng_cuda"], self.device)

    def ema_weights(self) -> dict[str, torch.Tensor]:
        return self.ema.shadows[0] if self.ema else self.net.state_dict()

    def save(self) -> None:
        """Atomic checkpoint: weights.safetensors (EMA), weights_raw.safetensors and train_state.pt."""
        state = self.state()  # a collective under DDP: every rank takes part
        if not self.dist.main:
            return
        resolved = self.recipe.resolved()
        meta = {"step": self.step, "ema_decay": self.ema.decays[0] if self.ema else None,
                "shape": list(self.shape), "num_classes": self.num_classes}
        checkpoint.save_train_state(self.run_dir / "train_state.pt", state)
        checkpoint.save_weights(self.run_dir / "weights.safetensors", self.ema_weights(), resolved, **meta)
        checkpoint.save_weights(self.run_dir / "weights_raw.safetensors", self.net.state_dict(), resolved, **{**meta, "ema_decay": None})

    # -- one step -----------------------------------------------------------------------------
    def train_step(self) -> dict[str, float] | None:
        x, y = next(self.loader)
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, self.cfg)
        self.opt.zero_grad(set_to_none=True)
        extra = {}
        if self.augment is not None:  # on the device; its labels condition every network call of the step
            x, labels = self.augment(x)
            extra["cond"] = {"augment": labels}
        with bf16_autocast(self.bf16, self.device):
            loss, logs = self.objective.loss(self.train_fn, x, y if self.num_classes else None, step=self.step, **extra)
        finite = torch.isfinite(loss.detach()).float()
        if finite.item():
            loss.backward()
        if self.dist.enabled:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank skips together
        if not finite.item():
            self.opt.zero_grad(set_to_none=True)
            self.nonfinite_total += 1
            self.nonfinite_run += 1
            if self.nonfinite_run >= self.cfg.max_nonfinite:
                raise MFError(
                    f"the loss was not finite for {self.nonfinite_run} steps in a row (step {self.step}); the run stopped "
                    f"without saving the diverged weights. The last good checkpoint is in {self.run_dir}. Lower train.lr, "
                    "set train.grad_clip, or use train.precision=fp32."
                )
            return None
        self.nonfinite_run = 0
        if self.dist.enabled:
            all_reduce_grads(self.params, self.dist.world_size)
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf"))
        if not torch.isfinite(gnorm):
            self.opt.zero_grad(set_to_none=True)
            self.nonfinite_total += 1
            return None
        self.opt.step()
        if self.ema and (self.step + 1) % self.cfg.ema_every == 0:
            self.ema.update(self.net, self.cfg.ema_every)
        out = {"loss": loss.item(), "grad_norm": gnorm.item(), "lr": self.opt.param_groups[0]["lr"]}
        out.update({k: float(v) for k, v in logs.items() if k != "loss"})
        return out

    # -- the loop -----------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def fit(self) -> Path:
        from mfcli.progress import TrainProgress

        old = {}
        for s in (signal.SIGINT, signal.SIGTERM):  # finish the step, save, then stop
            try:
                old[s] = signal.signal(s, self._on_signal)
            except ValueError:  # not the main thread
                pass
        if self.dist.main:
            self.log = runs.JsonlLog(self.run_dir / "log.jsonl")
        if self.dist.main and self.cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tb"))
            except Exception:  # tensorboard is optional at run time
                self.tb = None
        progress = TrainProgress(self.cfg.steps, self.step, disable=self.quiet)
        t_last, n_last, window = time.perf_counter(), 0, []
        try:
            with progress:
                while self.step < self.cfg.steps:
                    out = self.train_step()
                    self.step += 1
                    n_last += self.recipe.loader.batch_size
                    if out is not None:
                        window.append(out)
                    stop = self._stop_signal is not None
                    if self.dist.enabled:  # agree on stopping so no rank waits in a collective
                        flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
                        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                        stop = bool(flag.item())
                    if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps or stop:
                        now = time.perf_counter()
                        rec = {"step": self.step, "images_per_s": n_last / max(now - t_last, 1e-9), "nonfinite": self.nonfinite_total}
                        if window:
                            for k in window[-1]:
                                rec[k] = sum(w[k] for w in window) / len(window)
                        rec["time"] = time.time()
                        self._log(rec)
                        progress.update(self.step, rec)
                        t_last, n_last, window = now, 0, []
                    else:
                        progress.update(self.step, None)
                    if self.cfg.sample_every and self.step % self.cfg.sample_every == 0 and self.dist.main:
                        self.sample_grid()
                    if self.step % self.cfg.ckpt_every == 0 or self.step == self.cfg.steps or stop:
                        self.save()
                    if stop:
                        raise StopTraining
        except StopTraining:
            name = signal.Signals(self._stop_signal).name if self._stop_signal else "signal"
            if self.dist.main:
                from mfcli.console import console

                console.print(f"[yellow]{name}: stopped at step {self.step}; checkpoint saved. Resume with: mf train --resume {self.run_dir}[/]")
            raise
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if self.log:
                self.log.close()
            if self.tb:
                self.tb.close()
        if self.dist.main:
            self.sample_grid()
            self.plot_loss()
        return self.run_dir

    def _log(self, rec: dict[str, Any]) -> None:
        if not self.dist.main:
            return
        self.log.write(rec)
        if self.tb:
            for k, v in rec.items():
                if k not in ("step", "time") and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, rec["step"])

    # -- artefacts ----------------------------------------------------------------------------
    def ema_model(self) -> torch.nn.Module:
        m = copy.deepcopy(self.net)
        m.load_state_dict(self.ema_weights())
        return m.eval()

    def sample_grid(self) -> Path | None:
        from mfcli import viz
        from mfcli.sampling import draw

        net = self.ema_model()
        n = 2000 if len(self.shape) == 1 else 64
        gen = torch.Generator(device="cpu").manual_seed(self.cfg.seed + 12345)  # never touches the training RNG
        x, _ = draw(net, self.objective, self.shape, self.num_classes, num=n, nfe=self.recipe.sample.nfe, generator=gen, device=self.device, guidance=None)
        out = self.run_dir / "samples" / f"step{self.step:07d}.png"
        out.parent.mkdir(exist_ok=True)
        if len(self.shape) == 1:
            data = self.dataset.tensors()[0][:n]
            viz.scatter_png(x.cpu(), data.cpu(), out, title=f"{self.recipe.run.name}: step {self.step}, {self.recipe.sample.nfe}-NFE")
        else:
            viz.grid_png(x.cpu(), out)
        return out

    def plot_loss(self) -> None:
        from mfcli import viz

        viz.loss_png(runs.read_log(self.run_dir / "log.jsonl"), self.run_dir / "loss.png")


# --------------------------------------------------------------------------------------------
# Entry points: one process, or one worker of several
# --------------------------------------------------------------------------------------------
def run_worker(recipe: Recipe, *, run_dir: Path | None, resume: bool, dist_info: Dist, device: str | None = None, runs_dir: str | None = None) -> Path:
    """Build, (resume,) train. Rank 0 makes the run directory and tells the others where it is."""
    from mfcli.console import console

    trainer = Trainer(recipe, None, dist_info=dist_info, device=device)
    if dist_info.main and run_dir is None:
        run_dir = runs.new_run_dir(runs_dir or recipe.run.dir, recipe.run.name)
        runs.write_config(run_dir, recipe.resolved(), recipe.path, recipe.overrides)
    if dist_info.enabled:
        box = [str(run_dir) if run_dir else None]
        dist.broadcast_object_list(box, 0)
        run_dir = Path(box[0])
    trainer.run_dir = Path(run_dir)
    if resume:
        trainer.load_state(checkpoint.load_train_state(trainer.run_dir / "train_state.pt"))
        if trainer.step >= trainer.cfg.steps:
            raise MFError(f"{run_dir} already finished its {trainer.cfg.steps} steps; resume with a larger train.steps=N to continue.")
    if dist_info.main:
        n = sum(p.numel() for p in trainer.net.parameters())
        what = f"resuming at step {trainer.step}" if resume else "new run"
        console.print(f"[bold]{trainer.run_dir}[/] ({what}): {recipe.names['objective']} on {recipe.names['backbone']} "
                      f"({n / 1e6:.2f}M parameters), {recipe.names['data']}, device {trainer.device}"
                      f"{f' x {dist_info.world_size} processes' if dist_info.enabled else ''}, "
                      f"{'bf16' if trainer.bf16 else 'fp32'}")
    return trainer.fit()


def _spawned(local_rank: int, world_size: int, backend: str, port: int, recipe: Recipe, run_dir, resume, device, runs_dir) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(local_rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
    dist.init_process_group(backend, rank=local_rank, world_size=world_size)
    try:
        run_worker(recipe, run_dir=run_dir, resume=resume, dist_info=Dist(local_rank, world_size, local_rank), device=device, runs_dir=runs_dir)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(recipe: Recipe, *, nprocs: int, run_dir: Path | None = None, resume: bool = False, device: str | None = None, runs_dir: str | None = None) -> Path:
    """Train with ``nprocs`` processes on this machine (NCCL on GPUs, gloo on the CPU); 1: in-process.

    Under torchrun (WORLD_SIZE set in the environment) the process group comes from torchrun.
    """
    env = dist_from_env()
    if env.enabled:
        backend = "nccl" if torch.cuda.is_available() and (device or recipe.train.device) != "cpu" else "gloo"
        dist.init_process_group(backend)
        try:
            return run_worker(recipe, run_dir=run_dir, resume=resume, dist_info=env, device=device, runs_dir=runs_dir)
        finally:
            dist.destroy_process_group()
    if nprocs <= 1:
        return run_worker(recipe, run_dir=run_dir, resume=resume, dist_info=Dist(), device=device, runs_dir=runs_dir)
    import torch.multiprocessing as mp

    on_gpu = torch.cuda.is_available() and (device or recipe.train.device) not in ("cpu", "mps")
    backend = "nccl" if on_gpu else "gloo"
    if run_dir is None:  # made here so the parent can report it
        run_dir = runs.new_run_dir(runs_dir or recipe.run.dir, recipe.run.name)
        runs.write_config(run_dir, recipe.resolved(), recipe.path, recipe.overrides)
    try:
        mp.spawn(_spawned, args=(nprocs, backend, free_port(), recipe, run_dir, resume, device, runs_dir), nprocs=nprocs, join=True)
    except mp.ProcessRaisedException as exc:
        msg = str(exc).strip().splitlines()
        raise MFError(f"a training process failed: {msg[-1] if msg else exc}") from exc
    return Path(run_dir)
