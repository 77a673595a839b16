"""Loading a masked diffusion LM (LLaDA-8B-Instruct by default), optionally quantized with bitsandbytes.

`load_model` returns the model in eval mode, its tokenizer and the ModelProfile the sampler needs. Every
failure a user can cause (no cached weights and no network, remote code not trusted, bitsandbytes
missing, a bad argument) is a LoadError whose message says what to do.

LLaDA checkpoints (model_type "llada") and MDLM checkpoints (model_type "mdlm") always load with safegen's
own implementations (safegen.models.llada, safegen.models.mdlm): the repository's modeling code is never imported,
whatever its config.json's auto_map says and whatever trust_remote_code is. MDLM's hub repository has no
tokenizer: an MDLM without tokenizer files gets GPT-2's, with MDLM's mask token appended. Other model types load through transformers' Auto classes; those that exist only
as the repository's own code need trust_remote_code=True.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LoadError
from .family import profile_from

if TYPE_CHECKING:  # torch is imported when a model loads, not with the command line
    import torch

__all__ = ["DEFAULT_MODEL", "DEFAULT_REVISION", "LLADA_15", "PINNED_REVISIONS", "HEAD_MODULE", "QUANTIZATIONS",
           "TOKENIZER_FILES", "LoadError", "load_model", "model_type_of", "require_tokenizer", "profile_from"]

DEFAULT_MODEL = "GSAI-ML/LLaDA-8B-Instruct"
# A commit of the hub repository (the snapshot that public projects pin and that appears in their
# Hugging Face cache paths). It fixes the weights, config.json and tokenizer that are downloaded; the
# repository's modeling code is not used (safegen.models.llada replaces it), so which side of its October 2025
# attention-mask change this commit is on does not matter here. To use another commit, pass
# revision="<40-hex commit>" (the repository's "Files and versions" history lists them).
DEFAULT_REVISION = "08b83a6feb34df1a6011b80c3c00c7563e963b07"

# LLaDA-1.5 (LLaDA-8B-Instruct after VRPO preference optimisation: the same architecture, config
# fields and tokenizer, so the LLaDA class loads it): the snapshot commit that appears in public
# projects' Hugging Face cache paths (models--GSAI-ML--LLaDA-1.5/snapshots/<commit>). Taken from there, not
# checked against the hub from here (no hub access); pass revision= to choose another.
LLADA_15 = "GSAI-ML/LLaDA-1.5"

# MDLM-OWT's commit: the snapshot public reproductions of MDLM pin (its config.json and model.safetensors).
PINNED_REVISIONS = {DEFAULT_MODEL: DEFAULT_REVISION,
                    LLADA_15: "43716255dd5ce01192bcfc073a2557e969a2f271",
                    "kuleshov-group/mdlm-owt": "d0958fa851335ece6c15260ce0025f030673c0fb"}

QUANTIZATIONS = ("4bit", "8bit", "none")

# LLaDA's output head, kept in full precision: it turns every position's state into logits. The full
# path, never the short name "ff_out": transformers also matches skip names as suffixes, and every
# block's MLP down-projection is called `model.transformer.blocks.{i}.ff_out`, so "ff_out" would leave
# all of them unquantized too.
HEAD_MODULE = "model.transformer.ff_out"


# Any of these in a model folder means it ships a tokenizer (fast, sentencepiece or vocabulary based).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt")


def load_model(model_id_or_path: str = DEFAULT_MODEL, quantization: str | None = "4bit",
               revision: str | None = None, device_map="auto", dtype=None, trust_remote_code: bool = False,
               local_files_only: bool | None = None):
    """(model, tokenizer, profile) for a hub id or a local folder.

    quantization: "4bit" (NF4 with double quantization), "8bit" or "none" (None means "none").
    revision: hub commit, branch or tag; DEFAULT_REVISION for DEFAULT_MODEL when None. Ignored for folders.
    dtype: of the unquantized weights and of 4-bit compute; bfloat16 on a GPU, float32 on CPU when None.
    local_files_only: None follows HF_HUB_OFFLINE as set when this function is called.
    """
    import torch

    quantization = _check_quantization(quantization)
    folder = Path(model_id_or_path).expanduser()
    if folder.is_dir():
        model_id_or_path, revision = str(folder), None
        if not (folder / "config.json").is_file():
            raise LoadError(f"model folder {folder} has no config.json: is it a saved model "
                            "(save_pretrained, or a downloaded hub snapshot)?")
    elif str(model_id_or_path).startswith(("/", "./", "../", "~")):
        # Written as a path, not as a hub id ("org/name"): say so rather than ask the hub for it.
        raise LoadError(f"model folder {model_id_or_path} does not exist")
    elif revision is None and model_id_or_path in PINNED_REVISIONS:
        revision = PINNED_REVISIONS[model_id_or_path]
    if local_files_only is None:
        local_files_only = _offline()
    hub = dict(revision=revision, local_files_only=local_files_only)

    model_class = _model_class(model_id_or_path, hub, trust_remote_code)
    # bf16 only where the weights will sit on a GPU: not with a CPU device_map, nor with device_map=None
    # unquantized (transformers then keeps the model on the CPU; bitsandbytes would move it to the GPU).
    on_gpu = (torch.cuda.is_available() and device_map not in ("cpu", {"": "cpu"}, torch.device("cpu"))
              and (device_map is not None or quantization != "none"))
    dtype = _check_dtype(dtype) or (torch.bfloat16 if on_gpu else torch.float32)
    keep = getattr(model_class, "safegen_keep_modules", (getattr(model_class, "safegen_head_module", HEAD_MODULE),))
    quantization_config = _quantization_config(quantization, dtype, list(keep))

    from safetensors import SafetensorError
    from transformers import AutoTokenizer

    # A damaged folder (a config value of the wrong type, a truncated weights file, missing tokenizer
    # files) surfaces as whatever the parser at fault raises; name the folder and the part instead.
    damaged = (TypeError, ValueError, KeyError, SafetensorError)
    try:
        # device_map places the weights (on CPU-only machines "auto" resolves to the CPU); a quantized
        # model must never be moved with .to() afterwards.
        model = model_class.from_pretrained(
            model_id_or_path, quantization_config=quantization_config, device_map=device_map, dtype=dtype,
            trust_remote_code=trust_remote_code, **hub)
    except OSError as err:
        raise _not_found(model_id_or_path, revision, err) from None
    except damaged as err:
        raise LoadError(f"the model in {model_id_or_path} cannot be built from its config.json and weights "
                        f"({type(err).__name__}: {_first_line(err)})") from None
    try:
        # A folder with weights and no tokenizer at all (one written by a modeling script, say) still
        # gives a usable model: the sampler works on token ids. Callers that need text ask for it
        # with require_tokenizer. A folder with some tokenizer files is loaded, and its damage reported.
        tokenizer = None
        has_tokenizer = not folder.is_dir() or any((folder / name).is_file() for name in TOKENIZER_FILES)
        if model.config.model_type == "mdlm":
            tokenizer = _mdlm_tokenizer(model.config, model_id_or_path, folder.is_dir(), has_tokenizer,
                                        local_files_only)
        elif has_tokenizer:
            # The model's config, not AutoConfig's reading of config.json: model_type "llada" names the
            # dense config class, which LLaDA-MoE's fields do not fit.
            tokenizer = AutoTokenizer.from_pretrained(model_id_or_path, trust_remote_code=trust_remote_code,
                                                      config=model.config, **hub)
    except OSError as err:
        raise _not_found(model_id_or_path, revision, err) from None
    except damaged as err:
        raise LoadError(f"the tokenizer of {model_id_or_path} cannot be loaded: are its tokenizer files "
                        f"there? ({type(err).__name__}: {_first_line(err)})") from None
    model.eval()
    profile = profile_from(model.config, tokenizer)
    wrong = [f"{k}={v!r}" for k, v in vars(profile).items()
             if k.endswith("_id") and v is not None and (not isinstance(v, int) or isinstance(v, bool))]
    if wrong:
        raise LoadError(f"{model_id_or_path}: the special token ids must be integers, got {', '.join(wrong)} "
                        "(from config.json or the tokenizer)")
    return model, tokenizer, profile


def _mdlm_tokenizer(config, model_id_or_path: str, is_folder: bool, has_tokenizer: bool, local_files_only: bool):
    """An MDLM's tokenizer: its folder's, else GPT-2's plus the mask (MDLM-OWT's hub repository has none).
    For a local folder without tokenizer files, GPT-2's is read from the local Hugging Face cache only
    (a folder never waits on the network); when it is not there, or the vocabulary is not GPT-2's plus
    one, the model loads without a tokenizer, like any folder without one."""
    from .mdlm import GPT2_REVISION, GPT2_TOKENIZER, GPT2_VOCAB_SIZE, mdlm_tokenizer

    if is_folder and has_tokenizer:
        return mdlm_tokenizer(config, model_id_or_path)
    if is_folder and config.vocab_size != GPT2_VOCAB_SIZE + 1:
        return None
    try:
        return mdlm_tokenizer(config, None, local_files_only or is_folder)
    except OSError as err:
        if is_folder:
            return None
        raise LoadError(
            f"MDLM uses GPT-2's tokenizer ({GPT2_TOKENIZER} at revision {GPT2_REVISION}), which is not in the "
            f"local Hugging Face cache and could not be downloaded ({_first_line(err)}): download it where the "
            f"hub is reachable (huggingface-cli download {GPT2_TOKENIZER} --revision {GPT2_REVISION})") from None


def model_type_of(model_id_or_path: str, revision: str | None = None) -> str | None:
    """config.json's model_type (reading JSON only), or None when it cannot be read here: load_model
    then says why."""
    from transformers import PretrainedConfig

    folder = Path(model_id_or_path).expanduser()
    try:
        if folder.is_dir():
            return PretrainedConfig.get_config_dict(str(folder))[0].get("model_type")
        return PretrainedConfig.get_config_dict(model_id_or_path, revision=revision,
                                                local_files_only=_offline())[0].get("model_type")
    except (OSError, ValueError):
        return None


def require_tokenizer(tokenizer, model_id_or_path) -> None:
    """Text in and out needs the model's tokenizer; a folder saved without one is a LoadError here."""
    if tokenizer is None:
        raise LoadError(f"model folder {model_id_or_path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): "
                        "safegen needs the model's tokenizer to encode prompts and decode answers; save it "
                        "beside the weights (tokenizer.save_pretrained(folder))")


