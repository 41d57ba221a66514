"""EDM-style augmentation (mfcli.augment): the geometry against closed forms, the label
statistics, and the labels reaching every network call of every objective."""

import math
import types

import pytest
import torch
from torch import nn

from mfcli import hookimpl
from mfcli.augment import AUGMENT_DIM, EDMAugment
from mfcli.errors import MFError
from mfcli.plugins import load_registry


def test_zero_labels_and_flips():
    x = torch.randn(3, 2, 5, 7, dtype=torch.float64)
    labels = torch.zeros(3, AUGMENT_DIM, dtype=torch.float64)
    assert torch.equal(EDMAugment.apply(x, labels), x)
    labels[1, 0] = 1.0
    out = EDMAugment.apply(x, labels)
    assert torch.equal(out[1], x[1].flip(2)) and torch.equal(out[0], x[0]) and torch.equal(out[2], x[2])


def test_one_pixel_translation_is_a_shift_with_reflected_border():
    x = torch.randn(1, 1, 4, 6, dtype=torch.float64)
    labels = torch.zeros(1, AUGMENT_DIM, dtype=torch.float64)
    labels[0, 4] = 1 / 6  # one pixel to the right
    labels[0, 5] = -1 / 4  # one pixel up
    out = EDMAugment.apply(x, labels)[0, 0]
    src = x[0, 0]
    torch.testing.assert_close(out[:-1, 1:], src[1:, :-1])
    torch.testing.assert_close(out[:-1, 0], src[1:, 0])  # the column that came in: reflected border


def _ramp(n, h, w, a, b, c, dtype=torch.float64):
    """f(x, y) = a x + b y + c on grid_sample's normalised pixel-centre coordinates."""
    xs = (2 * torch.arange(w, dtype=dtype) + 1) / w - 1
    ys = (2 * torch.arange(h, dtype=dtype) + 1) / h - 1
    return (a * xs[None, :] + b * ys[:, None] + c).expand(n, 1, h, w).clone(), xs, ys


def test_affine_geometry_matches_the_closed_form_on_a_linear_image():
    """Bilinear sampling is exact on a linear image, so away from the borders the output must be
    f(M⁻¹ (p - 2 t)) with M = 2^s R(θ) diag(2^a, 2^-a) R(θ)ᵀ, computed here independently."""
    torch.manual_seed(0)
    n, h, w = 6, 32, 32
    a_, b_, c_ = 0.7, -0.4, 0.1
    x, xs, ys = _ramp(n, h, w, a_, b_, c_)
    s = torch.randn(n, dtype=torch.float64) * 0.2
    aniso = torch.randn(n, dtype=torch.float64) * 0.2
    th = torch.rand(n, dtype=torch.float64) * math.pi
    t = torch.randn(n, 2, dtype=torch.float64) * 0.05
    labels = torch.stack([torch.zeros(n, dtype=torch.float64), s, aniso * torch.cos(2 * th), aniso * torch.sin(2 * th),
                          t[:, 0], t[:, 1]], 1)
    out = EDMAugment.apply(x, labels)
    for i in range(n):
        # stretch by 2^a along θ (a of either sign), 2^-a across it
        u = torch.tensor([math.cos(th[i]), math.sin(th[i])], dtype=torch.float64)
        v = torch.tensor([-math.sin(th[i]), math.cos(th[i])], dtype=torch.float64)
        M = 2 ** float(s[i]) * (2 ** float(aniso[i]) * torch.outer(u, u) + 2 ** -float(aniso[i]) * torch.outer(v, v))
        Minv = torch.linalg.inv(M)
        P = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1)  # (h, w, 2): (x, y) of each output pixel
        src = (P - 2 * t[i]) @ Minv.T
        expect = a_ * src[..., 0] + b_ * src[..., 1] + c_
        inside = (src.abs() < 1 - 2 / w).all(-1)  # samples whose 2x2 neighbourhood is inside the image
        assert inside.float().mean() > 0.2  # enough interior pixels to test (zoom-outs leave fewer)
        torch.testing.assert_close(out[i, 0][inside], expect[inside], rtol=1e-9, atol=1e-9)


def test_label_statistics():
    g = torch.Generator().manual_seed(0)
    lab = EDMAugment(0.3).draw(40000, "cpu", g)
    assert lab.shape == (40000, AUGMENT_DIM)
    assert abs(lab[:, 0].mean().item() - 0.5) < 0.01  # every image eligible for the flip, half flipped
    for col in (1, 4, 5):  # each transformation drawn with probability p
        assert abs((lab[:, col] != 0).float().mean().item() - 0.3) < 0.01
    assert abs(lab[lab[:, 1] != 0, 1].std().item() - 0.2) < 0.01
    aniso = lab[:, 2].hypot(lab[:, 3])
    assert abs(aniso[aniso > 0].square().mean().sqrt().item() - 0.2) < 0.01
    assert abs(lab[lab[:, 4] != 0, 4].std().item() - 0.125) < 0.005
    assert (EDMAugment(0.0).draw(1000, "cpu", g)[:, 1:] == 0).all()


class SpyNet(nn.Module):
    """u = a linear map of z; records the cond of every call."""

    conditions = frozenset({"y", "augment", "omega", "t_min", "t_max"})

    def __init__(self, shape):
        super().__init__()
        self.lin = nn.Linear(math.prod(shape), math.prod(shape))
        self.calls = []

    def forward(self, z, t, h, cond=None):
        self.calls.append((z.shape[0], dict(cond or {})))
        return self.lin(z.flatten(1)).view_as(z)


