"""A tiny LLaDA-shaped model and an offline tokenizer, for tests and demos without the 16 GB checkpoint.

The model has LLaDA-8B's interface (docs/llada.md): a bidirectional transformer whose config uses LLaDA's
field names and whose modules use LLaDA's names (`model.transformer.blocks.{i}.ff_out`, output head
`model.transformer.ff_out`, ...), so that loading, quantization skip lists and the sampler are exercised
exactly as with the real model. Importing this module registers it with transformers' Auto classes under
its own model_type, so `AutoModel.from_pretrained(folder)` needs no remote code.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import MaskedLMOutput

TINY_VOCAB_FILE = Path(__file__).parent / "data" / "tiny_vocab.txt"

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


class TinyLLaDAConfig(PretrainedConfig):
    model_type = "safegen-tiny-llada"

    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    mlp_hidden_size: int = 128
    vocab_size: int = 4096
    # Rows of the embedding and the output head; LLaDA rounds it up past the tokenizer's size, so logits
    # are wider than the vocabulary and a sampler must never pick an id >= vocab_size.
    embedding_size: int | None = None
    max_sequence_length: int = 512
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02
    mask_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eot_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.embedding_size is None:
            self.embedding_size = -(-self.vocab_size // 64) * 64
        super().__post_init__(**kwargs)
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model ({self.d_model}) must split into n_heads ({self.n_heads}) heads "
                             "of even size (RoPE rotates pairs of dimensions)")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.embedding_size < self.vocab_size:
            raise ValueError(f"embedding_size ({self.embedding_size}) is smaller than vocab_size "
                             f"({self.vocab_size})")


class TinyLLaDARMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In float32: the mean of squares overflows or loses precision in half precision.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.float()).to(x.dtype)


def rotary_angles(length: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE's angles for positions 0..length-1, shape (length, head_dim).

    Computed per call rather than cached in a buffer: buffers are created on the meta device when
    from_pretrained places a model with device_map, and this costs nothing at this size.
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.float().chunk(2, dim=-1)
    turned = torch.cat([-second, first], dim=-1)
    return (x.float() * cos + turned * sin).to(x.dtype)


class TinyLLaDABlock(nn.Module):
    """LLaDA's LLaMA-style block: pre-norm attention without a causal mask, then a SwiGLU MLP."""

    def __init__(self, config: TinyLLaDAConfig):
        super().__init__()
        d, head_dim = config.d_model, config.d_model // config.n_heads
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, head_dim
        self.attn_norm = TinyLLaDARMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, config.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d, config.n_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d, config.n_kv_heads * head_dim, bias=False)
        self.attn_out = nn.Linear(config.n_heads * head_dim, d, bias=False)
        self.ff_norm = TinyLLaDARMSNorm(d, config.rms_norm_eps)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)  # gate, goes through SiLU
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)

    def forward(self, x, cos, sin, key_mask):
        batch, length, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        # Bidirectional: every position sees every unpadded position (no causal mask).
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=False)
        x = x + self.attn_out(att.transpose(1, 2).reshape(batch, length, -1))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class TinyLLaDABackbone(nn.Module):
    """Plays LLaDA's `LLaDAModel`: holds `.transformer`, whose keys give LLaDA's module paths."""

    def __init__(self, config: TinyLLaDAConfig):
        super().__init__()
        # ff_out last: transformers' default quantization skip list keeps the module of the last
        # parameter unquantized, which then is the head, as in LLaDA.
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.embedding_size, config.d_model),
            blocks=nn.ModuleList(TinyLLaDABlock(config) for _ in range(config.n_layers)),
            ln_f=TinyLLaDARMSNorm(config.d_model, config.rms_norm_eps),
            ff_out=nn.Linear(config.d_model, config.embedding_size, bias=False),
        ))
        self.config = config

    def forward(self, input_ids, attention_mask=None):
        x = self.transformer.wte(input_ids)
        # Positions 0..L-1 even under left padding: RoPE only sees position differences, and padded
        # keys are masked, so the real tokens' logits do not depend on how much padding precedes them.
        cos, sin = rotary_angles(input_ids.shape[1], self.config.d_model // self.config.n_heads,
                                 self.config.rope_theta, input_ids.device)
        key_mask = None
        if attention_mask is not None:
            key_mask = attention_mask.bool()
            # A row without any real token would softmax over nothing (NaN); let it see everything.
            key_mask = (key_mask | ~key_mask.any(-1, keepdim=True))[:, None, None, :]
        for block in self.transformer.blocks:
            x = block(x, cos, sin, key_mask)
        return self.transformer.ff_out(self.transformer.ln_f(x))


