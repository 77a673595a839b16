"""load_model on the tiny model (full precision, 4-bit, 8-bit, on CPU), profile_from, and the errors users meet."""
import json
import shutil
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from safegen.models.llada import LLaDAModelLM
from safegen.models.loading import DEFAULT_MODEL, DEFAULT_REVISION, HEAD_MODULE, LoadError, load_model
from safegen.models.family import LLADA_IDS, profile_from
from safegen.models.tiny import BOS, EOS, EOT, MASK, write_tiny_model
from transformers import AutoModel, BitsAndBytesConfig, PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def batch():
    ids = torch.randint(0, 4000, (2, 12), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


@pytest.fixture(scope="module")
def full_logits(tiny_dir, batch):
    model, _, _ = load_model(str(tiny_dir), quantization="none", device_map="cpu")
    with torch.no_grad():
        return model(*batch).logits


def block_linears(model):
    return {name: m for name, m in model.named_modules()
            if name.startswith("model.transformer.blocks.") and isinstance(m, torch.nn.Linear)}


def test_default_revision_is_a_pinned_commit():
    assert DEFAULT_MODEL == "GSAI-ML/LLaDA-8B-Instruct"
    assert DEFAULT_REVISION is None or (len(DEFAULT_REVISION) == 40 and int(DEFAULT_REVISION, 16) >= 0)


def test_default_placement_is_the_gpu_in_bf16_else_the_cpu_in_float32(tiny_dir):
    model, _, _ = load_model(str(tiny_dir), quantization="none")
    expected = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {expected}


@pytest.mark.parametrize("quantization", ["none", None])
def test_full_precision_load(tiny_dir, batch, full_logits, quantization):
    model, tokenizer, profile = load_model(str(tiny_dir), quantization=quantization, device_map="cpu")
    assert not model.training
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in model.modules())
    with torch.no_grad():
        logits = model(*batch).logits
    # The same weights as AutoModel gives, untouched by loading.
    reference = AutoModel.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(*batch).logits)
    vocab = tokenizer.get_vocab()
    assert (profile.mask_id, profile.eos_id, profile.pad_id, profile.bos_id, profile.eot_id) == (
        vocab[MASK], vocab[EOS], vocab[EOS], vocab[BOS], vocab[EOT])
    assert profile.chat_template and not profile.shift_logits


def correlation(a, b):
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()


@pytest.mark.parametrize("quantization, layer_type", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantized_load_keeps_the_head_and_quantizes_every_block_linear(tiny_dir, batch, full_logits,
                                                                         quantization, layer_type):
    model, _, _ = load_model(str(tiny_dir), quantization=quantization, device_map="auto")
    linears = block_linears(model)
    assert len(linears) == 7 * model.config.n_layers
    quantized = getattr(bnb.nn, layer_type)
    # The MLP down-projections share the head's short name ff_out; they must be quantized all the same.
    assert all(isinstance(m, quantized) for m in linears.values()), {n: type(m) for n, m in linears.items()}
    assert any(name.endswith(".ff_out") for name in linears)
    # device_map="auto" uses the GPU when there is one (with bf16 compute), else the CPU (float32).
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    head = dict(model.named_modules())[HEAD_MODULE]
    assert type(head) is torch.nn.Linear and head.weight.dtype == dtype
    assert {p.device.type for p in model.parameters()} == {device}
    with torch.no_grad():
        logits = model(*(t.to(device) for t in batch)).logits
    assert logits.shape == (2, 12, model.config.embedding_size)
    assert torch.isfinite(logits).all()
    assert correlation(logits.float().cpu(), full_logits) > 0.9


def test_short_skip_name_would_leave_the_mlp_unquantized(tiny_dir):
    # Why loading.py names the head by its full path: transformers matches skip names as suffixes.
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["ff_out"])
    model = AutoModel.from_pretrained(tiny_dir, quantization_config=config, device_map="cpu", dtype=torch.float32)
    mlp_out = [m for name, m in block_linears(model).items() if name.endswith(".ff_out")]
    assert mlp_out and all(type(m) is torch.nn.Linear for m in mlp_out)


def test_bad_arguments_are_named(tiny_dir):
    with pytest.raises(ValueError, match="quantization.*'int4'"):
        load_model(str(tiny_dir), quantization="int4")
    with pytest.raises(ValueError, match="dtype"):
        load_model(str(tiny_dir), quantization="none", dtype="float33")


