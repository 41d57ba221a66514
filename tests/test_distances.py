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


def test_mmd_is_zero_in_expectation_for_equal_laws_and_positive_otherwise():
    from mfcli.distances import mmd_rbf

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(800, 2, generator=g), torch.randn(800, 2, generator=g)
    same = mmd_rbf(a, b)
    shifted = mmd_rbf(a, b + 1.0)
    assert abs(same) < 2e-3 and shifted > 20 * abs(same)
    # two points per set, one bandwidth: the unbiased within-set means are the single off-diagonal pair
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[0.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    k = lambda p, q: torch.exp(-((p - q) ** 2).sum() / (2 * 0.5**2))
    hand = k(x[0], x[1]) + k(y[0], y[1]) - 2 * sum(k(p, q) for p in x for q in y) / 4
    assert abs(mmd_rbf(x, y, bandwidths=(0.5,)) - float(hand)) < 1e-12
