"""The README's main job end to end: train the quickstart recipe as shipped, then sample."""

import numpy as np
import pytest
import torch

from mfcli.distances import mmd_rbf, sliced_wasserstein
from mfcli.sampling import draw, load_model

from mftest import ROOT, run_mf

# Sliced 2-Wasserstein between 2,000 samples and 2,000 fresh checkerboard points: two independent
# draws of the data give about 0.12 (the estimator's floor at this size), standard Gaussian noise 0.27.
SW_THRESHOLD = 0.2
# Fraction of samples on the checkerboard's filled squares: data 1.0, Gaussian noise about 0.46, a
# model trained 3,000 steps with the uniform (t, r) sampler 0.60. SW alone cannot tell a blob from a
# board (their projections look alike), so both must hold.
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
    sw, support = sliced_wasserstein(samples, data), in_support_fraction("checkerboard", samples)
    print(f"quickstart: sliced W2 {sw:.3f}, on-support {support:.3f}, MMD² {mmd_rbf(samples, data):.4f}")
    assert sw < SW_THRESHOLD and support > SUPPORT_THRESHOLD, (sw, support)

    # The same network untrained, sampled the same way, is far from the data: the threshold means something.
    m = load_model(run_dir / "weights.safetensors")
    torch.manual_seed(0)
    for p in m.net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    fresh, _ = draw(m.net, m.objective, m.shape, 0, num=2000, generator=torch.Generator().manual_seed(1))
    assert sliced_wasserstein(fresh, data) > SW_THRESHOLD and in_support_fraction("checkerboard", fresh) < SUPPORT_THRESHOLD