def test_uncached_hub_id_offline_points_at_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(LoadError) as caught:
        load_model("safegen-tests/no-such-model", quantization="none")
    assert time.perf_counter() - start < 10  # no connection retries
    message = str(caught.value)
    assert "not in the local Hugging Face cache" in message
    assert "--model /path/to/folder" in message and "load_model('/path/to/folder')" in message
    # Raised `from None`: the user sees one error, not the hub's chained tracebacks.
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_missing_folder_and_folder_without_config(tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        load_model(str(tmp_path / "nothing-here"), quantization="none")
    with pytest.raises(LoadError, match="config.json"):
        load_model(str(tmp_path), quantization="none")


def test_folder_without_any_tokenizer_gives_the_model_and_no_tokenizer(tiny_dir, tmp_path, batch, full_logits):
    """Weights saved by a modeling script alone: the sampler can run on ids; text needs the tokenizer."""
    import shutil

    from safegen.models.loading import TOKENIZER_FILES, require_tokenizer

    folder = tmp_path / "weights-only"
    shutil.copytree(tiny_dir, folder)
    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    model, tokenizer, profile = load_model(str(folder), quantization="none", device_map="cpu")
    assert tokenizer is None and profile.mask_id == model.config.mask_token_id
    with torch.no_grad():
        torch.testing.assert_close(model(*batch).logits, full_logits)
    with pytest.raises(LoadError, match="has no tokenizer files"):
        require_tokenizer(tokenizer, str(folder))


def test_remote_code_is_refused_without_trust(tiny_dir, tmp_path):
    folder = tmp_path / "remote-only"
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="safegen-test-remote-only", auto_map={"AutoModel": "modeling_x.XModel"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match="trust_remote_code=True") as caught:
        load_model(str(folder), quantization="none")
    assert "--trust-remote-code" in str(caught.value)


REMOTE_BOMB = "raise RuntimeError('the repository code was imported')\n"


class ForeignLLaDAConfig(PretrainedConfig):
    model_type = "llada"


@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_llada_hub_layout_loads_with_safegen_s_class_and_never_imports_the_folder_code(
        tiny_dir, tmp_path, batch, full_logits, trust_remote_code, monkeypatch):
    # LLaDA's own configuration_llada.py registers "llada" with AutoConfig when imported (by earlier
    # remote-code use in the same process, say): safegen's class must win all the same.
    monkeypatch.setitem(CONFIG_MAPPING._extra_content, "llada", ForeignLLaDAConfig)
    # LLaDA's hub layout: config.json's auto_map names the repository's own files, here files that
    # raise when imported.
    folder = tmp_path / "llada-hub-layout"
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["LLaDAModelLM"], auto_map={
        "AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"})
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("configuration_llada.py", "modeling_llada.py"):
        (folder / name).write_text(REMOTE_BOMB)
    model, _, profile = load_model(str(folder), quantization="none", device_map="cpu",
                                   trust_remote_code=trust_remote_code)
    assert type(model) is LLaDAModelLM
    assert not any("modeling_llada" in name or "configuration_llada" in name for name in sys.modules)
    with torch.no_grad():
        torch.testing.assert_close(model(*batch).logits, full_logits)
    assert profile.mask_id == config["mask_token_id"]


REMOTE_CONFIG = """
from transformers import PretrainedConfig

class OldStyleConfig(PretrainedConfig):
    model_type = "safegen-test-old-style"

    def __init__(self, width=8, **kwargs):
        self.width = width
        super().__init__(**kwargs)
"""

# Written for transformers 4, like LLaDA's code: no post_init() in __init__, tie_weights() without arguments.
REMOTE_MODEL = """
import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput
from .configuration_old_style import OldStyleConfig

class OldStyleModel(PreTrainedModel):
    config_class = OldStyleConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.width)
        self.head = torch.nn.Linear(config.width, config.vocab_size, bias=False)

    def tie_weights(self):
        pass

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return MaskedLMOutput(logits=self.head(self.embed(input_ids)))
"""


