"""ResNet classifiers: the subject of ``mf compress`` (these are not generative backbones).

* ``resnet20|32|44|56|110``: the CIFAR ResNets of He et al. 2016 (§4.2): a 3×3 stem with
  16 channels, three stages of n = (depth - 2) / 6 basic blocks (16/32/64 channels,
  strides 1/2/2), parameter-free "option A" shortcuts (stride-2 subsampling and zero
  padding of the new channels), global average pooling and a linear layer. They load
  the public pretrained CIFAR-10 weights (akamaster/pytorch_resnet_cifar10).
* ``resnet18|34|50``: the CIFAR variant of the ImageNet ResNets: 3×3 stem without
  max-pool, four stages (64/128/256/512 channels × expansion), projection shortcuts;
  ResNet-50 with 10 classes has 23,520,842 parameters (METHODS §5.3).
* ``imagenet-resnet18|34|50|101|152``: torchvision's ImageNet ResNets (built offline,
  ``weights=None``).

Every model takes images in [-1, 1], like every mf dataset, and normalises them
internally (``.normalize``) to what its weights expect: mean (0.485, 0.456, 0.406) and
std (0.229, 0.224, 0.225) on [0, 1] RGB, the statistics the pretrained CIFAR ResNets
and torchvision's ImageNet weights were trained with.
"""

from __future__ import annotations

import difflib
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mfcli.errors import MFError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CIFAR_OPTION_A = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}  # blocks per stage
CIFAR_STYLE = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet34": ("basic", (3, 4, 6, 3)), "resnet50": ("bottleneck", (3, 4, 6, 3))}
IMAGENET = ("imagenet-resnet18", "imagenet-resnet34", "imagenet-resnet50", "imagenet-resnet101", "imagenet-resnet152")
RESNET_NAMES = (*CIFAR_OPTION_A, *CIFAR_STYLE, *IMAGENET)


class Normalize(nn.Module):
    """[-1, 1] images -> (x01 - mean) / std per channel; the statistics are not part of the state dict."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x + 1) / 2 - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class Head(nn.Module):
    """Global average pool + flatten + fc."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_features, num_classes)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x).flatten(1)  # (B, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pooled(x))  # (B, num_classes)


class ResNetClassifier(nn.Module):
    """normalize -> stem -> stages[0..S-1] -> head. Users number stages 1..S."""

    task = "classify"

    def __init__(self, name: str, stem: nn.Module, stages: list[nn.Module], stage_channels: list[int], num_classes: int):
        super().__init__()
        self.name, self.num_classes = name, num_classes
        self.normalize = Normalize()
        self.stem = stem
        self.stages = nn.ModuleList(stages)
        self.stage_channels = list(stage_channels)
        self.head = Head(stage_channels[-1], num_classes)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        if x.device.type == "cpu":
            # NHWC: oneDNN's CPU convolutions are about 1.3x faster in it (ResNet-56, 2 cores,
            # benchmarks/resnet_layout.py); the activations stay NHWC, features and logits agree
            # with the NCHW ones to float rounding.
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x  # (B, C, h, w)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate pooled features (B, D)."""
        return self.head.pooled(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))  # logits (B, num_classes)


def _conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """He et al. option A: subsample by 2 and zero-pad the new channels equally on both sides (no parameters)."""

    def __init__(self, cout: int, cin: int):
        super().__init__()
        self.pad = (cout - cin) // 2

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, option: str = "B"):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.shortcut = None
        self.downsample = None
        if stride != 1 or cin != planes:
            if option == "A":
                self.shortcut = PadShortcut(planes, cin)
            else:
                self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = self.shortcut(x) if self.shortcut is not None else self.downsample(x) if self.downsample is not None else x
        return F.relu(out + skip)


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (carries the stride), 1×1 expand ×4; projection shortcut when the shape changes."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, option: str = "B"):
        super().__init__()
        cout = planes * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = _conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


def _stages(block, cin, widths, counts, strides, option):
    stages, channels = [], []
    for width, n, stride in zip(widths, counts, strides):
        blocks = []
        for i in range(n):
            blocks.append(block(cin, width, stride if i == 0 else 1, option))
            cin = width * block.expansion
        stages.append(nn.Sequential(*blocks))
        channels.append(cin)
    return stages, channels


def _stem3x3(cout):
    return nn.Sequential(OrderedDict(conv1=_conv3x3(3, cout), bn1=nn.BatchNorm2d(cout), relu=nn.ReLU(inplace=True)))


def _init_cifar(model: nn.Module):
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight)


