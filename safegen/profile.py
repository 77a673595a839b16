"""What the sampler must know about a masked diffusion LM besides its weights.

The ids differ between model families (LLaDA, Dream, ...), so the sampler never hard-codes them:
it reads them from a ModelProfile, which `profile_from(config, tokenizer)` fills from the model's
config and tokenizer, falling back to LLaDA's published values only for LLaDA itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# LLaDA-8B's special tokens (docs/llada.md). Used only when a LLaDA config omits them.
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

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Tokens at which an answer ends (the output is cut at the first of them)."""
        return tuple(i for i in (self.eos_id, self.eot_id) if i is not None)

    def __post_init__(self):
        if self.pad_id is not None and self.pad_id == self.mask_id:
            raise ValueError(
                f"pad_id ({self.pad_id}) equals mask_id: left padding would be denoised as masks; "
                "give the tokenizer a pad token that differs from the mask token")
