"""The ``mf compress`` recipe: one table per phase, validated like every mf recipe.

A compress recipe starts with ``task = "compress"`` (so ``mf train`` and ``mf recipes``
can tell it from a training recipe) and has the tables

    [run]        run directory, seed, device
    [data]       a registered dataset (``name = "..."`` plus that dataset's own keys)
    [baseline]   phase 1: training the baseline when no --weights are given
    [pairs]      phase 2: the stage-input / stage-output features of the frozen baseline
    [meanflow]   phase 3: the MeanFlow objective and budget of each stage's module
    [modules]    module sizes: [modules.default] and per-stage [modules.stageN] overrides
    [meta]       phase 4: end-to-end fine-tune of the meta model
    [incubate]   phase 5: budget of each incubated stage
    [finetune]   phase 6: global fine-tune of the hybrid
    [eval]       test accuracy and images/s for the report

Unknown keys name the table and suggest the nearest valid key (``mfcli.config.build_dataclass``).
"""

from __future__ import annotations

import copy
import math
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mfcli.config import apply_overrides, build_dataclass, read_toml
from mfcli.errors import MFError
from mfcli.plugins import Registry, suggest

TASK = "compress"
SECTIONS = ("run", "data", "baseline", "pairs", "meanflow", "modules", "dropin", "meta", "incubate", "finetune", "eval")


@dataclass
class RunSection:
    name: str = ""  # run-directory name after NNNNN-; default "compress-<model>"
    dir: str = "runs"  # parent folder of run directories
    seed: int = 0  # every random draw of the pipeline (subsets, data order, init, (t, r))
    device: str = "auto"  # auto | cpu | cuda | mps
    threads: int = 0  # torch CPU threads; 0 leaves torch's default (one per core)
    channels_last: bool = True  # models and batches in NHWC memory layout (2.1× faster training steps on a 2-core CPU for ResNet-56)
    # bf16 autocast of the classifier-loss training steps (baseline, drop-in, meta, incubation,
    # fine-tune); the MeanFlow phases (JVP), the kept features and targets, and every evaluation stay fp32.
    # auto: bf16 on CUDA and on a CPU with bf16 instructions (AVX512-BF16, AMX), fp32 elsewhere
    # (without them bf16 is emulated: a ResNet-56 drop-in step takes over ten times as long as in fp32).
    precision: Literal["auto", "fp32", "bf16"] = "auto"


@dataclass
class ClassifierPhase:
    """A classifier training budget (label-smoothed cross-entropy, cosine learning rate)."""

    epochs: float = 0.0  # passes over the training split; or give steps
    steps: int = 0  # optimizer steps (wins over epochs when > 0); both 0 skips the phase
    batch_size: int = 128
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-6  # end of the cosine decay
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    weight_decay: float = 0.01
    momentum: float = 0.9  # SGD only
    label_smoothing: float = 0.1
    distill: float = 0.0  # weight α of distillation from the frozen baseline: (1-α) CE + α T² KL(teacher || student); 0: CE only, as in the paper
    distill_temperature: float = 4.0  # T of the distillation term
    crop_pad: int = 4  # random crops after zero-padding by this many pixels; 0 disables
    grad_clip: float = 0.0  # max global gradient norm; 0 disables
    log_every: int = 50  # steps between log lines
    ckpt_every: int = 500  # steps between mid-phase checkpoints

    def validate(self) -> None:
        _budget_checks(self)
        _loss_checks(self)
        if self.crop_pad < 0:
            raise ValueError(f"crop_pad must be 0 or more, got {self.crop_pad}")


@dataclass
class IncubatePhase(ClassifierPhase):
    """Phase 5: each incubated stage's residual blocks trained inside the otherwise frozen meta model."""

    # true: stages run in order and each one is trained with the stages incubated before it in
    # place (frozen), so every stage learns on the inputs it gets in the hybrid; false: every stage
    # inside the plain meta model (independent, as deep incubation trains modules).
    progressive: bool = True


@dataclass
class PairsSection:
    num_images: int = 5000  # training images whose features are computed once and kept; 0: recomputed from the frozen baseline at every step
    batch_size: int = 250  # forward batch of the frozen baseline
    dtype: Literal["float16", "float32"] = "float16"  # storage of the kept features (training is fp32)

    def validate(self) -> None:
        if self.num_images < 0 or self.batch_size < 1:
            raise ValueError("num_images must be 0 or more and batch_size at least 1")


