"""The clean-fid path end to end, offline, with a small fixed random feature network in place of Inception."""

import os

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from metrics_data import noise_images
from mfcli.errors import MFError
from mfcli.metrics import RandomConvFeatures, compute_fid, make_custom_stats, open_images
from mfcli.metrics.images import IMAGE_EXTENSIONS

N = 80  # images per set: enough for a full-rank 16-d covariance, small enough for 2 CPU cores


def write_pngs(folder, images):
    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(os.path.join(folder, f"{i:05d}.png"))
    return str(folder)


def independent_features(images, net, mode):
    """Features as clean-fid defines them, written from its description rather than its code.

    clean: each channel resized to 299x299 as a float32 PIL image with bicubic filtering,
    clipped to [0, 255]; legacy_tensorflow: the raw pixels (the network resizes inside).
    """
    out = []
    for img in images:
        if mode == "clean":
            chans = [np.asarray(Image.fromarray(img[:, :, c].astype(np.float32)).resize((299, 299), Image.BICUBIC)) for c in range(3)]
            x = np.clip(np.stack(chans, axis=0), 0, 255)
        else:
            x = img.transpose(2, 0, 1).astype(np.float32)
        with torch.no_grad():
            out.append(net(torch.from_numpy(x)[None]).double().numpy())
    return np.concatenate(out)


def fd_reference(f1, f2):
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1 + s2 - 2 * covmean))


@pytest.fixture(scope="module")
def sets(cifar, tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    a, b = cifar["x_train"][:N], cifar["x_train"][N : 2 * N]
    noise = noise_images(N, seed=1)
    return {
        "a": a, "b": b, "noise": noise,
        "dir_a": write_pngs(root / "a", a), "dir_b": write_pngs(root / "b", b),
        "dir_noise": write_pngs(root / "noise", noise),
    }


@pytest.fixture(scope="module")
def net():
    return RandomConvFeatures(dim=16, seed=0)


def fid(samples, reference, net, mode="clean", **kw):
    kw.setdefault("num", len(open_images(samples)))
    return compute_fid(samples, reference, mode=mode, feature_extractor=net, device="cpu", batch_size=32, **kw)


def test_extension_list_matches_clean_fid():
    from cleanfid.utils import EXTENSIONS

    assert set(IMAGE_EXTENSIONS) == set(EXTENSIONS)


def test_same_folder_gives_zero(sets, net):
    d_same = fid(sets["dir_a"], sets["dir_a"], net)
    d_other = fid(sets["dir_a"], sets["dir_b"], net)
    assert d_other > 0
    assert d_same == pytest.approx(0.0, abs=1e-9 * d_other)


@pytest.mark.parametrize("other", ["dir_b", "dir_noise"])
@pytest.mark.parametrize("mode", ["clean", "legacy_tensorflow"])
def test_equals_clean_fid_and_an_independent_computation(sets, net, mode, other):
    """Ours, clean-fid's own ``compute_fid`` and a from-scratch computation give one number.

    FD is a small difference of large terms (|mu|^2, traces), so the tolerance is
    relative to those terms: clean-fid averages float32 features in float32
    (``np.mean``), an error of ~1e-7 of |mu| that the cancellation exposes when the
    two sets are close.
    """
    from cleanfid import fid as cleanfid_fid

    ours = fid(sets["dir_a"], sets[other], net, mode=mode)
    theirs = cleanfid_fid.compute_fid(
        sets["dir_a"], sets[other], mode=mode, custom_feat_extractor=net,
        num_workers=0, batch_size=32, device=torch.device("cpu"), verbose=False,
    )
    f1 = independent_features(sets["a"], net, mode)
    f2 = independent_features(sets[other.replace("dir_", "")], net, mode)
    independent = fd_reference(f1, f2)
    scale = sum(np.sum(f.mean(0) ** 2) + np.trace(np.cov(f, rowvar=False)) for f in (f1, f2))
    assert independent > 1e-3 * scale  # the sets differ measurably, so the comparison means something
    assert ours == pytest.approx(independent, abs=1e-8 * scale)
    assert ours == pytest.approx(theirs, abs=3e-8 * scale)


def test_array_and_png_folder_give_the_same_number(sets, net):
    from_folders = fid(sets["dir_a"], sets["dir_noise"], net)
    from_arrays = fid(sets["a"], sets["noise"], net)
    from_tensor = fid(torch.from_numpy(sets["a"]).permute(0, 3, 1, 2), sets["noise"], net)
    assert from_arrays == pytest.approx(from_folders, rel=1e-9)
    assert from_tensor == pytest.approx(from_folders, rel=1e-9)


def test_distance_decreases_as_the_distributions_match(sets, net):
    mixed = np.concatenate([sets["b"][: N // 2], sets["noise"][: N // 2]])
    d_match, d_half, d_noise = (fid(sets["a"], other, net) for other in (sets["b"], mixed, sets["noise"]))
    assert d_match < d_half < d_noise
    assert d_noise > 10 * d_match


def test_num_takes_the_first_samples_and_refuses_too_few(sets, net):
    assert fid(sets["dir_b"], sets["a"], net, num=50) == pytest.approx(fid(sets["b"][:50], sets["a"], net), rel=1e-9)
    with pytest.raises(MFError, match=f"only {N}"):
        fid(sets["b"], sets["a"], net, num=N + 1)


def test_custom_stats_replace_the_reference_images_and_mismatches_are_refused(sets, net, tmp_path):
    path = make_custom_stats(sets["dir_a"], tmp_path / "ref_stats", mode="clean", feature_extractor=net, device="cpu")
    assert path.endswith(".npz")
    assert fid(sets["b"], path, net) == pytest.approx(fid(sets["b"], sets["dir_a"], net), rel=1e-9)
    with pytest.raises(MFError, match="mode 'clean'"):
        fid(sets["b"], path, net, mode="legacy_tensorflow")
    with pytest.raises(MFError, match="feature"):
        fid(sets["b"], path, RandomConvFeatures(dim=16, seed=1))


def test_user_errors(sets, net):
    with pytest.raises(MFError, match="Inception features"):
        fid(sets["b"], "cifar10", net)  # clean-fid's statistics are Inception features
    with pytest.raises(MFError, match="images_to_uint8"):
        fid(sets["b"].astype(np.float32) / 127.5 - 1, sets["a"], net, num=10)
    with pytest.raises(MFError, match="Unknown FID mode"):
        fid(sets["b"], sets["a"], net, mode="legacy_pytorch")
    with pytest.raises(MFError, match="neither a folder"):
        fid(sets["b"], "no/such/folder", net)
