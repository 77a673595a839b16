"""MDLM's denoiser (Sahoo et al., NeurIPS 2024), implemented here so that its checkpoints load without
running remote code.

The released model (kuleshov-group/mdlm-owt, 130M parameters, trained on OpenWebText with the GPT-2
tokenizer plus a mask token, id 50257) is the diffusion transformer of kuleshov-group/mdlm
(models/dit.py): a token embedding, a time embedding that conditions every block through adaptive
LayerNorm (a shift, a scale and a gate per sub-layer), LayerNorms with a weight and no bias, rotary
embeddings on queries and keys (rotate-half layout), bidirectional attention, a GELU(tanh) MLP with
biases, and a final layer modulated by the time embedding. Its hub repository ships modeling code that
needs flash-attn; this module reads the same config.json (model_type "mdlm": hidden_dim, cond_dim,
n_blocks, n_heads, vocab_size, model_length, dropout, time_conditioning) and the same weight names
(`backbone.*`), and registers itself with transformers' Auto classes when imported.

The forward returns raw logits over the whole vocabulary, the mask column included. What MDLM's "subs"
parameterization does with them (the mask never predicted, decoded positions carried over) and the
noise schedule belong to the sampler (safegen.sampling.mdlm).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import MaskedLMOutput

__all__ = ["MDLMConfig", "MDLMModel", "HEAD_MODULE", "MDLM_OWT", "mdlm_tokenizer", "GPT2_TOKENIZER",
           "GPT2_REVISION", "MASK_TOKEN"]

MDLM_OWT = "kuleshov-group/mdlm-owt"  # its pinned commit is in safegen.models.loading.PINNED_REVISIONS
# The hub repository has no tokenizer files: MDLM-OWT was trained on GPT-2's tokenizer, with the mask
# appended as id 50257 (vocab_size 50258). This commit of openai-community/gpt2 is the one loaded.
GPT2_TOKENIZER = "openai-community/gpt2"
GPT2_REVISION = "607a30d783dfa663caf39e06633721c8d4cfcd7e"
GPT2_VOCAB_SIZE = 50257
MASK_TOKEN = "[MASK]"

# The output projection, kept in full precision when the blocks are quantized (safegen.models.loading).
HEAD_MODULE = "backbone.output_layer.linear"

# Constants of the reference architecture, not config fields.
FREQUENCY_EMBEDDING_SIZE = 256  # sinusoidal features of the time embedding
ROTARY_BASE = 10_000.0
MLP_RATIO = 4


class MDLMConfig(PretrainedConfig):
    """MDLM's config.json fields; the defaults are MDLM-OWT's values."""

    model_type = "mdlm"

    vocab_size: int = 50258
    model_length: int = 1024  # the training length; rotary embeddings accept other lengths
    hidden_dim: int = 768
    cond_dim: int = 128
    n_blocks: int = 12
    n_heads: int = 12
    dropout: float = 0.1  # training only
    time_conditioning: bool = False
    # Not in the released config: MDLM's mask is the last id (the tokenizer's size, appended).
    mask_token_id: int | None = None
    layer_norm_eps: float = 1e-5  # F.layer_norm's default, as the reference calls it

    def __post_init__(self, **kwargs):
        if self.mask_token_id is None:
            self.mask_token_id = self.vocab_size - 1
        super().__post_init__(**kwargs)
        if self.hidden_dim % self.n_heads or (self.hidden_dim // self.n_heads) % 2:
            raise ValueError(f"MDLM config field hidden_dim ({self.hidden_dim}) must split into n_heads "
                             f"({self.n_heads}) heads of even size (rotary embeddings rotate pairs)")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"MDLM config field mask_token_id ({self.mask_token_id}) is outside the "
                             f"vocabulary (vocab_size {self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.n_heads


class WeightOnlyLayerNorm(nn.Module):
    """LayerNorm in float32 without a bias, then scaled by a weight: the reference's norm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps) * self.weight.float()