def _check_quantization(quantization) -> str:
    if quantization is None:
        return "none"
    if quantization not in QUANTIZATIONS:
        raise LoadError(f"quantization must be one of {', '.join(QUANTIZATIONS)} (or None), "
                         f"not {quantization!r}")
    return quantization


def _check_dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise LoadError(f"dtype must be a torch.dtype or its name (e.g. 'bfloat16'), not {dtype!r}")


def _offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; read it again so that setting it later
    # (a test, a notebook) still avoids a minute of connection retries.
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any((f or "").upper() in ("1", "ON", "YES", "TRUE") for f in flags)


def check_llada_architecture(config_dict: dict, model_id_or_path: str, trust_remote_code: bool = False) -> None:
    """model_type "llada" covers more than one architecture: LLaDA-MoE's config.json says "llada" too,
    with architectures ["LLaDAMoEModelLM"], which safegen.models.llada_moe implements (the dense class
    built from an MoE's config would be another, far larger model). Refuse any other architecture,
    unless the repository's own code is trusted and named."""
    architectures = config_dict.get("architectures") or ["LLaDAModelLM"]
    if architectures in (["LLaDAModelLM"], ["LLaDAMoEModelLM"]):  # both implemented natively
        return
    if trust_remote_code and config_dict.get("auto_map", {}).get("AutoModel"):
        return
    moe = any("moe" in a.lower() for a in architectures)
    raise LoadError(
        f"config.json of {model_id_or_path} has model_type 'llada' but architectures {architectures}"
        + (" (LLaDA-MoE, a mixture of experts)" if moe else "")
        + ": safegen implements the dense LLaDA (LLaDAModelLM) natively, not this one, and building the dense "
        "model from its config would make another, larger model; run the repository's own code with "
        "--trust-remote-code (trust_remote_code=True) if you trust it")


