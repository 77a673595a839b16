"""Scripted mask predictors with known logits, for testing the sampler from outside; and the small
exact toy the IterRef exactness suites share."""
from typing import NamedTuple

import torch


class SmallToy(NamedTuple):
    V: int
    L: int
    ALPHA: float
    N_SAMPLES: int
    P0: torch.Tensor
    REWARD: object
    BLAME: object
    P_STAR: torch.Tensor
    FLOOR: float  # expected TV of N_SAMPLES exact draws from P_STAR: about 0.035
    DENOISER: object


def small_toy() -> SmallToy:
    """V = 3, L = 4, alpha 0.5, 3000 samples; token 0 is "toxic" (reward: minus its count)."""
    from safegen.research import toy

    V, L, alpha, n = 3, 4, 0.5, 3000
    p0 = toy.random_distribution(V, L, seed=1, sharpness=1.0)
    reward = toy.toxic_count_reward(V, L, toxic=[0])
    p_star = toy.target(p0, reward.values, alpha)
    return SmallToy(V, L, alpha, n, p0, reward, toy.toxic_blame([0]), p_star, toy.expected_tv_noise(p_star, n),
                    toy.TableDenoiser(p0, V, L))


class ScriptedModel(torch.nn.Module):
    """Logits are a fixed table (positions × vocab) plus an optional dependence on the input, and
    every call's input is recorded. The mask id is the last vocabulary entry."""

    def __init__(self, vocab: int = 12, length: int = 64, seed: int = 0, input_weight: float = 0.0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(length, vocab, generator=g) * 3
        self.mix = torch.randn(vocab, vocab, generator=g) * input_weight
        self.vocab, self.mask_id = vocab, vocab - 1
        self.calls: list[torch.Tensor] = []

    def forward(self, input_ids, attention_mask=None):
        self.calls.append(input_ids.clone())
        L = input_ids.shape[1]
        onehot = torch.nn.functional.one_hot(input_ids, self.vocab).float()
        context = onehot.mean(1, keepdim=True) @ self.mix  # bidirectional: every token sees all
        return self.table[:L][None] + context


class WrappedOutput(torch.nn.Module):
    """Returns an object with `.logits`, like transformers models."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids):
        class Out:
            pass

        o = Out()
        o.logits = self.inner(input_ids)
        return o