def modulated(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: the normalised state scaled by (1 + scale) and shifted, per row and channel."""
    return x * (1 + scale) + shift


def linear(layer: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`layer(x)` computed in `dtype` (the unquantized weights' dtype), returned in float32.

    The residual stream stays float32 as in the reference, which runs its blocks under bf16 autocast:
    matrix products in the weights' precision, sums and norms in float32."""
    return layer(x.to(dtype)).float()


class TimeEmbedding(nn.Module):
    """The noise level as a vector: sinusoidal features (cosines, then sines) through a SiLU MLP.
    Parameter names `mlp.0` and `mlp.2` are the checkpoint's."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQUENCY_EMBEDDING_SIZE, cond_dim), nn.SiLU(),
                                 nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        half = FREQUENCY_EMBEDDING_SIZE // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        angles = sigma.float()[:, None] * freqs[None, :]
        features = torch.cat([angles.cos(), angles.sin()], dim=-1)
        return linear(self.mlp[2], F.silu(linear(self.mlp[0], features, dtype)), dtype)


class TokenEmbedding(nn.Module):
    """A bare (vocab_size, hidden_dim) table named `embedding`, as in the checkpoint."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding[ids]


def rotary(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (B, 1, L, head_dim) of the rotary angles at `positions` (B, L), float32: frequency i
    on dimensions i and i + head_dim/2 (flash-attn's non-interleaved layout)."""
    inv_freq = 1.0 / ROTARY_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device)
                                     / head_dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class DiTBlock(nn.Module):
    """adaLN-modulated attention and MLP sub-layers, each added to the residual stream through a gate."""

    def __init__(self, config: MDLMConfig):
        super().__init__()
        d = config.hidden_dim
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.norm1 = WeightOnlyLayerNorm(d, config.layer_norm_eps)
        self.attn_qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.norm2 = WeightOnlyLayerNorm(d, config.layer_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(d, MLP_RATIO * d), nn.GELU(approximate="tanh"), nn.Linear(MLP_RATIO * d, d))
        self.adaLN_modulation = nn.Linear(config.cond_dim, 6 * d)

    def forward(self, x, c, cos, sin, key_mask, dtype):
        batch, length, _ = x.shape
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = linear(self.adaLN_modulation, c, dtype)[:, None].chunk(6, -1)
        h = modulated(self.norm1(x), shift_a, scale_a)
        # Heads are split as (3, n_heads, head_dim) along the projection: q, k, v, then heads.
        q, k, v = linear(self.attn_qkv, h, dtype).view(batch, length, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v, attn_mask=key_mask)
        x = x + gate_a * linear(self.attn_out, att.transpose(1, 2).reshape(batch, length, -1), dtype)
        h = modulated(self.norm2(x), shift_m, scale_m)
        return x + gate_m * linear(self.mlp[2], F.gelu(linear(self.mlp[0], h, dtype), approximate="tanh"), dtype)


class OutputLayer(nn.Module):
    def __init__(self, config: MDLMConfig):
        super().__init__()
        self.norm_final = WeightOnlyLayerNorm(config.hidden_dim, config.layer_norm_eps)
        self.adaLN_modulation = nn.Linear(config.cond_dim, 2 * config.hidden_dim)
        self.linear = nn.Linear(config.hidden_dim, config.vocab_size)

    def forward(self, x, c, dtype):
        shift, scale = linear(self.adaLN_modulation, c, dtype)[:, None].chunk(2, dim=-1)
        return linear(self.linear, modulated(self.norm_final(x), shift, scale), dtype)


class MDLMBackbone(nn.Module):
    """The `backbone` attribute of MDLMModel; its attribute names give the checkpoint's."""

    def __init__(self, config: MDLMConfig):
        super().__init__()
        self.config = config
        self.vocab_embed = TokenEmbedding(config.vocab_size, config.hidden_dim)
        self.sigma_map = TimeEmbedding(config.cond_dim)
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.n_blocks))
        # Last: transformers' default quantization skip list keeps the last module's parameters unquantized.
        self.output_layer = OutputLayer(config)

    def forward(self, input_ids, attention_mask=None, timesteps=None):
        batch, length = input_ids.shape
        # The compute dtype: the embedding is never quantized.
        dtype = self.vocab_embed.embedding.dtype
        # The released model is not time conditioned: it always sees the embedding of noise level 0.
        sigma = torch.zeros(batch, device=input_ids.device)
        if self.config.time_conditioning:
            if timesteps is None:
                raise ValueError("this MDLM is time conditioned (config time_conditioning=true): pass "
                                 "timesteps, the noise level of each row")
            sigma = torch.as_tensor(timesteps, device=input_ids.device).float().reshape(-1).expand(batch)
        c = F.silu(self.sigma_map(sigma, dtype))
        x = self.vocab_embed(input_ids).float()
        key_mask = None
        positions = torch.arange(length, device=input_ids.device).expand(batch, length)
        if attention_mask is not None:
            real = attention_mask.bool()
            # Positions count from each row's first real token, so a left-padded row's angles are the
            # unpadded row's; padded keys are masked. A row without any real token sees everything
            # (softmax over nothing would be NaN).
            positions = (real.long().cumsum(1) - 1).clamp(min=0)
            key_mask = (real | ~real.any(-1, keepdim=True))[:, None, None, :]
        cos, sin = rotary(positions, self.config.head_dim)
        for block in self.blocks:
            x = block(x, c, cos, sin, key_mask, dtype)
        return self.output_layer(x, c, dtype)


