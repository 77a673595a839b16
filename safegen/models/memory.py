"""What a model needs in memory, from its config alone: weights per quantization and activations per row.

The parameters are counted on the meta device (no weights are read or allocated), so the figures for
LLaDA-8B come from its config.json before anyone downloads 16 GB. Byte counts follow how bitsandbytes
stores what safegen.models.loading asks for:
  - bf16: 2 bytes a parameter.
  - 8bit (LLM.int8): the transformer blocks' linear weights 1 byte each plus one float32 scale per
    output row; everything else (embedding, output head, norms) stays 16-bit.
  - 4bit (NF4, double quantization, blocks of 64): half a byte a weight, one uint8 scale per block of
    64, one float32 scale per 256 such blocks and a float32 offset per layer (bitsandbytes' two small
    lookup tables per layer, about 1 KB, are left out); the embedding, head and norms stay 16-bit.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from .loading import HEAD_MODULE, LoadError
from ..config import ConfigError

GB = 1e9
NF4_BLOCK, NF4_SCALE_BLOCK = 64, 256


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    quantized_parameters: int  # in the block linears, the layers bitsandbytes quantizes
    active_parameters: int  # what one token runs through: all of them but the experts it is not routed to
    weight_bytes: dict  # quantization -> bytes of weights
    activation_bytes_per_row: int  # one forward pass at seq_len, largest live tensors, compute dtype
    seq_len: int

    def as_dict(self) -> dict:
        return asdict(self)


def quantized_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The linear layers safegen.models.loading quantizes: all of them but the output head."""
    keep = getattr(model, "safegen_keep_modules", (getattr(model, "safegen_head_module", HEAD_MODULE),))
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
            and not any(name == k or name.endswith("." + k) for k in keep)}


def weight_bytes(model: torch.nn.Module, quantization: str, kept_bytes: int = 2) -> int:
    """Bytes of `model`'s weights once loaded with `quantization` ("4bit", "8bit" or "none"/"bf16");
    `kept_bytes` per unquantized parameter (2 for bf16/fp16, 4 for float32)."""
    linears = quantized_linears(model)
    in_linears = {id(m.weight) for m in linears.values()}
    kept = sum(p.numel() for p in model.parameters() if quantization in ("none", "bf16") or id(p) not in in_linears)
    total = kept * kept_bytes
    if quantization == "8bit":
        total += sum(m.weight.numel() + 4 * m.out_features for m in linears.values())
    elif quantization == "4bit":
        for m in linears.values():
            n = m.weight.numel()
            blocks = math.ceil(n / NF4_BLOCK)
            total += math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NF4_SCALE_BLOCK) + 4
    elif quantization not in ("none", "bf16"):
        raise ConfigError(f"quantization must be 4bit, 8bit, bf16 or none, not {quantization!r}")
    return total


def activation_bytes_per_row(config, seq_len: int, dtype_bytes: int = 2) -> int:
    """Largest tensors alive during one forward of one batch row of `seq_len` tokens (no gradients).

    The output logits (seq_len x embedding_size) plus a block's peak: the residual stream and its
    normalised copy (2 x d_model) and the MLP's gate, up and product (3 x mlp_hidden) per token.
    Attention scores are not counted: PyTorch's fused SDPA kernels never hold the seq_len^2 matrix
    (its math fallback would add n_heads x seq_len^2 values). The sampler's float32 copies of the
    generation's logits come on top.
    """
    if getattr(config, "model_type", None) == "mdlm":
        # safegen.models.mdlm keeps the residual stream, norms and attention in float32 (as the reference does
        # under autocast): logits, residual and its modulated copy, q/k/v, the MLP's input and output of
        # 4 x hidden_dim, all 4 bytes.
        return seq_len * (config.vocab_size + 5 * config.hidden_dim + 8 * config.hidden_dim) * 4
    if getattr(config, "num_experts", None) is not None:  # LLaDA-MoE: k experts' SwiGLU per token, router scores
        per_token = (config.vocab_size + 2 * config.hidden_size + 3 * config.num_experts_per_tok * config.expert_width
                     + 2 * config.num_experts)
        return seq_len * per_token * dtype_bytes
    per_token = config.embedding_size + 2 * config.d_model + 3 * config.mlp_hidden_size
    return seq_len * per_token * dtype_bytes