@dataclass
class MeanFlowPhase:
    """Phase 3: each stage's module trained on its feature pairs (one stage after another)."""

    epochs: float = 0.0  # passes over the feature pairs (or the training split when pairs are not kept)
    steps: int = 0  # optimizer steps per stage (wins over epochs when > 0)
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    align_weight: float = 1.0  # weight of the endpoint loss that trains the alignment layer; 0: alignment left to the meta fine-tune
    log_every: int = 50
    ckpt_every: int = 500
    objective: dict = field(default_factory=dict)  # settings of the registered `mf` objective (time_sampler, ratio_r_neq_t, norm_p, norm_eps, jvp_mode, ...)

    def validate(self) -> None:
        _budget_checks(self)
        if self.align_weight < 0:
            raise ValueError(f"align_weight must be 0 or more, got {self.align_weight}")


@dataclass
class DropInPhase:
    """Phase 3b (not in the paper; off unless steps or epochs > 0): every stage that keeps its
    MeanFlow module in the hybrid, trained as a drop-in replacement for its stage inside the
    frozen baseline, on kept stage inputs, towards the baseline's logits on the same images."""

    epochs: float = 0.0  # passes over the kept images; or give steps
    steps: int = 0  # optimizer steps per stage (wins over epochs when > 0); both 0 skip the phase
    num_images: int = 0  # training images whose stage inputs are kept (one pass of the frozen baseline); 0: the whole training split
    views: int = 1  # kept views of each image: the image itself, then views - 1 random crops (padding crop_pad) with random flips
    crop_pad: int = 4
    dtype: Literal["float16", "float32"] = "float16"  # storage of the kept inputs (the steps compute in fp32, or in bf16 with run.precision)
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_steps: int = 10
    weight_decay: float = 0.01
    label_smoothing: float = 0.1
    distill: float = 0.9  # (1-α) CE(labels) + α T² KL(baseline || module), as in ClassifierPhase
    distill_temperature: float = 4.0
    # + w · ||pooled − pooled_baseline||², summed over channels: the features the head receives, against the
    # baseline's on the same view (kept with the logits; feature distillation at the head's input)
    feature_weight: float = 0.0
    grad_clip: float = 0.0
    log_every: int = 100
    ckpt_every: int = 500

    def validate(self) -> None:
        _budget_checks(self)
        if self.feature_weight < 0:
            raise ValueError(f"feature_weight must be 0 (off) or more, got {self.feature_weight}")
        if self.num_images < 0:
            raise ValueError(f"num_images must be 0 (the whole training split) or more, got {self.num_images}")
        if self.views < 1 or self.crop_pad < 0:
            raise ValueError(f"need views >= 1 (the image itself counts) and crop_pad >= 0, got {self.views} and {self.crop_pad}")
        _loss_checks(self)


@dataclass
class ModuleConfig:
    """Size of one stage's MeanFlow module (METHODS §5.2)."""

    align_kernel: int = 3  # alignment conv: 1 (1×1) or 3 (3×3); its stride matches the stage's
    time_dim: int = 32  # d_t of the time embedding Linear(2 → d_t) of (r, t)
    hidden: int = 256  # H of the velocity MLP C + d_t → H → H → C
    steps: int = 0  # sampler steps; 0: 1, or [modules] last_stage_steps for the last stage
    per_step_nets: bool = False  # one velocity net per step (a chain of one-step MeanFlows) instead of one shared net
    net: str = "mlp"  # velocity net: "mlp" (pointwise over pixels, as released) or "conv" (3×3 convolutions, mixes pixels)
    train_steps: int = 0  # phase-3 optimizer steps for this stage's module; 0: [meanflow] steps / epochs

    def validate(self) -> None:
        if self.train_steps < 0:
            raise ValueError(f"train_steps must be 0 (use [meanflow]) or more, got {self.train_steps}")
        if self.net not in ("mlp", "conv"):
            raise ValueError(f"net must be 'mlp' or 'conv', got {self.net!r}")
        if self.align_kernel not in (1, 3):
            raise ValueError(f"align_kernel must be 1 or 3, got {self.align_kernel}")
        if self.time_dim < 1 or self.hidden < 1:
            raise ValueError(f"time_dim and hidden must be at least 1, got {self.time_dim} and {self.hidden}")
        if self.steps < 0:
            raise ValueError(f"steps must be 0 (automatic) or more, got {self.steps}")