def _model_class(model_id_or_path: str, hub: dict, trust_remote_code: bool):
    """The class whose from_pretrained loads the model: safegen's own for the model types it implements,
    AutoModel for those transformers knows, the repository's own code only with trust_remote_code.
    Refuses, before any code runs, a model whose class exists only as hub code that is not trusted."""
    from transformers import AutoModel, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        # Only the JSON: reading it executes nothing, whatever the repository holds.
        config_dict, _ = PretrainedConfig.get_config_dict(model_id_or_path, **hub)
    except OSError as err:
        raise _not_found(model_id_or_path, hub["revision"], err) from None
    except ValueError as err:
        raise LoadError(f"config.json of {model_id_or_path} cannot be read: {err}") from None
    model_type = config_dict.get("model_type")
    if not model_type:
        raise LoadError(f"config.json of {model_id_or_path} has no model_type")
    if model_type == "llada":
        check_llada_architecture(config_dict, model_id_or_path, trust_remote_code)
        if config_dict.get("architectures") == ["LLaDAMoEModelLM"]:
            from .llada_moe import LLaDAMoEModelLM

            return LLaDAMoEModelLM
        if trust_remote_code and config_dict.get("architectures", ["LLaDAModelLM"]) != ["LLaDAModelLM"]:
            from transformers.dynamic_module_utils import get_class_from_dynamic_module

            reference = config_dict.get("auto_map", {}).get("AutoModel")
            return get_class_from_dynamic_module(reference, model_id_or_path, **hub)
        # By class, not through AutoModel: LLaDA's own configuration_llada.py, once imported anywhere
        # in the process, registers "llada" with AutoConfig in place of safegen's config.
        from .llada import LLaDAModelLM

        return LLaDAModelLM
    if model_type == "Dream":  # the same for Dream's configuration_dream.py
        from .dream import DreamModel

        return DreamModel
    if model_type == "mdlm":  # the same for MDLM's configuration_mdlm.py
        from .mdlm import MDLMModel

        return MDLMModel
    if model_type in CONFIG_MAPPING:
        return AutoModel
    if trust_remote_code and "AutoModel" in config_dict.get("auto_map", {}):
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return _completed(get_class_from_dynamic_module(config_dict["auto_map"]["AutoModel"], model_id_or_path,
                                                        **hub))
    if trust_remote_code:
        return AutoModel
    if "auto_map" in config_dict:
        at = f" at revision {hub['revision']}" if hub["revision"] else ""
        raise LoadError(
            f"model_type {model_type!r} is not part of transformers: {model_id_or_path} ships its own model "
            f"code. Loading it runs that code from the repository{at}; if you trust it, pass "
            "trust_remote_code=True (command line: --trust-remote-code).")
    raise LoadError(f"model_type {model_type!r} of {model_id_or_path} is unknown to transformers and the "
                    "repository has no model code (no auto_map in config.json)")


