"""A tiny LLaDA and an offline tokenizer, for tests and demos without the 16 GB checkpoint.

The model is safegen.models.llada's LLaDAModelLM, the class that runs LLaDA-8B, in a small configuration with
random weights: loading, quantization skip lists and the sampler are exercised on the same code as with
the real model. The tokenizer is word-level, with LLaDA's special tokens and chat template.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .llada import LLaDAConfig, LLaDAModelLM
from ..config import ConfigError

TINY_VOCAB_FILE = Path(__file__).parent.parent / "data" / "tiny_vocab.txt"

# LLaDA's special tokens, as strings; the tiny tokenizer gives them ids after the words, like LLaDA does.
UNK, BOS, EOS = "<unk>", "<|startoftext|>", "<|endoftext|>"
HEADER_START, HEADER_END, EOT, MASK = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|mdm_mask|>"
SPECIAL_TOKENS = (UNK, BOS, EOS, HEADER_START, HEADER_END, EOT, MASK)

# LLaDA-8B-Instruct's template (Llama-3 style): BOS before the first message, each message in header
# tokens and closed by <|eot_id|>, then the assistant header as the generation prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


# The tiny model's dimensions: LLaDA-8B's architecture (safegen.models.llada) at a size that loads in a blink.
TINY_ARCHITECTURE = dict(d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=128, max_sequence_length=512)


def _word_normalizer():
    from tokenizers import normalizers

    # Curly quotes are frequent in web text; folding them keeps "don’t" and "don't" the same tokens.
    return normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.Replace("\u2019", "'"), normalizers.Replace("\u2018", "'"),
        normalizers.Replace("\u201c", '"'), normalizers.Replace("\u201d", '"'),
        normalizers.Lowercase(),
    ])


def _word_pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.BertPreTokenizer()  # split on whitespace, each punctuation mark its own token


def split_words(text: str) -> list[str]:
    """The tokens the tiny tokenizer sees in `text` (the vocabulary is built with this same split)."""
    return [word for word, _ in _word_pre_tokenizer().pre_tokenize_str(_word_normalizer().normalize_str(text))]


def _word_tokenizer(vocab_file: str | Path, specials: tuple, first: tuple = (), **special_roles):
    """A word-level PreTrainedTokenizerFast: `first`, the words of `vocab_file` (one a line), then the
    special tokens, each with its id in that order; `special_roles` name them (bos_token=..., ...)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab_file = Path(vocab_file)
    if not vocab_file.is_file():
        raise FileNotFoundError(f"vocab_file {vocab_file} does not exist "
                                "(regenerate it with benchmarks/build_tiny_vocab.py)")
    words = [line.strip() for line in vocab_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    vocab = {}
    for token in [*first, *words, *specials]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = _word_normalizer()
    backend.pre_tokenizer = _word_pre_tokenizer()
    # WordPiece's decoder joins tokens with spaces and re-attaches punctuation ("hello , world" -> "hello, world").
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    # Special tokens are split out of the raw text before normalisation, so they survive intact.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    # The string-level clean-up also rejoins "don ' t" into "don't".
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNK, clean_up_tokenization_spaces=True,
                                   **special_roles)


def build_tiny_tokenizer(vocab_file: str | Path = TINY_VOCAB_FILE):
    """A word-level PreTrainedTokenizerFast over `vocab_file` (one token a line) plus LLaDA's special tokens."""
    # Like LLaDA's tokenizer, no mask_token is declared: the mask id comes from config.mask_token_id.
    tokenizer = _word_tokenizer(vocab_file, SPECIAL_TOKENS, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                extra_special_tokens=[HEADER_START, HEADER_END, EOT, MASK])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


_TOKENIZER_FIELDS = ("vocab_size", "mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id", "eot_token_id")


