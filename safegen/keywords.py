"""transformers' `generate()` keywords in SafeGenerator.generate: which carry over to a masked diffusion
sampler, why the others do not, and how do_sample and eos_token_id are read. Without the torch
import, so the command line can list them."""
from __future__ import annotations

from .config import ConfigError

# Honoured (SafeGenerator.generate documents how). use_cache and bos_token_id change nothing here:
# a diffusion step reads the whole sequence afresh, and the prompt is always given.
HONOURED = ("pad_token_id", "eos_token_id", "do_sample", "max_length", "num_return_sequences",
            "use_cache", "bos_token_id")

_BEAMS = ("beam search has no counterpart in a diffusion sampler, which keeps one draft per sample "
          "(num_return_sequences gives several samples)")
_TRUNCATION = ("the sampler draws each token from the model's distribution at `temperature`, truncated only by "
               "top_k and top_p (Dream's filters)")
_LEFT_TO_RIGHT = ("it edits the logits of the next token as tokens come left to right; a diffusion "
                  "sampler commits tokens anywhere in the block, several at a time")
_LENGTH = ("the generation has exactly max_new_tokens positions and ends at the first EOS committed "
           "(logits_eos_inf=True keeps EOS out)")
_OUTPUTS = ("the sampler records no per-token scores or activations; return_dict_in_generate=True "
            "returns one report per sample")

REFUSED = {
    **dict.fromkeys(("num_beams", "num_beam_groups", "diversity_penalty", "length_penalty", "early_stopping",
                     "constraints"), _BEAMS),
    **dict.fromkeys(("min_p", "typical_p", "epsilon_cutoff", "eta_cutoff"), _TRUNCATION),
    **dict.fromkeys(("repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "sequence_bias",
                     "bad_words_ids", "force_words_ids", "suppress_tokens", "begin_suppress_tokens",
                     "forced_bos_token_id", "forced_eos_token_id", "logits_processor", "prefix_allowed_tokens_fn",
                     "renormalize_logits", "exponential_decay_length_penalty"), _LEFT_TO_RIGHT),
    **dict.fromkeys(("min_new_tokens", "min_length"), _LENGTH),
    **dict.fromkeys(("stopping_criteria", "stop_strings", "max_time"),
                    "sampling always runs its fixed number of steps; the output is cut at the first EOS"),
    **dict.fromkeys(("output_scores", "output_logits", "output_attentions", "output_hidden_states"), _OUTPUTS),
    "streamer": "tokens are not produced left to right, so there is no stream to follow",
    "guidance_scale": "use cfg_scale, LLaDA's unsupervised guidance (cfg_scale = guidance_scale - 1)",
    "assistant_model": "speculative decoding needs an autoregressive model",
    "prompt_lookup_num_tokens": "speculative decoding needs an autoregressive model",
    "penalty_alpha": "contrastive search needs an autoregressive model",
    "decoder_start_token_id": "the model is decoder-only",
}


def sample_or_not(options: dict, configured_temperature: float) -> None:
    """One rule for keywords, dicts and GenerationConfigs: a stated do_sample decides (False: greedy
    whatever the temperature, as in transformers; True: the temperature given, else 1); without one,
    the temperature does (0: greedy, > 0: sampling at it). transformers would decode
    GenerationConfig(temperature=0.7) greedily, its do_sample defaulting to False; here a stated
    temperature is taken to mean sampling at it, whichever way it is spelled."""
    if "do_sample" not in options:
        return
    temperature = options.get("temperature", configured_temperature)
    if not options["do_sample"]:
        options["temperature"] = 0.0
    elif "temperature" in options and not temperature:
        raise ConfigError("do_sample=True with temperature=0 contradicts itself: drop one of them")
    elif not temperature:
        options["temperature"] = 1.0


def stop_id_list(value) -> tuple[int, ...]:
    """generate's eos_token_id (an id, or a list or tensor of any number of ids) as a tuple."""
    ids = value.tolist() if hasattr(value, "tolist") else value  # a tensor or an array
    ids = [ids] if isinstance(ids, int) and not isinstance(ids, bool) else ids
    if not isinstance(ids, (list, tuple)) or not ids or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ConfigError(f"eos_token_id must be a token id or a non-empty list of token ids, got {value!r}")
    return tuple(ids)