def _completed(model_class):
    """`model_class`, or a subclass that finishes the initialisation transformers 5 expects of it.

    Model code written for transformers 4 may never call post_init() (LLaDA's does not), leaving out
    the attributes from_pretrained reads (all_tied_weights_keys, ...), and may define tie_weights()
    without the arguments transformers 5 passes. The subclass calls post_init() where the model's
    __init__ did not, and calls such a tie_weights() without arguments.
    """
    params = inspect.signature(model_class.tie_weights).parameters.values()
    old_tie_weights = not any(p.kind is p.VAR_KEYWORD or p.name == "missing_keys" for p in params)

    class Completed(model_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if not hasattr(self, "all_tied_weights_keys"):
                self.post_init()

        if old_tie_weights:
            def tie_weights(self, *args, **kwargs):
                return model_class.tie_weights(self)

    Completed.__name__, Completed.__qualname__ = model_class.__name__, model_class.__qualname__
    Completed.__module__ = model_class.__module__
    return Completed


def _quantization_config(quantization: str, compute_dtype: torch.dtype, keep=(HEAD_MODULE,)):
    """bitsandbytes' config; `keep`: the modules left unquantized (the head; an MoE's routers)."""
    keep = [keep] if isinstance(keep, str) else list(keep)
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise LoadError(f"quantization={quantization!r} needs bitsandbytes, which cannot be imported ({err}): "
                        "pip install bitsandbytes, or load with quantization='none'") from None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=keep)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _not_found(model_id_or_path: str, revision: str | None, err: Exception) -> LoadError:
    reason = _first_line(err)
    if Path(model_id_or_path).expanduser().is_dir():
        return LoadError(f"model folder {model_id_or_path} cannot be loaded: {reason}")
    at = f" at revision {revision}" if revision else ""
    return LoadError(
        f"{model_id_or_path}{at} is not in the local Hugging Face cache and could not be downloaded "
        f"({reason}). Download it where the hub is reachable (huggingface-cli download {model_id_or_path}"
        f"{' --revision ' + revision if revision else ''}), or point at a local folder holding the model: "
        "--model /path/to/folder on the command line, load_model('/path/to/folder') in Python.")
