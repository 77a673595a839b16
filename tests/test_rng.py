import torch

from safegen.sampling import rng


def test_inverse_cdf_edges_pick_the_right_token_never_a_zero_one():
    # Zero mass at the start, in the middle and at the end (like the head's padding columns).
    probs = torch.tensor([0.0, 0.25, 0.0, 0.5, 0.25, 0.0, 0.0])
    u = torch.tensor([2.0 ** -52, 0.25, 0.25 + 2.0 ** -40, 0.75, 0.8, 1.0], dtype=torch.float64)
    picked = rng.inverse_cdf(probs.expand(len(u), -1), u)
    # Token i takes u in (cdf[i-1], cdf[i]]: the upper end 1.0 is the last token with mass.
    assert picked.tolist() == [1, 1, 3, 3, 4, 4]
    # Unnormalised weights give the same draws: u is scaled by the total.
    assert torch.equal(rng.inverse_cdf(3 * probs.expand(len(u), -1), u), picked)


def test_inverse_cdf_keeps_a_tiny_probability_behind_a_large_one():
    # In a float32 running sum 0.5 + 2^-31 rounds to 0.5 and the middle token could never be drawn.
    probs = torch.tensor([0.5, 2.0 ** -31, 0.5])
    total = 1 + 2.0 ** -31
    u = torch.tensor([0.5 / total + 2.0 ** -33, (0.5 + 2.0 ** -31) / total + 2.0 ** -33], dtype=torch.float64)
    assert rng.inverse_cdf(probs.expand(2, -1), u).tolist() == [1, 2]


def test_uniform52_is_uniform_down_to_its_low_bits():
    keys = rng.seed_keys(torch.arange(50))
    u = rng.uniform52(keys, torch.arange(400).expand(50, -1))
    assert u.dtype == torch.float64 and ((u > 0) & (u < 1)).all()
    n = u.numel()
    # The mean of U(0,1), of its top bits and of its bits below 2^-26, each a z-test (sd 1/sqrt(12n)).
    for part in (u, (u * 2 ** 26).frac()):
        assert abs(float(part.mean()) - 0.5) < 4 / (12 * n) ** 0.5
    assert torch.equal(u, rng.uniform52(keys, torch.arange(400).expand(50, -1)))  # a pure function
    assert len(torch.unique(u)) == n
