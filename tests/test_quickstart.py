"""The README's main job end to end: train the quickstart recipe as shipped, then sample."""

import numpy as np
import pytest
import torch

from mfcli.distances import mmd_rbf, sliced_wasserstein
from mfcli.sampling import draw, load_model

from mftest import ROOT, run_mf

# Between 2,000 samples and 2,000 fresh checkerboard points (squared MMD, narrow Gaussian kernels):
# two independent draws of the data give about 0.000, standard Gaussian noise about 0.05, an
# under-trained model (60 % of its samples on the board's squares) about 0.013.
MMD_THRESHOLD = 0.01
# Fraction of samples on the checkerboard's filled squares: data 1.0, Gaussian noise about 0.46.
SUPPORT_THRESHOLD = 0.75


@pytest.mark.slow
def test_quickstart_trains_and_samples_match_the_data(tmp_path):
    from mf_datasets.toy import in_support_fraction, sample_toy

    run_mf("train", ROOT / "recipes" / "quickstart.toml", cwd=tmp_path, check=0)
    run_dir = tmp_path / "runs" / "00001-quickstart"
    for f in ("config.json", "log.jsonl", "weights.safetensors", "train_state.pt", "loss.png"):
        assert (run_dir / f).is_file(), f
    proc = run_mf("sample", "--num", "2000", "--seed", "1", cwd=tmp_path, check=0)  # newest run by default
    assert "samples/s" in proc.stderr
    out = run_dir / "samples" / "nfe1-seed1"
    samples = torch.from_numpy(np.load(out / "samples.npz")["samples"])
    assert samples.shape == (2000, 2) and (out / "samples.png").is_file()

    data = sample_toy("checkerboard", 2000, torch.Generator().manual_seed(123))
    mmd, support = mmd_rbf(samples, data), in_support_fraction("checkerboard", samples)
    print(f"quickstart: MMD² {mmd:.4f}, on-support {support:.3f}, sliced W2 {sliced_wasserstein(samples, data):.3f}")
    assert mmd < MMD_THRESHOLD and support > SUPPORT_THRESHOLD, (mmd, support)

    # The same network untrained, sampled the same way, is far from the data: the threshold means something.
    m = load_model(run_dir / "weights.safetensors")
    torch.manual_seed(0)
    for p in m.net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    fresh, _ = draw(m.net, m.objective, m.shape, 0, num=2000, generator=torch.Generator().manual_seed(1))
    assert mmd_rbf(fresh, data) > 2 * MMD_THRESHOLD and in_support_fraction("checkerboard", fresh) < SUPPORT_THRESHOLD
