"""ResNet classifiers for mf compress: architectures, parameter counts, weight loading and its errors,
and the published accuracies of the real pretrained CIFAR-10 ResNets on the real test set."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from mfcli.errors import MFError
from mf_backbones.resnet import (
    RESNET_NAMES,
    ResNetClassifier,
    ResNetConfig,
    build_resnet,
    build_resnet_component,
    load_resnet_weights,
)

from helpers_backbones import shared_data

PRETRAINED = {  # file, published CIFAR-10 test accuracy (%)
    "resnet20": ("resnet20-12fca82f.th", 91.73),
    "resnet32": ("resnet32-d509ac18.th", 92.63),
    "resnet44": ("resnet44-014dd654.th", 93.10),
    "resnet56": ("resnet56-4bfd9763.th", 93.39),
}


def weights_dir():
    d = shared_data() / "resnet_cifar10"
    if not d.is_dir():
        pytest.skip(f"pretrained CIFAR ResNets not found at {d} (set MF_SHARED_DATA)")
    return d


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_cifar_resnet50_has_exactly_the_published_count():
    # METHODS §5.3: 3x3 stem without max-pool, bottlenecks 3/4/6/3, projection shortcuts
    assert n_params(build_resnet("resnet50", 10)) == 23_520_842
    assert n_params(build_resnet("resnet50", 100)) == 23_705_252


def test_option_a_resnets_match_he_et_al_counts():
    # He et al. 2016, Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M; option A adds no parameters
    expected = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85, "resnet110": 1.7}
    for name, millions in expected.items():
        model = build_resnet(name)
        assert round(n_params(model) / 1e6, 2 if millions < 1 else 1) == millions, name
        assert len(model.stages) == 3 and model.stage_channels == [16, 32, 64]
        assert len(model.stages[0]) == (int(name[6:]) - 2) // 6


def test_imagenet_resnets_are_torchvisions():
    import torchvision

    model = build_resnet("imagenet-resnet50", 1000)
    assert n_params(model) == n_params(torchvision.models.resnet50(weights=None)) == 25_557_032
    assert model.stage_channels == [256, 512, 1024, 2048]
    assert isinstance(model.stem.maxpool, nn.MaxPool2d)
    for depth, millions in ((101, 44.5), (152, 60.2)):  # torchvision's published counts; built on meta
        with torch.device("meta"):
            deep = build_resnet(f"imagenet-resnet{depth}", 1000)
        assert round(n_params(deep) / 1e6, 1) == millions
        assert deep.stage_channels == [256, 512, 1024, 2048]


@pytest.mark.parametrize("name", [n for n in RESNET_NAMES if n not in ("imagenet-resnet101", "imagenet-resnet152")])
def test_common_interface(name):
    model = build_resnet(name, num_classes=7).eval()
    size = 64 if name.startswith("imagenet") else 32
    x = torch.rand(2, 3, size, size) * 2 - 1
    with torch.no_grad():
        logits, feats = model(x), model.features(x)
    assert isinstance(model, ResNetClassifier) and model.task == "classify"
    assert logits.shape == (2, 7) and feats.shape == (2, model.stage_channels[-1])
    assert torch.allclose(model.head.fc(feats), logits, atol=1e-5)
    assert isinstance(model.stages, nn.ModuleList) and len(model.stages) == len(model.stage_channels)
    # stages compose: stem -> stages -> head reproduces forward
    with torch.no_grad():
        h = model.normalize(x).contiguous(memory_format=torch.channels_last)  # forward's CPU layout (same rounding)
        h = model.stem(h)
        for stage in model.stages:
            h = stage(h)
        assert torch.allclose(model.head(h), logits, atol=1e-5)


def test_normalize_maps_minus_one_one_to_imagenet_statistics():
    model = build_resnet("resnet20")
    x = torch.rand(1, 3, 4, 4)  # [0, 1] image
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(model.normalize(x * 2 - 1), (x - mean) / std, atol=1e-6)
    assert not any(k.startswith("normalize") for k in model.state_dict())


def test_unknown_name_suggests_the_nearest():
    with pytest.raises(MFError, match=r"Did you mean 'resnet56'.*resnet110"):
        build_resnet("resnet65")
    with pytest.raises(MFError, match="num_classes"):
        build_resnet("resnet20", 0)


def test_option_a_shortcut_is_parameter_free_subsampling_with_zero_padding():
    block = build_resnet("resnet20").stages[1][0]  # 16 -> 32 channels, stride 2
    x = torch.randn(1, 16, 8, 8)
    s = block.shortcut(x)
    assert s.shape == (1, 32, 4, 4)
    assert torch.equal(s[:, 8:24], x[:, :, ::2, ::2])
    assert s[:, :8].abs().max() == 0 and s[:, 24:].abs().max() == 0


# ---------------------------------------------------------------------------------------------
# weight loading


def test_load_akamaster_file_and_roundtrips(tmp_path):
    src = weights_dir() / PRETRAINED["resnet20"][0]
    model = load_resnet_weights(build_resnet("resnet20"), src)
    raw = torch.load(src, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(model.stem.conv1.weight, raw["module.conv1.weight"])
    assert torch.equal(model.stages[2][2].bn2.running_var, raw["module.layer3.2.bn2.running_var"])
    assert torch.equal(model.head.fc.bias, raw["module.linear.bias"])
    # our own state dict, as a .pt and as safetensors
    from safetensors.torch import save_file

    torch.save(model.state_dict(), tmp_path / "plain.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    for path in (tmp_path / "plain.pt", tmp_path / "w.safetensors"):
        other = load_resnet_weights(build_resnet("resnet20"), path)
        for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
            assert torch.equal(a, b), k


def test_wrong_architecture_names_the_problem():
    with pytest.raises(MFError, match=r"do not fit a resnet56.*missing key.*looks like a resnet20"):
        load_resnet_weights(build_resnet("resnet56"), weights_dir() / PRETRAINED["resnet20"][0])
    with pytest.raises(MFError, match=r"unexpected key"):
        load_resnet_weights(build_resnet("resnet20"), weights_dir() / PRETRAINED["resnet32"][0])


def test_wrong_number_of_classes_is_a_shape_mismatch():
    with pytest.raises(MFError, match=r"shape mismatch.*head\.fc\.weight \(file \(10, 64\), model \(100, 64\)\)"):
        load_resnet_weights(build_resnet("resnet20", 100), weights_dir() / PRETRAINED["resnet20"][0])


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(MFError, match="does not exist"):
        load_resnet_weights(build_resnet("resnet20"), tmp_path / "nope.th")
    data = (weights_dir() / PRETRAINED["resnet20"][0]).read_bytes()
    (tmp_path / "cut.th").write_bytes(data[: len(data) // 2])
    with pytest.raises(MFError, match="truncated"):
        load_resnet_weights(build_resnet("resnet20"), tmp_path / "cut.th")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(MFError, match="truncated"):
        load_resnet_weights(build_resnet("resnet20"), tmp_path / "cut.safetensors")
    torch.save({"lr": torch.tensor(0.1), "note": "not weights"}, tmp_path / "foreign.pt")
    with pytest.raises(MFError, match="state dict of tensors"):
        load_resnet_weights(build_resnet("resnet20"), tmp_path / "foreign.pt")


def test_torchvision_layout_loads_into_imagenet_models(tmp_path):
    import torchvision

    tv = torchvision.models.resnet18(weights=None, num_classes=10)
    torch.save({"model": tv.state_dict()}, tmp_path / "tv.pth")
    model = load_resnet_weights(build_resnet("imagenet-resnet18", 10), tmp_path / "tv.pth").eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(model(x), tv.eval()(model.normalize(x)), atol=1e-5)


def test_registered_component_builds_by_arch(tmp_path):
    assert build_resnet_component.task == "classify"
    model = build_resnet_component(ResNetConfig(arch="resnet32"), shape=(3, 32, 32), num_classes=10)
    assert model.name == "resnet32" and model.task == "classify"
    src = weights_dir() / PRETRAINED["resnet20"][0]
    loaded = build_resnet_component(ResNetConfig(arch="resnet20", weights=str(src)), shape=(3, 32, 32), num_classes=10)
    assert loaded.head.fc.weight.abs().sum() > 0
    with pytest.raises(MFError, match="RGB"):
        build_resnet_component(ResNetConfig(), shape=(1, 28, 28), num_classes=10)


# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pretrained_cifar_resnets_reach_published_accuracy():
    path = shared_data() / "cifar10" / "cifar10_uint8.npz"
    if not path.is_file():
        pytest.skip(f"CIFAR-10 not found at {path} (set MF_SHARED_DATA)")
    with np.load(path) as d:
        x = torch.from_numpy(d["x_test"]).permute(0, 3, 1, 2).contiguous()  # (10000, 3, 32, 32) uint8
        y = torch.from_numpy(d["y_test"]).long()
    assert len(y) == 10_000
    torch.set_num_threads(min(2, os.cpu_count() or 1))  # large convolutions do profit from a second core
    for name, (file, published) in PRETRAINED.items():
        model = load_resnet_weights(build_resnet(name), weights_dir() / file).eval()
        correct = 0
        with torch.inference_mode():
            for i in range(0, len(y), 500):  # larger batches are slower on a 2-core CPU (cache)
                images = x[i : i + 500].float() / 127.5 - 1  # mf datasets yield [-1, 1]
                correct += (model(images).argmax(1) == y[i : i + 500]).sum().item()
        accuracy = 100 * correct / len(y)
        assert abs(accuracy - published) <= 0.01, (name, accuracy, published)