OBJECTIVES = {
    "fm": {},
    "mf": {"cfg_omega": 2.0, "cfg_kappa": 0.0},
    "mf-kappa": {"cfg_omega": 1.5, "cfg_kappa": 0.3},
    "mmf": {},
    "imf": {},
    "splitmf": {},
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_every_network_call_gets_the_augmentation_labels_of_its_samples(name):
    from mfcli.config import build_dataclass
    from mfcli.plugins import registry

    kind = name.split("-")[0]
    comp = registry().get("objectives", kind)
    values = dict(OBJECTIVES[name], **({"ratio_r_neq_t": 0.5} if kind != "fm" else {}))
    obj = comp.factory(build_dataclass(comp.config, values, "test"), num_classes=5)
    torch.manual_seed(0)
    n = 16
    x = torch.randn(n, 2, 3)
    y = torch.arange(n) % 5
    labels = torch.randn(n, AUGMENT_DIM)
    labels[:, 0] = y.float()  # ties each row of labels to its sample's class
    net = SpyNet((2, 3))
    obj.loss(net, x, y, cond={"augment": labels})
    assert net.calls
    for rows, cond in net.calls:
        aug = cond.get("augment")
        assert aug is not None and aug.shape == (rows, AUGMENT_DIM), name
        real = cond["y"] < 5  # dropped or unconditional rows carry the null class
        assert torch.equal(aug[real, 0], cond["y"][real].float()), name
        assert any(torch.equal(row, labels[j]) for row in aug[:1] for j in range(n))


def test_engine_refuses_augmentation_for_a_backbone_without_labels(tmp_path):
    from mfcli.config import load_recipe
    from mfcli.engine import Trainer

    p = tmp_path / "r.toml"
    p.write_text('[data]\nname = "npz"\npath = "x.npz"\naugment = "edm"\n[backbone]\nname = "mlp"\n[objective]\nname = "fm"\n')
    import numpy as np

    np.savez(tmp_path / "x.npz", x_train=np.zeros((8, 8, 8, 3), np.uint8), y_train=np.zeros(8, np.uint8))
    r = load_recipe(p, [f"data.path={tmp_path / 'x.npz'}"])
    with pytest.raises(MFError, match="augmentation labels.*augment_dim = 6"):
        Trainer(r, tmp_path / "run")


def test_augment_probability_out_of_range_is_a_recipe_error(tmp_path):
    from mfcli.config import load_recipe

    p = tmp_path / "r.toml"
    p.write_text('[data]\nname = "toy"\naugment = "edm"\naugment_p = 1.5\n[backbone]\nname = "mlp"\n[objective]\nname = "fm"\n')
    with pytest.raises(MFError, match=r"\[data\]: augment_p must lie in \[0, 1\], got 1.5"):
        load_recipe(p)


def test_engine_passes_the_labels_of_the_augmented_batch(tmp_path):
    """A recorded step: the objective sees augmented images and their labels as cond."""
    from mfcli.config import load_recipe
    from mfcli.engine import Trainer

    seen = {}

    class Recorder:
        guidance = "none"

        def __init__(self, cfg, *, num_classes=0):
            from mf_objectives.flow_matching import FlowMatching, FMConfig

            self.inner = FlowMatching(FMConfig(), num_classes=num_classes)

        def loss(self, net, x, y=None, *, step=0, cond=None):
            seen["x"], seen["cond"] = x.clone(), cond
            return self.inner.loss(net, x, y, step=step, cond=cond)

    from dataclasses import dataclass

    @dataclass
    class RecCfg:
        pass

    mod = types.ModuleType("recplug")

    @hookimpl
    def register_objectives(register):
        register("rec", Recorder, RecCfg)

    mod.register_objectives = register_objectives
    reg = load_registry(extra_plugins={"recplug": mod})
    import numpy as np

    np.savez(tmp_path / "x.npz", x_train=np.random.default_rng(0).integers(0, 255, (16, 8, 8, 3), dtype=np.uint8),
             y_train=np.zeros(16, np.uint8))
    p = tmp_path / "r.toml"
    p.write_text(f'[data]\nname = "npz"\npath = "{tmp_path / "x.npz"}"\nbatch_size = 16\naugment = "edm"\naugment_p = 1.0\n'
                 '[backbone]\nname = "unet"\nvariant = "UNet-XS"\naugment_dim = 6\n[objective]\nname = "rec"\n'
                 '[train]\nsteps = 1\ntensorboard = false\n')
    tr = Trainer(load_recipe(p, registry=reg), tmp_path / "run", reg=reg)
    tr.train_step()
    labels = seen["cond"]["augment"]
    assert labels.shape == (16, AUGMENT_DIM) and (labels[:, 1] != 0).all()  # p = 1: every image scaled
    originals = torch.from_numpy(np.load(tmp_path / "x.npz")["x_train"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    # the batch is a permutation of the data, augmented as its labels say
    match = [min(range(16), key=lambda j: (EDMAugment.apply(originals[j:j + 1], labels[i:i + 1]) - seen["x"][i]).abs().max())
             for i in range(16)]
    for i, j in enumerate(match):
        torch.testing.assert_close(EDMAugment.apply(originals[j:j + 1], labels[i:i + 1])[0], seen["x"][i], rtol=1e-5, atol=1e-5)
