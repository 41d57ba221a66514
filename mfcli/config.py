"""Recipes: TOML files with one table per part, validated against dataclass configs.

A recipe names a plugin in each of ``[data]``, ``[backbone]`` and ``[objective]`` with
``name = "..."``; the other keys of those tables are validated against the plugin's config
dataclass. ``[run]``, ``[train]``, ``[sample]`` and ``[eval]`` are the core's own. Overrides
``key.sub=value`` are parsed as TOML values (falling back to a string) and applied before
validation, so they get the same checks as the file.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from mfcli.errors import MFError
from mfcli.plugins import KIND_OF_SECTION, Registry, suggest


# --------------------------------------------------------------------------------------------
# The core's own sections
# --------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    name: str = ""  # run name; defaults to the recipe's file name
    dir: str = "runs"  # parent folder of run directories


@dataclass
class DataLoaderConfig:
    batch_size: int = 128  # global batch size (split across ranks)
    on_device: Literal["auto", "yes", "no"] = "auto"  # hold small datasets on the device as tensors
    num_workers: int = 4  # DataLoader workers when streaming
    augment: Literal["none", "edm"] = "none"  # "edm": EDM's geometric augmentation with labels as conditioning (mfcli.augment)
    augment_p: float = 0.12  # probability of each augmentation ("edm"; MeanFlow CIFAR-10: 0.12)

    def validate(self) -> None:
        if not 0.0 <= self.augment_p <= 1.0:
            raise ValueError(f"augment_p must lie in [0, 1], got {self.augment_p}")


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    lr: float = 1e-4  # peak learning rate
    optimizer: Literal["adam", "adamw"] = "adam"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam betas
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    schedule: Literal["constant", "cosine"] = "constant"  # after warm-up
    min_lr: float = 0.0  # floor of the cosine schedule
    grad_clip: float = 0.0  # max global grad norm; 0 disables
    ema_decays: list[float] = field(default_factory=lambda: [0.9999])  # one EMA copy per decay; the first is sampled from
    ema_every: int = 1  # update the EMA copies every N steps (decay**N per update)
    seed: int = 0
    init_from: str = ""  # weights file (or run directory) to start from, e.g. a flow-matching teacher; ignored on resume
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    compile: bool = False  # torch.compile the backbone
    device: str = "auto"  # auto | cpu | cuda | mps
    log_every: int = 50  # steps between log lines
    ckpt_every: int = 1000  # steps between checkpoints (and at the end)
    sample_every: int = 0  # steps between sample grids from the EMA weights; 0: only at the end
    max_nonfinite: int = 20  # consecutive non-finite losses before the run stops
    tensorboard: bool = True  # write TensorBoard event files next to log.jsonl


@dataclass
class SampleConfig:
    nfe: int = 1  # network evaluations per sample
    num: int = 64  # samples to draw
    guidance: float = 1.0  # guidance scale (meaning depends on the objective)
    seed: int = 0
    batch_size: int = 256
    timesteps: list[float] = field(default_factory=list)  # explicit schedule from 1 to 0 (length nfe + 1); empty: linspace


@dataclass
class EvalConfig:
    metric: str = "fid"  # fid | fd-resnet56 | accuracy
    num: int = 50000  # samples for distribution metrics
    reference: str = ""  # dataset name or folder for the reference statistics


CORE_SECTIONS: dict[str, type] = {"run": RunConfig, "train": TrainConfig, "sample": SampleConfig, "eval": EvalConfig}
PLUGIN_SECTIONS = ("data", "backbone", "objective")
ALL_SECTIONS = ("run", "data", "backbone", "objective", "train", "sample", "eval")


# --------------------------------------------------------------------------------------------
# Type checking of TOML values against dataclass field types
# --------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return f"list of {_type_name(args[0])}" if args else "list"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` (from TOML) against the annotation ``tp``; return it converted (int -> float)."""
    origin = typing.get_origin(tp)
    bad = MFError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}.")
    if tp is Any:
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise MFError(f"{where}: expected {_type_name(tp)}, got {value!r}.{suggest(value, choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):  # from a run's config.json (TOML has no null)
            return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except MFError:
                pass
        raise bad
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise bad
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        items = [coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
        return items if origin is list else tuple(items)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise bad
        return value
    raise MFError(f"{where}: the config declares an unsupported type {tp!r}.")


def build_dataclass(cls: type, values: dict[str, Any], where: str, extra_ok: frozenset[str] = frozenset()) -> Any:
    """Instantiate ``cls`` from ``values``: unknown keys and wrong types are errors naming the key."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in values.items():
        if key in extra_ok:
            continue
        if key not in fields:
            valid = sorted(set(fields) | set(extra_ok))
            raise MFError(f"{where}: unknown key '{key}'.{suggest(key, valid)} Valid keys: {', '.join(valid)}.")
        kwargs[key] = coerce(value, hints[key], f"{where} {key}")
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise MFError(f"{where}: {exc}") from exc
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ValueError as exc:
            raise MFError(f"{where}: {exc}") from exc
    return obj


# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------
@dataclass
class Recipe:
    """A validated recipe: the core's dataclasses plus each plugin's name and config."""

    path: str
    raw: dict[str, Any]  # the recipe after overrides, before defaults
    overrides: list[str]
    run: RunConfig
    train: TrainConfig
    sample: SampleConfig
    eval: EvalConfig
    loader: DataLoaderConfig
    names: dict[str, str]  # section -> plugin name
    plugin_cfgs: dict[str, Any]  # section -> plugin config dataclass

    @property
    def data(self) -> Any:
        return self.plugin_cfgs["data"]

    @property
    def backbone(self) -> Any:
        return self.plugin_cfgs["backbone"]

    @property
    def objective(self) -> Any:
        return self.plugin_cfgs["objective"]

    def resolved(self) -> dict[str, Any]:
        """Every value, defaults filled in, as plain JSON-able data."""
        out: dict[str, Any] = {"run": dataclasses.asdict(self.run)}
        out["data"] = {"name": self.names["data"], **dataclasses.asdict(self.loader), **dataclasses.asdict(self.data)}
        for sec in ("backbone", "objective"):
            out[sec] = {"name": self.names[sec], **dataclasses.asdict(self.plugin_cfgs[sec])}
        for sec in ("train", "sample", "eval"):
            out[sec] = dataclasses.asdict(getattr(self, sec))
        return out


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise MFError(f"recipe '{path}' does not exist. `mf recipes ls` lists the shipped recipes.")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise MFError(f"{path}: malformed TOML: {exc}.") from exc
    except UnicodeDecodeError as exc:
        raise MFError(f"{path}: not a UTF-8 text file ({exc}).") from exc


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise MFError(f"override '{text}' is not of the form key.sub=value (for example train.steps=2000).")
    key, value = text.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise MFError(f"override '{text}': the key must name a section and a field, for example train.steps=2000.")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()  # a bare word is a string: data.root=/tmp/x
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str], sections: tuple[str, ...] = ALL_SECTIONS) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a copy of ``raw``; ``sections`` are the tables a key may start with."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] not in sections:
            raise MFError(f"override '{text}': unknown section '{parts[0]}'.{suggest(parts[0], sections)} Sections: {', '.join(sections)}.")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise MFError(f"override '{text}': '{p}' is a value, not a table.")
        node[parts[-1]] = value
    return raw


def load_recipe(path: str | Path, overrides: list[str] | None = None, registry: Registry | None = None, raw: dict | None = None) -> Recipe:
    """Read, override and validate a recipe. Errors name the file, the table and the key."""
    from mfcli.plugins import registry as default_registry

    reg = registry or default_registry()
    overrides = list(overrides or [])
    raw = read_toml(path) if raw is None else raw
    where0 = str(path)
    if raw.get("task") == "compress":
        raise MFError(f"{where0} is a compress recipe (task = \"compress\"); run it with `mf compress MODEL --recipe {where0}`.")
    raw = apply_overrides(raw, overrides)
    for sec in raw:
        if sec not in ALL_SECTIONS:
            raise MFError(f"{where0}: unknown table [{sec}].{suggest(sec, ALL_SECTIONS)} Tables: {', '.join(ALL_SECTIONS)}.")
        if not isinstance(raw[sec], dict):
            raise MFError(f"{where0}: '{sec}' must be a table ([{sec}]), got {type(raw[sec]).__name__}.")
    core = {sec: build_dataclass(cls, raw.get(sec, {}), f"{where0} [{sec}]") for sec, cls in CORE_SECTIONS.items()}
    if not core["run"].name:
        core["run"].name = Path(path).stem
    names, cfgs = {}, {}
    loader_keys = frozenset(f.name for f in dataclasses.fields(DataLoaderConfig))
    loader = DataLoaderConfig()
    for sec in PLUGIN_SECTIONS:
        table = dict(raw.get(sec, {}))
        if "name" not in table:
            raise MFError(f"{where0}: [{sec}] needs name = \"...\" naming a registered {KIND_OF_SECTION[sec][:-1]} (`mf plugins` lists them).")
        name = table.pop("name")
        if not isinstance(name, str):
            raise MFError(f"{where0} [{sec}] name: expected str, got {type(name).__name__} {name!r}.")
        comp = reg.get(KIND_OF_SECTION[sec], name)
        where = f"{where0} [{sec}] ({comp.kind[:-1]} '{name}')"
        extra = loader_keys if sec == "data" else frozenset()
        cfgs[sec] = build_dataclass(comp.config, table, where, extra_ok=extra)
        if sec == "data":
            loader = build_dataclass(DataLoaderConfig, {k: v for k, v in table.items() if k in loader_keys}, f"{where0} [data]")
        names[sec] = name
    return Recipe(str(path), raw, overrides, core["run"], core["train"], core["sample"], core["eval"], loader, names, cfgs)


def recipe_from_resolved(resolved: dict[str, Any], registry: Registry | None = None) -> Recipe:
    """Rebuild a Recipe from a run's config.json ``config`` entry (all values explicit)."""
    return load_recipe(resolved.get("run", {}).get("name", "run") + ".toml", raw=copy.deepcopy(resolved), registry=registry)


def recipe_dirs() -> list[Path]:
    """Where `mf recipes` looks: ./recipes, then the recipes shipped beside the package."""
    here = Path(__file__).resolve().parent.parent / "recipes"
    dirs = [Path.cwd() / "recipes", here]
    out: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out


def find_recipe(name: str) -> Path:
    p = Path(name)
    if p.is_file():
        return p
    known: dict[str, Path] = {}
    for d in recipe_dirs():
        for f in sorted(d.glob("*.toml")):
            known.setdefault(f.stem, f)
    stem = p.stem if p.suffix == ".toml" else p.name
    if stem in known:
        return known[stem]
    raise MFError(f"no recipe '{name}'.{suggest(stem, known)} `mf recipes ls` lists them.")
