"""rng.derive takes an int tag on a path without tensor ops: it must give the bits of the tensor path."""
import torch

from safegen.sampling import rng


def test_int_tags_give_the_tensor_path_keys():
    keys = rng.seed_keys(torch.arange(64) * 7919 + 3)
    for tags in [(0,), (1, 5), (rng.Stream.PROPOSAL, 17, 2**32 + 9, 0), (2**32 - 1,), (-3, 4)]:
        as_ints = rng.derive(keys, *tags)
        as_tensors = rng.derive(keys, *(torch.tensor(int(t)) for t in tags))
        assert torch.equal(as_ints, as_tensors), tags
    # A tensor tag per row still works beside int tags.
    per_row = torch.arange(64)
    mixed = rng.derive(keys, rng.Stream.STEP, per_row)
    assert torch.equal(mixed, rng.derive(keys, torch.tensor(0), per_row))


def test_uniform52_matches_its_two_hashes():
    # The two hashes of an element (ids 2i and 2i+1) computed in one pass: the same number as apart.
    keys = rng.seed_keys(torch.arange(5))
    index = torch.randint(0, 2**31 - 1, (5, 3, 4), generator=torch.Generator().manual_seed(0))
    u = rng.uniform52(keys, index)
    hi = (rng._hash(keys, index * 2) >> 6) & 0x3FFFFFF
    lo = (rng._hash(keys, index * 2 + 1) >> 6) & 0x3FFFFFF
    want = (hi.to(torch.float64) * (1 << 26) + lo).add_(0.5).mul_(2.0 ** -52)
    assert torch.equal(u, want)