@dataclass
class ModulesSection:
    last_stage_steps: int = 2
    default: ModuleConfig = field(default_factory=ModuleConfig)
    stages: dict[int, ModuleConfig] = field(default_factory=dict)  # stage number (from 1) -> its config
    overrides: dict[int, dict] = field(default_factory=dict)  # the keys each [modules.stageN] sets

    def for_stage(self, stage: int) -> ModuleConfig:
        return self.stages.get(stage, self.default)

    def steps_for(self, stage: int, num_stages: int) -> int:
        cfg = self.for_stage(stage)
        if cfg.steps:
            return cfg.steps
        return self.last_stage_steps if stage == num_stages else 1

    def resolved(self) -> dict[str, Any]:
        out: dict[str, Any] = {"last_stage_steps": self.last_stage_steps, "default": dataclasses.asdict(self.default)}
        for k in sorted(self.overrides):
            out[f"stage{k}"] = dict(self.overrides[k])
        return out


@dataclass
class EvalSection:
    batch_size: int = 500  # test forward batch
    num_images: int = 0  # test images for top-1 accuracy; 0: the whole test split
    speed_batch_size: int = 128  # batch for images/s
    speed_rounds: int = 5  # timed batches per model (interleaved across models, median reported)

    def validate(self) -> None:
        if self.batch_size < 1 or self.num_images < 0 or self.speed_batch_size < 1 or self.speed_rounds < 1:
            raise ValueError("batch sizes and speed_rounds must be at least 1, num_images 0 or more")


def _budget_checks(cfg) -> None:
    if cfg.steps < 0 or cfg.epochs < 0:
        raise ValueError(f"steps and epochs must be 0 or more, got steps={cfg.steps}, epochs={cfg.epochs}")
    if cfg.steps > 0 and cfg.epochs > 0:
        raise ValueError(f"give steps or epochs, not both (steps={cfg.steps}, epochs={cfg.epochs})")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {cfg.batch_size}")
    if cfg.lr <= 0 or cfg.min_lr < 0 or cfg.min_lr > cfg.lr:
        raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={cfg.lr}, min_lr={cfg.min_lr}")
    if cfg.warmup_steps < 0 or cfg.grad_clip < 0 or cfg.weight_decay < 0:
        raise ValueError("warmup_steps, grad_clip and weight_decay must be 0 or more")
    if cfg.log_every < 1 or cfg.ckpt_every < 1:
        raise ValueError("log_every and ckpt_every must be at least 1")


def _loss_checks(cfg) -> None:
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {cfg.label_smoothing}")
    if not 0.0 <= cfg.distill <= 1.0 or cfg.distill_temperature <= 0:
        raise ValueError(f"need 0 <= distill <= 1 and distill_temperature > 0, got {cfg.distill} and {cfg.distill_temperature}")