def test_remote_code_without_post_init_loads_with_trust(tiny_dir, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "old-style"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / name, folder / name)
    (folder / "configuration_old_style.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_old_style.py").write_text(REMOTE_MODEL)
    tiny = json.loads((tiny_dir / "config.json").read_text())
    vocab = tiny["embedding_size"]
    (folder / "config.json").write_text(json.dumps(dict(
        model_type="safegen-test-old-style", width=8, vocab_size=vocab, mask_token_id=tiny["mask_token_id"],
        auto_map={"AutoConfig": "configuration_old_style.OldStyleConfig",
                  "AutoModel": "modeling_old_style.OldStyleModel"})))
    weights = {"embed.weight": torch.randn(vocab, 8), "head.weight": torch.randn(vocab, 8)}
    save_file(weights, folder / "model.safetensors")
    model, _, profile = load_model(str(folder), quantization="none", device_map="cpu", trust_remote_code=True)
    assert type(model).__name__ == "OldStyleModel"
    torch.testing.assert_close(model.head.weight, weights["head.weight"])
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(model(ids).logits, weights["embed.weight"][ids] @ weights["head.weight"].T)
    assert profile.mask_id == tiny["mask_token_id"]


def test_missing_bitsandbytes_says_how_to_fix(tiny_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    for quantization in ("4bit", "8bit"):
        with pytest.raises(LoadError, match="pip install bitsandbytes.*quantization='none'"):
            load_model(str(tiny_dir), quantization=quantization)
    model, _, _ = load_model(str(tiny_dir), quantization="none")  # still usable without it
    assert type(dict(model.named_modules())[HEAD_MODULE]) is torch.nn.Linear


class FakeTokenizer:
    def __init__(self, vocab, chat_template=None, **ids):
        self._vocab = vocab
        self.chat_template = chat_template
        for name in ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id"):
            setattr(self, name, ids.get(name))

    def get_vocab(self):
        return self._vocab


def test_profile_prefers_config_then_tokenizer_then_llada_ids():
    tokenizer = FakeTokenizer({"<|mdm_mask|>": 7, "<|eot_id|>": 8}, eos_token_id=2, pad_token_id=3)
    config = SimpleNamespace(model_type="other", mask_token_id=None, eos_token_id=[5, 6], eot_token_id=None)
    profile = profile_from(config, tokenizer)
    assert (profile.mask_id, profile.eos_id, profile.eot_id, profile.pad_id, profile.bos_id) == (7, 5, 8, 3, None)
    assert not profile.chat_template
    # LLaDA's config names the mask even though its tokenizer does not declare it.
    llada = profile_from(SimpleNamespace(model_type="llada", mask_token_id=126336), FakeTokenizer({}))
    assert llada.mask_id == 126336 and llada.eot_id == LLADA_IDS["eot_id"] and llada.pad_id == LLADA_IDS["pad_id"]
    assert profile_from(SimpleNamespace(model_type="dream", mask_token_id=1), None).shift_logits


def test_profile_without_any_mask_is_an_error():
    with pytest.raises(ValueError, match="mask_token_id"):
        profile_from(SimpleNamespace(model_type="bert-like"), FakeTokenizer({"[MASK]": 4}))
    with pytest.raises(ValueError, match="pad_id"):
        profile_from(SimpleNamespace(model_type="x", mask_token_id=3, pad_token_id=3), None)


def test_another_architecture_under_model_type_llada_is_refused_not_built_dense(tiny_dir, tmp_path, capsys):
    """model_type "llada" names the dense LLaDA and LLaDA-MoE (architectures ["LLaDAMoEModelLM"], its own
    class: tests/test_llada_moe.py); any other architecture under it (a later MoE, say) is a LoadError
    naming it, for loading and memory estimates alike, never a dense LLaDA built from its sizes."""
    from safegen.cli import main

    folder = tmp_path / "other"
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["LLaDA2MoeModelLM"], num_experts=64, num_experts_per_tok=8)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match=r"LLaDA2MoeModelLM.*mixture of experts.*--trust-remote-code"):
        load_model(str(folder), quantization="none")
    assert main(["memory", "--model", str(folder)]) == 2
    assert "LLaDA2MoeModelLM" in capsys.readouterr().err
    # The dense architecture named explicitly still loads.
    config["architectures"] = ["LLaDAModelLM"]
    (folder / "config.json").write_text(json.dumps(config))
    model, _, _ = load_model(str(folder), quantization="none")
    assert isinstance(model, LLaDAModelLM)