def write_tiny_model(directory: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Save a randomly initialised tiny LLaDA and its tokenizer in `directory`; returns the folder.

    `config_overrides` set LLaDAConfig fields (d_model, n_layers, ...) over TINY_ARCHITECTURE; the
    vocabulary size and the special token ids always come from the tokenizer.
    """
    known = {f.name for f in dataclasses.fields(LLaDAConfig)}
    unknown = sorted(set(config_overrides) - known)
    if unknown:
        raise ConfigError(f"config_overrides: unknown LLaDAConfig field(s) {unknown}")
    fixed = sorted(set(config_overrides) & set(_TOKENIZER_FIELDS))
    if fixed:
        raise ConfigError(f"config_overrides: {fixed} are set from the tokenizer and cannot be overridden")

    tokenizer = build_tiny_tokenizer()
    vocab = tokenizer.get_vocab()
    # LLaDA rounds the embedding past the tokenizer's size; so does the tiny model, so logits are wider
    # than the vocabulary here too.
    settings = {**TINY_ARCHITECTURE, "embedding_size": -(-len(tokenizer) // 64) * 64, **config_overrides}
    config = LLaDAConfig(
        vocab_size=len(tokenizer), mask_token_id=vocab[MASK], eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS], bos_token_id=vocab[BOS], eot_token_id=vocab[EOT], **settings)
    # A private RNG state: the caller's global torch seed stays untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LLaDAModelLM(config).eval()
    return _save(model, tokenizer, directory)


# ----------------------------------------------------------------------------- a tiny MDLM
# MDLM-OWT's special tokens: GPT-2's <|endoftext|> (BOS, EOS and padding at once) and the mask appended
# last, so that the mask id is vocab_size - 1 as in MDLM.
MDLM_EOS, MDLM_MASK = "<|endoftext|>", "[MASK]"

# MDLM-OWT's architecture (safegen.models.mdlm) at a size that loads in a blink. Widths are multiples of 32,
# which bitsandbytes' CPU 4-bit kernel needs.
TINY_MDLM_ARCHITECTURE = dict(hidden_dim=64, n_heads=4, cond_dim=64, n_blocks=2, model_length=512)


def build_tiny_mdlm_tokenizer(vocab_file: str | Path = TINY_VOCAB_FILE):
    """The tiny model's words with MDLM's special tokens: <|endoftext|>, then [MASK] as the last id."""
    return _word_tokenizer(vocab_file, (UNK, MDLM_EOS, MDLM_MASK), first=(UNK,), bos_token=MDLM_EOS,
                           eos_token=MDLM_EOS, pad_token=MDLM_EOS, mask_token=MDLM_MASK)


def write_tiny_mdlm(directory: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Save a randomly initialised tiny MDLM (safegen.models.mdlm's class, MDLM-OWT's config fields) and its
    offline tokenizer in `directory`; returns the folder. `config_overrides` set MDLMConfig fields."""
    from .mdlm import MDLMConfig, MDLMModel

    fixed = sorted(set(config_overrides) & {"vocab_size", "mask_token_id"})
    if fixed:
        raise ConfigError(f"config_overrides: {fixed} are set from the tokenizer and cannot be overridden")
    tokenizer = build_tiny_mdlm_tokenizer()
    config = MDLMConfig(vocab_size=len(tokenizer), **{**TINY_MDLM_ARCHITECTURE, **config_overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MDLMModel(config).eval()
    return _save(model, tokenizer, directory)


# ----------------------------------------------------------------------------- a tiny Dream
# Dream's special tokens (Qwen2.5's tokenizer): <|endoftext|> is BOS, EOS and padding; a chat turn is
# closed by <|im_end|>; the mask is <|mask|>.
DREAM_EOS, DREAM_IM_START, DREAM_IM_END, DREAM_MASK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"
DREAM_CHAT_TEMPLATE = (  # Qwen's ChatML, which Dream's instruct model uses (without Qwen's default system turn)
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Dream-7B's architecture (safegen.models.dream) at a size that loads in a blink: grouped-query heads,
# biases on q, k, v. Widths are multiples of 32, which bitsandbytes' CPU 4-bit kernel needs.
TINY_DREAM_ARCHITECTURE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=512)


def build_tiny_dream_tokenizer(vocab_file: str | Path = TINY_VOCAB_FILE):
    """The tiny model's words with Dream's special tokens and chat template."""
    tokenizer = _word_tokenizer(vocab_file, (UNK, DREAM_EOS, DREAM_IM_START, DREAM_IM_END, DREAM_MASK),
                                bos_token=DREAM_EOS, eos_token=DREAM_EOS, pad_token=DREAM_EOS, mask_token=DREAM_MASK,
                                extra_special_tokens=[DREAM_IM_START, DREAM_IM_END])
    tokenizer.chat_template = DREAM_CHAT_TEMPLATE
    return tokenizer


def write_tiny_dream(directory: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Save a randomly initialised tiny Dream (safegen.models.dream's class, Dream's config fields and
    parameter names) and its offline tokenizer in `directory`; returns the folder."""
    from .dream import DreamConfig, DreamModel

    fixed = sorted(set(config_overrides) & {"vocab_size", "mask_token_id", "pad_token_id", "bos_token_id",
                                            "eos_token_id"})
    if fixed:
        raise ConfigError(f"config_overrides: {fixed} are set from the tokenizer and cannot be overridden")
    tokenizer = build_tiny_dream_tokenizer()
    vocab = tokenizer.get_vocab()
    config = DreamConfig(vocab_size=len(tokenizer), mask_token_id=vocab[DREAM_MASK], pad_token_id=vocab[DREAM_EOS],
                         bos_token_id=vocab[DREAM_EOS], eos_token_id=vocab[DREAM_EOS],
                         **{**TINY_DREAM_ARCHITECTURE, **config_overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DreamModel(config).eval()
    return _save(model, tokenizer, directory)


# ----------------------------------------------------------------------------- a tiny LLaDA-MoE
# LLaDA-MoE-7B-A1B's architecture (safegen.models.llada_moe: per-head q/k norms, a router choosing 8 of 64
# SwiGLU experts) at a size that loads in a blink: 8 experts, 2 a token. Widths are multiples of 64
# (bitsandbytes' CPU 4-bit kernel). The tokenizer is the tiny LLaDA's.
TINY_MOE_ARCHITECTURE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                             expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                             max_position_embeddings=512)


def write_tiny_llada_moe(directory: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Save a randomly initialised tiny LLaDA-MoE (config.json as the hub's: model_type "llada",
    architectures ["LLaDAMoEModelLM"]) and the tiny tokenizer in `directory`; returns the folder."""
    from .llada_moe import LLaDAMoEConfig, LLaDAMoEModelLM

    fixed = sorted(set(config_overrides) & set(_TOKENIZER_FIELDS))
    if fixed:
        raise ConfigError(f"config_overrides: {fixed} are set from the tokenizer and cannot be overridden")
    tokenizer = build_tiny_tokenizer()
    vocab = tokenizer.get_vocab()
    config = LLaDAMoEConfig(vocab_size=len(tokenizer), mask_token_id=vocab[MASK], eos_token_id=vocab[EOS],
                            pad_token_id=vocab[EOS], bos_token_id=vocab[BOS], eot_token_id=vocab[EOT],
                            **{**TINY_MOE_ARCHITECTURE, **config_overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LLaDAMoEModelLM(config).eval()
    return _save(model, tokenizer, directory)


def _save(model, tokenizer, directory: str | Path) -> Path:
    """Write a tiny model and its tokenizer as from_pretrained reads them; returns the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