class MDLMModel(PreTrainedModel):
    config_class = MDLMConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    _no_split_modules = ["DiTBlock"]
    supports_gradient_checkpointing = False
    # The reference keeps its rotary frequencies as a buffer; they are recomputed here from head_dim.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]
    safegen_head_module = HEAD_MODULE

    def __init__(self, config: MDLMConfig):
        super().__init__(config)
        self.backbone = MDLMBackbone(config)
        self.post_init()

    def _init_weights(self, module):
        # Only for random models (tests, benchmarks): the reference zero-initialises the modulations and
        # the head, which would make every block an identity and every logit 0. Small random values
        # instead, with a head scaled to give logits of order 1, so a sampler has something to tell apart.
        std = 0.02
        if isinstance(module, TokenEmbedding):
            init.normal_(module.embedding, mean=0.0, std=1.0)
        elif module is self.backbone.output_layer.linear:
            init.normal_(module.weight, mean=0.0, std=self.config.hidden_dim ** -0.5)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, WeightOnlyLayerNorm):
            init.ones_(module.weight)

    def get_input_embeddings(self):
        return self.backbone.vocab_embed

    def get_output_embeddings(self):
        return self.backbone.output_layer.linear

    def forward(self, input_ids, attention_mask=None, timesteps=None, **kwargs) -> MaskedLMOutput:
        """Logits (B, L, vocab_size), float32; position i predicts token i.

        attention_mask (B, L): 1 for real tokens, 0 for (left) padding, which no position attends to.
        timesteps (B,): the noise level, read only by time-conditioned models (MDLM-OWT is not).
        """
        return MaskedLMOutput(logits=self.backbone(input_ids, attention_mask, timesteps))

    def generate(self, *args, **kwargs):
        raise NotImplementedError(
            "a masked diffusion LM has no left-to-right generate(); use safegen's sampler instead")


def mdlm_tokenizer(config: MDLMConfig, folder=None, local_files_only: bool = False):
    """The tokenizer of an MDLM: the one saved in `folder`, else GPT-2's at the pinned commit, with
    MDLM's mask token declared (appended when the tokenizer lacks one) and padding by EOS. Its mask
    id must be config.mask_token_id: a mismatch would make the sampler denoise the wrong token."""
    from transformers import AutoTokenizer

    source = folder if folder is not None else GPT2_TOKENIZER
    hub = {} if folder is not None else dict(revision=GPT2_REVISION, local_files_only=local_files_only)
    tokenizer = AutoTokenizer.from_pretrained(source, **hub)
    if tokenizer.mask_token is None:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.mask_token_id != config.mask_token_id:
        raise ValueError(f"the tokenizer of {source} gives the mask token id {tokenizer.mask_token_id}, the "
                         f"model's config mask_token_id (vocab_size - 1 unless set) is {config.mask_token_id}")
    return tokenizer


AutoConfig.register(MDLMConfig.model_type, MDLMConfig, exist_ok=True)
# The hub config maps AutoModelForMaskedLM to its model; AutoModel is what safegen.models.loading asks for.
for _auto in (AutoModel, AutoModelForMaskedLM):
    _auto.register(MDLMConfig, MDLMModel, exist_ok=True)