def meta_model(config):
    """The model of `config` on the meta device: its parameters' shapes without any storage."""
    from .llada import LLaDAConfig, LLaDAModelLM
    from .mdlm import MDLMConfig, MDLMModel

    if isinstance(config, MDLMConfig):
        with torch.device("meta"):
            return MDLMModel(config)
    if getattr(config, "num_experts", None) is not None:
        from .llada_moe import LLaDAMoEModelLM

        with torch.device("meta"):
            return LLaDAMoEModelLM(config)
    if not isinstance(config, LLaDAConfig):
        raise LoadError(f"memory estimates cover LLaDA and MDLM configs (model_type 'llada', 'mdlm'), not "
                         f"{getattr(config, 'model_type', type(config).__name__)!r}")
    with torch.device("meta"):
        return LLaDAModelLM(config)


def active_parameters(model: torch.nn.Module, config) -> int:
    """Parameters a token runs through: every one, but in a mixture of experts only the
    num_experts_per_tok experts it is routed to in each layer (not the other experts)."""
    total = sum(p.numel() for p in model.parameters())
    experts = getattr(config, "num_experts", None)
    if not experts:
        return total
    expert_params = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    return total - expert_params + expert_params * config.num_experts_per_tok // experts


def estimate(config, seq_len: int = 256) -> MemoryEstimate:
    model = meta_model(config)
    return MemoryEstimate(
        parameters=sum(p.numel() for p in model.parameters()),
        quantized_parameters=sum(m.weight.numel() for m in quantized_linears(model).values()),
        active_parameters=active_parameters(model, config),
        weight_bytes={q: weight_bytes(model, q) for q in ("4bit", "8bit", "bf16")},
        activation_bytes_per_row=activation_bytes_per_row(config, seq_len), seq_len=seq_len)


def load_config(model_id_or_path: str, revision: str | None = None):
    """The LLaDA or MDLM config of a folder or hub id (only config.json is read; nothing is executed)."""
    from transformers import PretrainedConfig

    from .llada import LLaDAConfig
    from .loading import PINNED_REVISIONS
    from .mdlm import MDLMConfig

    if revision is None:
        revision = PINNED_REVISIONS.get(model_id_or_path)
    config_dict, _ = PretrainedConfig.get_config_dict(model_id_or_path, revision=revision)
    classes = {"llada": LLaDAConfig, "mdlm": MDLMConfig}
    if config_dict.get("model_type") == "llada":
        from .loading import check_llada_architecture

        check_llada_architecture(config_dict, model_id_or_path)
        if config_dict.get("architectures") == ["LLaDAMoEModelLM"]:
            from .llada_moe import LLaDAMoEConfig

            return LLaDAMoEConfig.from_dict(config_dict)
    if config_dict.get("model_type") not in classes:
        raise LoadError(f"config.json of {model_id_or_path}: model_type {config_dict.get('model_type')!r}; "
                        "memory estimates cover LLaDA (model_type 'llada') and MDLM ('mdlm') only")
    return classes[config_dict["model_type"]].from_dict(config_dict)


def report(estimate_: MemoryEstimate, quantization: str | None = None) -> str:
    """A small table for the terminal."""
    rows = [("parameters", f"{estimate_.parameters:,} ({estimate_.parameters / 1e9:.2f} B)")]
    if estimate_.active_parameters != estimate_.parameters:
        rows.append(("active parameters", f"{estimate_.active_parameters:,} ({estimate_.active_parameters / 1e9:.2f} B"
                                          " a token: the experts it is routed to)"))
    for q, b in estimate_.weight_bytes.items():
        if quantization in (None, q) or (quantization == "none" and q == "bf16"):
            kept = "embedding, head and norms 16-bit" if q != "bf16" else "all weights 16-bit"
            rows.append((f"weights {q}", f"{b / GB:.2f} GB ({kept})"))
    rows.append((f"activations per row, {estimate_.seq_len} tokens",
                 f"{estimate_.activation_bytes_per_row / 1e6:.1f} MB (one forward pass)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def command(args) -> int:
    """`safegen memory`: the estimate for --model, one line of error on a bad config or argument."""
    import json
    import sys

    if args.seq_len < 1:
        print(f"safegen memory: error: --seq-len must be positive, not {args.seq_len}", file=sys.stderr)
        return 2
    try:
        result = estimate(load_config(args.model, args.revision), seq_len=args.seq_len)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"safegen memory: error: {reason}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_dict()) if args.json else report(result, args.quantization))
    return 0
