import torch

from mfcli.distances import sliced_wasserstein


def test_sliced_wasserstein_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 2, generator=g, dtype=torch.float64)
    assert sliced_wasserstein(a, a) == 0.0
    # A translation by d moves every projection by <d, theta>: SW^2 = E[<d, theta>^2] = |d|^2 / D.
    d = torch.tensor([3.0, 4.0], dtype=torch.float64)
    sw = sliced_wasserstein(a, a + d, num_projections=20000)
    assert abs(sw - (25.0 / 2) ** 0.5) < 0.05
    # Permuting the points does not change the distance.
    assert abs(sliced_wasserstein(a, a[torch.randperm(500, generator=g)])) < 1e-12
