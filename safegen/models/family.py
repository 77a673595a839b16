"""What the sampler must know about a masked diffusion LM besides its weights.

The ids differ between model families (LLaDA, Dream, ...), so the sampler never hard-codes them:
it reads them from a ModelProfile, which `profile_from(config, tokenizer)` fills from the model's
config and tokenizer, falling back to LLaDA's published values only for LLaDA itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import LoadError

# LLaDA-8B's special tokens (its tokenizer and config.json). Used only when a LLaDA config omits them.
LLADA_IDS = dict(mask_id=126336, bos_id=126080, eos_id=126081, pad_id=126081, eot_id=126348)


@dataclass(frozen=True)
class ModelProfile:
    mask_id: int
    eos_id: Optional[int] = None
    eot_id: Optional[int] = None
    pad_id: Optional[int] = None
    bos_id: Optional[int] = None
    # Dream-style models predict token i from position i-1; LLaDA predicts token i at position i.
    shift_logits: bool = False
    # Instruct models wrap prompts in a chat template; base models take raw text after BOS.
    chat_template: bool = False
    # Ids the tokenizer knows. Output heads are often padded to a round width (a multiple of 64);
    # the sampler never proposes an id at or beyond this.
    vocab_size: Optional[int] = None
    # Stop tokens besides EOS and EOT (generate's eos_token_id adds them here, keeping the model's own).
    extra_stop_ids: tuple[int, ...] = ()

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens at which an answer ends (the output is cut at the first of them)."""
        return tuple(dict.fromkeys(i for i in (self.eos_id, self.eot_id, *self.extra_stop_ids) if i is not None))

    @property
    def fill_id(self) -> Optional[int]:
        """The id that pads prompts on the left and fills an answer after its stop token: the pad
        token, else EOS (LLaDA's tokenizer and many others have no pad token)."""
        return self.pad_id if self.pad_id is not None else self.eos_id

    def __post_init__(self):
        if self.pad_id is not None and self.pad_id == self.mask_id:
            raise LoadError(
                f"pad_id ({self.pad_id}) equals mask_id: left padding would be denoised as masks; "
                "give the tokenizer a pad token that differs from the mask token")


def profile_from(config, tokenizer=None) -> ModelProfile:
    """The ModelProfile of a model, read from its config first and its tokenizer second.

    The config comes first because LLaDA's tokenizer does not declare its mask as `mask_token`: only
    `config.mask_token_id` names it. LLaDA's published ids are the last resort, for LLaDA configs only.
    """
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    is_llada = getattr(config, "model_type", None) == "llada"

    def find(config_field, tokenizer_attr, token, llada_key):
        value = getattr(config, config_field, None)
        if isinstance(value, (list, tuple)):  # some configs list several eos ids; the first is the main one
            value = value[0] if value else None
        if value is None and tokenizer_attr:
            value = getattr(tokenizer, tokenizer_attr, None)
        if value is None and token:
            # By string, from the vocabulary: convert_tokens_to_ids would answer the unk id for a missing token.
            value = vocab.get(token)
        if value is None and is_llada:
            value = LLADA_IDS[llada_key]
        return value

    mask_id = find("mask_token_id", "mask_token_id", "<|mdm_mask|>", "mask_id")
    if mask_id is None:
        raise LoadError(
            f"no mask token id for model_type {getattr(config, 'model_type', None)!r}: neither "
            "config.mask_token_id, the tokenizer's mask_token nor a '<|mdm_mask|>' token is set")
    return ModelProfile(
        mask_id=mask_id,
        eos_id=find("eos_token_id", "eos_token_id", None, "eos_id"),
        # End of a chat turn: LLaDA's <|eot_id|>, Qwen's and Dream's <|im_end|>.
        eot_id=find("eot_token_id", None, "<|eot_id|>", "eot_id") if "<|im_end|>" not in vocab or "<|eot_id|>" in vocab
        else vocab["<|im_end|>"],
        pad_id=find("pad_token_id", "pad_token_id", None, "pad_id"),
        bos_id=find("bos_token_id", "bos_token_id", None, "bos_id"),
        # Dream-style models predict token i at position i - 1; safegen's own Dream class shifts its
        # logits itself (safegen.models.dream), remote code does not.
        shift_logits=str(getattr(config, "model_type", "")).lower() == "dream"
        and not getattr(config, "safegen_aligned_logits", False),
        chat_template=bool(getattr(tokenizer, "chat_template", None)),
        vocab_size=len(vocab) if vocab else getattr(config, "vocab_size", None),
    )