def build_resnet(name: str, num_classes: int = 10) -> ResNetClassifier:
    """Build a ResNet classifier by name (see ``RESNET_NAMES``); weights are random until ``load_resnet_weights``."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise MFError(f"A ResNet classifier needs num_classes >= 1; got {num_classes!r}.")
    key = name.lower()
    if key in CIFAR_OPTION_A:
        n = CIFAR_OPTION_A[key]
        stages, channels = _stages(BasicBlock, 16, (16, 32, 64), (n, n, n), (1, 2, 2), "A")
        model = ResNetClassifier(key, _stem3x3(16), stages, channels, num_classes)
        _init_cifar(model)
        return model
    if key in CIFAR_STYLE:
        kind, counts = CIFAR_STYLE[key]
        block = BasicBlock if kind == "basic" else Bottleneck
        stages, channels = _stages(block, 64, (64, 128, 256, 512), counts, (1, 2, 2, 2), "B")
        return ResNetClassifier(key, _stem3x3(64), stages, channels, num_classes)
    if key in IMAGENET:
        import torchvision

        tv = getattr(torchvision.models, key.removeprefix("imagenet-"))(weights=None, num_classes=num_classes)
        stem = nn.Sequential(OrderedDict(conv1=tv.conv1, bn1=tv.bn1, relu=tv.relu, maxpool=tv.maxpool))
        stages = [tv.layer1, tv.layer2, tv.layer3, tv.layer4]
        channels = [s[-1].conv3.out_channels if hasattr(s[-1], "conv3") else s[-1].conv2.out_channels for s in stages]
        model = ResNetClassifier(key, stem, stages, channels, num_classes)
        model.head.fc = tv.fc
        return model
    close = difflib.get_close_matches(key, RESNET_NAMES, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise MFError(f"Unknown ResNet {name!r}.{hint} Valid names: {', '.join(RESNET_NAMES)}.")


# ---------------------------------------------------------------------------------------------
# weights

_PREFIXES = ("module.", "_orig_mod.")


def _translate_key(key: str) -> str:
    """Map the common external layouts (akamaster, kuangliu, torchvision) onto this module's names."""
    for p in _PREFIXES:
        while key.startswith(p):
            key = key[len(p) :]
    key = re.sub(r"^(conv1|bn1)\.", r"stem.\1.", key)
    key = re.sub(r"^layer(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.", key)
    key = re.sub(r"^(linear|fc)\.", "head.fc.", key)
    key = key.replace(".shortcut.", ".downsample.")  # kuangliu's projection shortcut
    return key


def _read_state_dict(path: Path) -> dict:
    if not path.is_file():
        raise MFError(f"Weights file {str(path)!r} does not exist; check the path.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated archives, foreign pickles, garbage
        raise MFError(
            f"Cannot read weights from {str(path)!r}: the file is truncated, corrupt or not a PyTorch/safetensors "
            f"state dict ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})."
        ) from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MFError(f"{str(path)!r} does not contain a state dict of tensors (an akamaster .th file, a state dict or safetensors).")
    return obj


def _guess_arch(keys) -> str:
    blocks: dict[int, set[int]] = {}
    for k in keys:
        m = re.match(r"stages\.(\d+)\.(\d+)\.", k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not blocks:
        return ""
    counts = tuple(len(blocks[s]) for s in sorted(blocks))
    bottleneck = any(".conv3." in k for k in keys)
    if len(counts) == 3 and len(set(counts)) == 1 and f"resnet{6 * counts[0] + 2}" in CIFAR_OPTION_A:
        return f" The file looks like a resnet{6 * counts[0] + 2} (3 stages of {counts[0]} blocks)."
    return f" The file has {len(counts)} stages of {'/'.join(map(str, counts))} {'bottleneck' if bottleneck else 'basic'} blocks."


def load_resnet_weights(model: ResNetClassifier, path) -> ResNetClassifier:
    """Load an akamaster ``.th`` file, a plain state dict or a ``.safetensors`` file into ``model`` (strict).

    ``module.`` prefixes are stripped and external layouts translated; any mismatch of
    keys or shapes raises an MFError that names the problem.
    """
    path = Path(path)
    raw = _read_state_dict(path)
    sd = {_translate_key(k): v for k, v in raw.items()}
    own = model.state_dict()
    file_keys = list(sd)
    # BatchNorm step counters are bookkeeping; old checkpoints may lack them
    for k in own:
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = own[k]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} (file {tuple(sd[k].shape)}, model {tuple(own[k].shape)})" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        name = getattr(model, "name", type(model).__name__)
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es): {'; '.join(shapes[:3])}")
        raise MFError(
            f"The weights in {str(path)!r} do not fit a {name} with {model.num_classes} classes: {', '.join(parts)}."
            f"{_guess_arch(file_keys)} Choose the matching architecture (arch = ...) or the right file."
        )
    model.load_state_dict(sd, strict=True)
    return model


# ---------------------------------------------------------------------------------------------
# registration


@dataclass
class ResNetConfig:
    arch: str = "resnet56"  # one of RESNET_NAMES
    weights: str = ""  # optional path to pretrained weights (.th, state dict or .safetensors)


def build_resnet_component(cfg: ResNetConfig, *, shape=(3, 32, 32), num_classes: int = 10) -> ResNetClassifier:
    if tuple(shape)[:1] != (3,):
        raise MFError(f"ResNet classifiers take RGB images (3, H, W); got data of shape {tuple(shape)}.")
    model = build_resnet(cfg.arch, num_classes)
    if cfg.weights:
        load_resnet_weights(model, cfg.weights)
    return model


build_resnet_component.task = "classify"

COMPONENTS = {"resnet": (build_resnet_component, ResNetConfig, "ResNet classifiers (CIFAR option A, CIFAR-style, torchvision) for mf compress")}