def steps_of(cfg, num_samples: int) -> int:
    """A phase's optimizer steps: ``steps``, or ``ceil(epochs × batches per epoch)``."""
    if cfg.steps > 0:
        return cfg.steps
    if cfg.epochs <= 0:
        return 0
    per_epoch = max(1, num_samples // cfg.batch_size)
    return max(1, math.ceil(cfg.epochs * per_epoch))


@dataclass
class CompressRecipe:
    path: str
    raw: dict[str, Any]
    overrides: list[str]
    run: RunSection
    data_name: str
    data: Any  # the dataset plugin's config
    baseline: ClassifierPhase
    pairs: PairsSection
    meanflow: MeanFlowPhase
    objective: Any  # the `mf` objective's config
    modules: ModulesSection
    dropin: DropInPhase
    meta: ClassifierPhase
    incubate: IncubatePhase
    finetune: ClassifierPhase
    eval: EvalSection

    def resolved(self) -> dict[str, Any]:
        """Every value, defaults filled in, as JSON-able data (the run's config.json)."""
        out: dict[str, Any] = {"task": TASK, "run": dataclasses.asdict(self.run)}
        out["data"] = {"name": self.data_name, **dataclasses.asdict(self.data)}
        for sec in ("baseline", "pairs"):
            out[sec] = dataclasses.asdict(getattr(self, sec))
        out["meanflow"] = {**dataclasses.asdict(self.meanflow), "objective": dataclasses.asdict(self.objective)}
        out["modules"] = self.modules.resolved()
        for sec in ("dropin", "meta", "incubate", "finetune", "eval"):
            out[sec] = dataclasses.asdict(getattr(self, sec))
        return out


def is_compress_recipe(raw: dict[str, Any]) -> bool:
    return raw.get("task") == TASK


def _modules(table: dict[str, Any], where: str) -> ModulesSection:
    table = dict(table)
    last = table.pop("last_stage_steps", 2)
    if isinstance(last, bool) or not isinstance(last, int) or last < 1:
        raise MFError(f"{where} [modules] last_stage_steps: expected an int of at least 1, got {last!r}.")
    default_raw = table.pop("default", {})
    if not isinstance(default_raw, dict):
        raise MFError(f"{where} [modules] default must be a table ([modules.default]), got {type(default_raw).__name__}.")
    default = build_dataclass(ModuleConfig, default_raw, f"{where} [modules.default]")
    stages, overrides = {}, {}
    for key, sub in table.items():
        m = re.fullmatch(r"stage([1-9]\d*)", key)
        if not m:
            valid = ["default", "last_stage_steps", "stage1", "stage2", "stage3", "stage4"]
            raise MFError(f"{where} [modules]: unknown key '{key}'.{suggest(key, valid)} Valid keys: default, last_stage_steps, stageN (N = 1, 2, ...).")
        if not isinstance(sub, dict):
            raise MFError(f"{where} [modules] {key} must be a table ([modules.{key}]), got {type(sub).__name__}.")
        n = int(m.group(1))
        stages[n] = build_dataclass(ModuleConfig, {**dataclasses.asdict(default), **sub}, f"{where} [modules.{key}]")
        overrides[n] = dict(sub)
    return ModulesSection(last, default, stages, overrides)


def load_compress_recipe(path: str | Path | None, overrides: list[str] | None = None, *, raw: dict | None = None,
                         registry: Registry | None = None) -> CompressRecipe:
    """Read, override and validate a compress recipe; errors name the file, the table and the key.

    ``path`` None with ``raw`` None gives the defaults of every table (a dataset must still be named).
    """
    from mfcli.plugins import registry as default_registry

    reg = registry or default_registry()
    overrides = list(overrides or [])
    where0 = str(path) if path is not None else "compress recipe"
    if raw is None:
        raw = read_toml(path) if path is not None else {"task": TASK}
    raw = apply_overrides(copy.deepcopy(raw), overrides, sections=SECTIONS)
    task = raw.pop("task", None)
    if task != TASK:
        raise MFError(f"{where0} is not a compress recipe: it needs task = \"{TASK}\" as its first line (got {task!r}). "
                      "Training recipes run with `mf train`.")
    for sec, val in raw.items():
        if sec not in SECTIONS:
            raise MFError(f"{where0}: unknown table [{sec}].{suggest(sec, SECTIONS)} Tables: {', '.join(SECTIONS)}.")
        if not isinstance(val, dict):
            raise MFError(f"{where0}: '{sec}' must be a table ([{sec}]), got {type(val).__name__}.")

    def table(sec: str) -> dict[str, Any]:
        return dict(raw.get(sec, {}))

    run = build_dataclass(RunSection, table("run"), f"{where0} [run]")
    data = table("data")
    data_name = data.pop("name", None)
    if not isinstance(data_name, str) or not data_name:
        raise MFError(f"{where0}: [data] needs name = \"...\" naming a registered dataset (`mf plugins` lists them), "
                      "or pass --dataset NAME.")
    comp = reg.get("datasets", data_name)
    data_cfg = build_dataclass(comp.config, data, f"{where0} [data] (dataset '{data_name}')")
    mf_table = table("meanflow")
    obj_raw = mf_table.get("objective", {})
    if not isinstance(obj_raw, dict):
        raise MFError(f"{where0} [meanflow] objective must be a table ([meanflow.objective]), got {type(obj_raw).__name__}.")
    obj_comp = reg.get("objectives", "mf")
    objective = build_dataclass(obj_comp.config, obj_raw, f"{where0} [meanflow.objective] (objective 'mf')")
    meanflow = build_dataclass(MeanFlowPhase, mf_table, f"{where0} [meanflow]")
    return CompressRecipe(
        path=where0, raw=raw, overrides=overrides, run=run, data_name=data_name, data=data_cfg,
        baseline=build_dataclass(ClassifierPhase, table("baseline"), f"{where0} [baseline]"),
        pairs=build_dataclass(PairsSection, table("pairs"), f"{where0} [pairs]"),
        meanflow=meanflow, objective=objective,
        modules=_modules(table("modules"), where0),
        dropin=build_dataclass(DropInPhase, table("dropin"), f"{where0} [dropin]"),
        meta=build_dataclass(ClassifierPhase, table("meta"), f"{where0} [meta]"),
        incubate=build_dataclass(IncubatePhase, table("incubate"), f"{where0} [incubate]"),
        finetune=build_dataclass(ClassifierPhase, table("finetune"), f"{where0} [finetune]"),
        eval=build_dataclass(EvalSection, table("eval"), f"{where0} [eval]"),
    )
