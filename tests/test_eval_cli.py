"""`mf eval` from the command line on real data: the offline ResNet-56 stand-in, accuracy, FID's errors."""

import json

import numpy as np
import pytest

from mftest import run_mf


@pytest.fixture(scope="module")
def cifar_halves(tmp_path_factory, request):
    from mftest import SHARED_DATA

    src = SHARED_DATA / "cifar10" / "cifar10_uint8.npz"
    if not src.exists():
        pytest.skip("real CIFAR-10 not present")
    d = tmp_path_factory.mktemp("cifar")
    with np.load(src) as f:
        x = f["x_train"]
    idx = np.random.default_rng(0).permutation(len(x))
    np.savez(d / "a.npz", x_train=x[idx[:1000]])
    np.savez(d / "b.npz", x_train=x[idx[1000:2000]])
    noise = np.random.default_rng(1).integers(0, 256, size=(1000, 32, 32, 3), dtype=np.uint8)
    np.savez(d / "noise.npz", x_train=noise)
    return d


@pytest.mark.slow
def test_fd_resnet56_from_the_command_line(cifar_halves, shared_data, tmp_path):
    w = shared_data / "resnet_cifar10" / "resnet56-4bfd9763.th"
    same = run_mf("eval", "--metric", "fd-resnet56", "--samples", cifar_halves / "a.npz", "--reference", cifar_halves / "b.npz",
                  "--num", "1000", "--classifier-weights", w, check=0)
    assert "not FID" in same.stdout + json.dumps(json.loads((cifar_halves / "eval.json").read_text()))
    fd_same = json.loads((cifar_halves / "eval.json").read_text())["fd_resnet56"]
    run_mf("eval", "--metric", "fd-resnet56", "--samples", cifar_halves / "noise.npz", "--reference", cifar_halves / "b.npz",
           "--num", "1000", "--classifier-weights", w, check=0)
    fd_noise = json.loads((cifar_halves / "eval.json").read_text())["fd_resnet56"]
    assert fd_noise > 100 * fd_same, (fd_same, fd_noise)
    assert "FID" not in [k.upper() for k in json.loads((cifar_halves / "eval.json").read_text())]


@pytest.mark.slow
def test_accuracy_of_a_pretrained_resnet_from_the_command_line(shared_data, tmp_path):
    import shutil

    ckpt = tmp_path / "resnet20.th"
    shutil.copy(shared_data / "resnet_cifar10" / "resnet20-12fca82f.th", ckpt)
    proc = run_mf("eval", ckpt, "--arch", "resnet20", "--metric", "accuracy", "--dataset", "npz",
                  "--data", f"path={shared_data / 'cifar10' / 'cifar10_uint8.npz'}", check=0)
    res = json.loads((tmp_path / "eval.json").read_text())["accuracy"]
    assert res["top1_pct"] == pytest.approx(91.73, abs=0.005) and res["num_images"] == 10000
    assert res["params"] == 269722 and res["images_per_s"] > 0
    assert "91.73" in proc.stdout


def test_eval_errors(tmp_path):
    cases = [
        (["--metric", "fidd"], "Did you mean 'fid'"),
        (["--metric", "accuracy"], "name the classifier checkpoint"),
        (["--runs-dir", str(tmp_path)], "no run with weights.safetensors"),
        (["--metric", "fd-resnet56", "--samples", str(tmp_path)], "--reference"),
    ]
    for args, msg in cases:
        proc = run_mf("eval", *args)
        assert proc.returncode == 2 and msg in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    (tmp_path / "w.th").write_bytes(b"junk")
    proc = run_mf("eval", tmp_path / "w.th", "--metric", "accuracy")
    assert proc.returncode == 2 and "--arch" in proc.stderr


def test_fid_without_inception_weights_says_how_to_get_them(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", x_train=x)
    proc = run_mf("eval", "--metric", "fid", "--samples", tmp_path / "s.npz", "--reference", tmp_path / "s.npz", "--num", "8",
                  env={"HOME": str(tmp_path), "MF_INCEPTION_WEIGHTS": ""}, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--inception-weights" in proc.stderr or "inception" in proc.stderr.lower()
