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


# ---------------------------------------------------------------- a small random LLaDA and its prompts
SMALL_MASK, SMALL_PAD = 199, 198  # the small LLaDA's mask token and its pad / EOS token


def small_llada(seed: int = 0, head_scale: float = 1.0, n_layers: int = 2):
    """A random LLaDA with a 200-token vocabulary (mask 199, pad and EOS 198), d_model 64, grouped
    heads (4 query, 2 key-value); `head_scale` > 1 sharpens its logits (confident steps)."""
    from safegen.models.llada import LLaDAConfig, LLaDAModelLM

    torch.manual_seed(seed)
    cfg = LLaDAConfig(d_model=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, mlp_hidden_size=96, vocab_size=200,
                      embedding_size=200, max_sequence_length=128, mask_token_id=SMALL_MASK,
                      eos_token_id=SMALL_PAD, pad_token_id=SMALL_PAD)
    model = LLaDAModelLM(cfg).eval()
    if head_scale != 1.0:
        with torch.no_grad():
            model.model.transformer.ff_out.weight.mul_(head_scale)
    return model


def padded_prompts(seed: int, rows: int, length: int, pads: tuple = ()):
    """(ids, attention mask) of random prompts below the special tokens; row i + 1 left padded by pads[i]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 190, (rows, length), generator=g)
    attn = torch.ones_like(ids)
    for row, pad in enumerate(pads, start=1):
        attn[row, :pad] = 0
    ids[attn == 0] = SMALL_PAD
    return ids, attn


def served_and_offline(model_dir, log, messages, max_tokens=8, seed=3):
    """(the answer `safegen serve` gives on `model_dir`, called by the openai client with the server's
    defaults plus temperature 1, one thread; the report generate_text gives offline with the same
    settings, the command line's dual cache included)."""
    import openai

    from benchmarks.serve_process import ServerProcess
    from safegen import SafeGenerator
    from safegen.models.loading import load_model

    server = ServerProcess(model_dir, log, "--policy", "offline", "--threads", "1", "--temperature", "1")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        served = client.chat.completions.create(model=str(model_dir), messages=messages, max_tokens=max_tokens,
                                                seed=seed)
    finally:
        server.stop()
    model, tokenizer, profile = load_model(str(model_dir), quantization="none")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        offline = SafeGenerator(model, tokenizer, policy="offline", profile=profile,
                                sampling={"max_new_tokens": max_tokens, "temperature": 1.0, "cache": "dual"})
        [alone] = offline.generate_text([messages], seed=seed)
    finally:
        torch.set_num_threads(threads)
    return served, alone
