"""ResNets with some stages replaced by MeanFlow modules, and their checkpoints.

The ResNet itself comes from the registered ``resnet`` backbone (a ``ResNetClassifier``:
``.normalize``, ``.stem``, ``.stages``, ``.head``); a compressed model is that classifier
with some entries of ``.stages`` swapped for :class:`~mfcli.compress.modules.MeanFlowModule`,
so its forward pass is the ResNet's own. A compressed checkpoint is a safetensors file
whose metadata describes which stage is what (no pickle, no code), so
:func:`load_compressed` rebuilds it with one call.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mfcli import checkpoint
from mfcli.compress.modules import MeanFlowModule, ModuleSpec
from mfcli.errors import MFError
from mfcli.plugins import Registry

ARCH_FORMAT = "mf-compressed-1"
BACKBONE = "resnet"  # the registered backbone that provides the ResNet classifiers


def build_base(name: str, *, num_classes: int, shape: tuple[int, ...], weights: str | None = None,
               registry: Registry | None = None) -> nn.Module:
    """The ResNet ``name`` from the registered ``resnet`` backbone, with ``weights`` loaded when given.

    Unknown names and weights that do not fit the model are MFErrors raised by the backbone.
    """
    from mfcli.config import build_dataclass
    from mfcli.plugins import registry as default_registry

    reg = registry or default_registry()
    comp = reg.get("backbones", BACKBONE)
    values: dict[str, Any] = {"arch": name}
    if weights:
        values["weights"] = str(weights)
    cfg = build_dataclass(comp.config, values, f"backbone '{BACKBONE}'")
    model = comp.factory(cfg, shape=tuple(shape), num_classes=int(num_classes))
    for attr in ("stem", "stages", "head"):
        if not hasattr(model, attr):
            raise MFError(f"the '{BACKBONE}' backbone built a {type(model).__name__} without .{attr}; "
                          "mf compress needs a ResNet classifier with .stem, .stages and .head.")
    return model


@dataclass(frozen=True)
class StageIO:
    """Shapes (C, H, W) of one stage's input and output, for one image."""

    input: tuple[int, int, int]
    output: tuple[int, int, int]

    @property
    def stride(self) -> int:
        return self.input[1] // self.output[1]


@torch.no_grad()
def stage_io(model: nn.Module, shape: tuple[int, ...]) -> list[StageIO]:
    """Run one blank image through ``model`` and record every stage's input and output shape."""
    was = model.training
    model.eval()
    try:
        p = next(model.parameters())
        x = torch.zeros(1, *shape, device=p.device, dtype=p.dtype)
        h = model.stem(model.normalize(x))
        out = []
        for stage in model.stages:
            y = stage(h)
            out.append(StageIO(tuple(h.shape[1:]), tuple(y.shape[1:])))
            h = y
    finally:
        model.train(was)
    return out


def module_spec(io: StageIO, *, align_kernel: int, time_dim: int, hidden: int, steps: int, per_step_nets: bool,
                net: str = "mlp") -> ModuleSpec:
    """The module for a stage: alignment from the stage's input to its output's shape."""
    (cin, hin, win), (cout, hout, wout) = io.input, io.output
    if hout < 1 or hin % hout or win % wout or hin // hout != win // wout:
        raise MFError(f"a stage maps {io.input} to {io.output}: no single conv stride aligns those shapes.")
    spec = ModuleSpec(cin, cout, hin // hout, align_kernel, time_dim, hidden, steps, per_step_nets, net)
    spec.validate()
    return spec


def replace_stages(model: nn.Module, modules: dict[int, nn.Module]) -> nn.Module:
    """A deep copy of ``model`` whose stages ``k`` (numbered from 1) are ``modules[k]`` (deep-copied too)."""
    out = copy.deepcopy(model)
    for k, m in modules.items():
        out.stages[k - 1] = copy.deepcopy(m)
    return out


def describe(model: nn.Module, *, base: str, num_classes: int, shape: tuple[int, ...]) -> dict[str, Any]:
    """The architecture of a (possibly) compressed ResNet, as JSON: enough to rebuild it."""
    stages = []
    for s in model.stages:
        if isinstance(s, MeanFlowModule):
            stages.append({"kind": "meanflow", **s.spec.to_json()})
        else:
            stages.append({"kind": "blocks"})  # the base ResNet's own residual blocks
    return {"format": ARCH_FORMAT, "base": base, "num_classes": int(num_classes), "input_shape": list(shape), "stages": stages}


def build_from_description(arch: dict[str, Any], registry: Registry | None = None) -> nn.Module:
    """An untrained model with the architecture ``arch`` (see :func:`describe`)."""
    try:
        if arch.get("format") != ARCH_FORMAT:
            raise KeyError("format")
        base = build_base(arch["base"], num_classes=int(arch["num_classes"]), shape=tuple(arch["input_shape"]), registry=registry)
        stages = arch["stages"]
        if len(stages) != len(base.stages):
            raise MFError(f"the description has {len(stages)} stages, a {arch['base']} has {len(base.stages)}.")
        for i, st in enumerate(stages):
            if st["kind"] == "meanflow":
                fields = {k: v for k, v in st.items() if k != "kind"}
                base.stages[i] = MeanFlowModule(ModuleSpec(**fields))
            elif st["kind"] != "blocks":
                raise KeyError(f"stage kind {st['kind']!r}")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MFError(f"the architecture description is not one mf can build ({type(exc).__name__}: {exc}).") from exc
    return base


def save_compressed(path: str | Path, model: nn.Module, *, base: str, num_classes: int, shape: tuple[int, ...],
                    config: dict[str, Any], **meta: Any) -> dict[str, Any]:
    """Atomically write ``model`` as safetensors with its architecture in the metadata; returns the description."""
    arch = describe(model, base=base, num_classes=num_classes, shape=shape)
    checkpoint.save_weights(path, model.state_dict(), config, arch=arch, kind="compressed-resnet", **meta)
    return arch


def load_compressed(path: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """Load a model written by ``mf compress`` (``hybrid.safetensors``, ``meta.safetensors``) in eval mode.

    One call, no pickle: the architecture is rebuilt from the file's metadata and the weights
    are loaded strictly. The result is a ResNet classifier: ``model(x)`` with x (B, 3, H, W)
    in [-1, 1] returns logits (B, num_classes). Errors (missing, truncated or foreign files)
    are MFErrors.
    """
    state, meta = checkpoint.load_weights(path)
    arch = meta.get("arch")
    if not isinstance(arch, dict):
        raise MFError(f"'{path}' is an mf checkpoint but not a compressed ResNet (no architecture in its metadata); "
                      "`mf compress` writes hybrid.safetensors and meta.safetensors.")
    model = build_from_description(arch)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise MFError(f"the weights in '{path}' do not match the architecture in its own metadata: {first}") from exc
    return model.to(device).eval()
