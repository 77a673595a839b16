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


def _chi2_joint(a: torch.Tensor, b: torch.Tensor, bins: int = 4) -> float:
    """Pearson's chi-square of the (bins x bins) table of two U(0,1) samples against independent
    uniforms: about bins² - 1 = 15 (sd 5.5) when they are; in the hundreds when one predicts the other."""
    cells = (a * bins).long().clamp(max=bins - 1) * bins + (b * bins).long().clamp(max=bins - 1)
    counts = torch.bincount(cells, minlength=bins * bins).double()
    expected = a.numel() / bins ** 2
    return float(((counts - expected) ** 2 / expected).sum())


def test_uniform52_bits_are_uniform_and_independent():
    """The 52 bits of a draw come from two hashes: its top 26 bits (A) and its low 26 bits (B) must
    each be uniform and independent of each other, and of the neighbouring position's draw (a draw
    whose low half is the next one's top half would pass any test of one number at a time)."""
    keys = rng.seed_keys(torch.arange(40))
    u = rng.uniform52(keys, torch.arange(501).expand(40, -1))
    scaled = u * 2 ** 26
    top, low = scaled.floor() / 2 ** 26, scaled.frac()
    n = u[:, :-1].numel()
    for part in (top, low):
        # Uniform: the mean (z-test, sd 1/sqrt(12n)) and the total variation of a 16-bin histogram
        # (for n uniforms its expectation is about sqrt(16/(2·pi·n)) = 0.011; 0.03 is far beyond).
        assert abs(float(part.mean()) - 0.5) < 4 / (12 * part.numel()) ** 0.5
        hist = torch.bincount((part.flatten() * 16).long().clamp(max=15), minlength=16).double() / part.numel()
        assert 0.5 * float((hist - 1 / 16).abs().sum()) < 0.03
    pairs = {"top and low half of a draw": (top[:, :-1], low[:, :-1]),
             "low half and the next draw's top half": (low[:, :-1], top[:, 1:]),
             "neighbouring draws": (u[:, :-1], u[:, 1:]),
             "the same position of neighbouring keys": (u[:-1], u[1:])}
    for what, (a, b) in pairs.items():
        a, b = a.flatten(), b.flatten()
        r = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        assert abs(r) * a.numel() ** 0.5 < 4, what  # a z-test of Pearson's r (sd 1/sqrt(n))
        assert _chi2_joint(a, b) < 50, what  # 15 degrees of freedom: P(> 50) < 1e-5
    assert n > 10000


def test_uniform52_every_bit_is_a_fair_coin_unrelated_to_the_other_half():
    """Bit by bit: each of the 52 bits is 1 half the time, and bit j of the top half agrees with bit
    j of the low half half the time (z-tests, sd 0.5/sqrt(n)), so no bit is stuck or copied."""
    keys = rng.seed_keys(torch.arange(40))
    u = rng.uniform52(keys, torch.arange(500).expand(40, -1)).flatten()
    m = (u * 2.0 ** 52 - 0.5).round().long()  # the 52-bit integer behind each draw
    bits = (m[:, None] >> torch.arange(52)) & 1
    tol = 4 * 0.5 / u.numel() ** 0.5
    assert ((bits.double().mean(0) - 0.5).abs() < tol).all()
    agree = (bits[:, :26] == bits[:, 26:]).double().mean(0)
    assert ((agree - 0.5).abs() < tol).all()