class TinyLLaDAModel(PreTrainedModel):
    config_class = TinyLLaDAConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["TinyLLaDABlock"]
    supports_gradient_checkpointing = False

    def __init__(self, config: TinyLLaDAConfig):
        super().__init__(config)
        self.model = TinyLLaDABackbone(config)
        self.post_init()

    def _init_weights(self, module):
        # transformers.initialization skips tensors already loaded from a checkpoint.
        std = self.config.init_std
        if module is self.model.transformer.ff_out:
            # The head reads an RMS-normalised state: std d_model**-0.5 gives logits of order 1, so a
            # random model already has peaked and flat positions for the sampler to tell apart.
            init.normal_(module.weight, mean=0.0, std=self.config.d_model ** -0.5)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, TinyLLaDARMSNorm):
            init.ones_(module.weight)

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def set_input_embeddings(self, value):
        self.model.transformer.wte = value

    def get_output_embeddings(self):
        return self.model.transformer.ff_out

    def forward(self, input_ids, attention_mask=None, **kwargs) -> MaskedLMOutput:
        """Logits (B, L, embedding_size); position i predicts token i (no shift), as in LLaDA."""
        return MaskedLMOutput(logits=self.model(input_ids, attention_mask))

    def generate(self, *args, **kwargs):
        raise NotImplementedError(
            "a masked diffusion LM has no left-to-right generate(); use safegen's sampler instead")


AutoConfig.register(TinyLLaDAConfig.model_type, TinyLLaDAConfig, exist_ok=True)
AutoModel.register(TinyLLaDAConfig, TinyLLaDAModel, exist_ok=True)
AutoModelForMaskedLM.register(TinyLLaDAConfig, TinyLLaDAModel, exist_ok=True)


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


def build_tiny_tokenizer(vocab_file: str | Path = TINY_VOCAB_FILE):
    """A word-level PreTrainedTokenizerFast over `vocab_file` (one token a line) plus LLaDA's special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab_file = Path(vocab_file)
    if not vocab_file.is_file():
        raise FileNotFoundError(f"vocab_file {vocab_file} does not exist "
                                "(regenerate it with benchmarks/build_tiny_vocab.py)")
    words = [line.strip() for line in vocab_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    vocab = {}
    for token in [*words, *SPECIAL_TOKENS]:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = _word_normalizer()
    backend.pre_tokenizer = _word_pre_tokenizer()
    # WordPiece's decoder joins tokens with spaces and re-attaches punctuation ("hello , world" -> "hello, world").
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    # Special tokens are split out of the raw text before normalisation, so they survive intact.
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    # Like LLaDA's tokenizer, no mask_token is declared: the mask id comes from config.mask_token_id.
    # The decoder cleans up per token; the string-level clean-up also rejoins "don ' t" into "don't".
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=EOS,
        extra_special_tokens=[HEADER_START, HEADER_END, EOT, MASK], clean_up_tokenization_spaces=True,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


_TOKENIZER_FIELDS = ("vocab_size", "mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id", "eot_token_id")


def write_tiny_model(directory: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Save a randomly initialised tiny LLaDA and its tokenizer in `directory`; returns the folder.

    `config_overrides` set TinyLLaDAConfig fields (d_model, n_layers, ...); the vocabulary size and the
    special token ids always come from the tokenizer.
    """
    known = {f.name for f in dataclasses.fields(TinyLLaDAConfig)}
    unknown = sorted(set(config_overrides) - known)
    if unknown:
        raise ValueError(f"config_overrides: unknown TinyLLaDAConfig field(s) {unknown}")
    fixed = sorted(set(config_overrides) & set(_TOKENIZER_FIELDS))
    if fixed:
        raise ValueError(f"config_overrides: {fixed} are set from the tokenizer and cannot be overridden")

    tokenizer = build_tiny_tokenizer()
    vocab = tokenizer.get_vocab()
    config = TinyLLaDAConfig(
        vocab_size=len(tokenizer), mask_token_id=vocab[MASK], eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS], bos_token_id=vocab[BOS], eot_token_id=vocab[EOT], **config_overrides)
    # A private RNG state: the caller's global torch seed stays untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyLLaDAModel(config).eval()

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
