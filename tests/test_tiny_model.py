"""The tiny LLaDA-shaped model and its offline tokenizer: interface, module names, masking, template."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safegen.models.llada import LLaDAConfig, LLaDAModelLM  # importing it registers LLaDA with the Auto classes
from safegen.models.tiny import (BOS, EOS, EOT, HEADER_END, HEADER_START, MASK, SPECIAL_TOKENS, TINY_VOCAB_FILE, UNK,
                          build_tiny_tokenizer, write_tiny_model)
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer

RTP_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "rtp"
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def model(tiny_dir):
    return AutoModel.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)


def test_write_is_seeded_and_auto_classes_load_it(tmp_path, tiny_dir, model):
    # The same seed writes the same weights; another seed other weights.
    weights = (tiny_dir / "model.safetensors").read_bytes()
    assert (write_tiny_model(tmp_path / "again") / "model.safetensors").read_bytes() == weights
    assert (write_tiny_model(tmp_path / "other", seed=1) / "model.safetensors").read_bytes() != weights
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in tiny_dir.iterdir()}
    # One architecture: the tiny model is LLaDA's class in a small configuration.
    assert type(model) is LLaDAModelLM
    assert type(AutoConfig.from_pretrained(tiny_dir)) is LLaDAConfig
    assert type(AutoModelForMaskedLM.from_pretrained(tiny_dir)) is LLaDAModelLM


def test_config_has_llada_fields_and_tokenizer_ids(tiny_dir, tokenizer):
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["model_type"] == "llada"
    for field in ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size", "embedding_size",
                  "max_sequence_length", "rope_theta"):
        assert field in config
    vocab = tokenizer.get_vocab()
    assert config["vocab_size"] == len(tokenizer)
    assert config["embedding_size"] % 64 == 0 and config["embedding_size"] >= config["vocab_size"]
    assert config["mask_token_id"] == vocab[MASK]
    assert config["eos_token_id"] == config["pad_token_id"] == vocab[EOS]
    assert config["bos_token_id"] == vocab[BOS] and config["eot_token_id"] == vocab[EOT]
    assert config["tie_word_embeddings"] is False


def test_module_names_are_llada_s(model):
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    n_layers = model.config.n_layers
    expected = {f"model.transformer.blocks.{i}.{p}" for i in range(n_layers) for p in BLOCK_LINEARS}
    assert linears == expected | {"model.transformer.ff_out"}
    names = dict(model.named_modules())
    assert isinstance(names["model.transformer.wte"], torch.nn.Embedding)
    for norm in ("model.transformer.ln_f", "model.transformer.blocks.0.attn_norm", "model.transformer.blocks.0.ff_norm"):
        assert norm in names
    # Untied head.
    assert model.model.transformer.ff_out.weight.data_ptr() != model.model.transformer.wte.weight.data_ptr()


def test_config_overrides_and_their_errors(tmp_path):
    folder = write_tiny_model(tmp_path / "wide", d_model=32, n_layers=1, n_heads=2, n_kv_heads=1)
    small = AutoModel.from_pretrained(folder)
    assert (small.config.d_model, small.config.n_layers, small.config.n_kv_heads) == (32, 1, 1)
    assert small(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, small.config.embedding_size)
    with pytest.raises(ValueError, match="d_modle"):
        write_tiny_model(tmp_path / "typo", d_modle=32)
    with pytest.raises(ValueError, match="mask_token_id"):
        write_tiny_model(tmp_path / "ids", mask_token_id=3)
    with pytest.raises(ValueError, match="n_heads"):
        LLaDAConfig(d_model=64, n_heads=3)


def test_logits_shape_and_not_trivial(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = model(ids).logits
    assert logits.shape == (2, 9, model.config.embedding_size)
    assert torch.isfinite(logits).all()
    # A random model must still discriminate: logits spread out and argmaxes differ between positions.
    assert logits.std() > 0.5
    assert logits.argmax(-1).unique().numel() > 5


def test_attention_is_bidirectional(model):
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    changed = ids.clone()
    changed[0, -1] = 100
    # A change at the last position reaches the first one: there is no causal mask.
    assert not torch.allclose(model(ids).logits[0, 0], model(changed).logits[0, 0])


def test_left_padding_with_mask_leaves_real_rows_unchanged(model):
    pad = model.config.pad_token_id
    short = torch.tensor([[11, 12, 13, 14]])
    long = torch.tensor([[21, 22, 23, 24, 25, 26, 27]])
    batch = torch.cat([torch.cat([torch.full((1, 3), pad), short], 1), long])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits
        alone_short, alone_long = model(short).logits, model(long).logits
        unmasked = model(batch).logits
    torch.testing.assert_close(padded[0, 3:], alone_short[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[1], alone_long[0], atol=1e-5, rtol=1e-5)
    # Without the mask the padding leaks into the real rows, so the check above is not vacuous.
    assert (unmasked[0, 3:] - alone_short[0]).abs().max() > 1e-3


def test_generate_points_to_the_sampler(model):
    with pytest.raises(NotImplementedError, match="sampler"):
        model.generate(torch.tensor([[1, 2]]))


def test_special_tokens_are_single_distinct_ids(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    unk = tokenizer.convert_tokens_to_ids(UNK)
    for token, token_id in zip(SPECIAL_TOKENS, ids):
        assert tokenizer(token, add_special_tokens=False).input_ids == [token_id]
        assert token == UNK or token_id != unk
    # Glued to words, they are still split out whole.
    glued = tokenizer(f"{MASK}{MASK}hello{EOT}", add_special_tokens=False).input_ids
    assert glued == [ids[SPECIAL_TOKENS.index(MASK)]] * 2 + [tokenizer.convert_tokens_to_ids("hello"),
                                                             ids[SPECIAL_TOKENS.index(EOT)]]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id != tokenizer.convert_tokens_to_ids(MASK)


def test_chat_template_matches_llada_instruct(tokenizer):
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": " Hello there! "}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (f"{BOS}{HEADER_START}system{HEADER_END}\n\nBe kind.{EOT}"
                    f"{HEADER_START}user{HEADER_END}\n\nHello there!{EOT}"
                    f"{HEADER_START}assistant{HEADER_END}\n\n")
    bare = tokenizer.apply_chat_template(messages[1:], tokenize=False, add_generation_prompt=False)
    assert bare == f"{BOS}{HEADER_START}user{HEADER_END}\n\nHello there!{EOT}"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False).input_ids)
    assert tokens[:4] == [BOS, HEADER_START, "system", HEADER_END]
    assert tokens[-3:] == [HEADER_START, "assistant", HEADER_END]


def test_real_words_round_trip(tokenizer):
    text = "you don't know what you're doing, you stupid idiot. the cat sat on the floor!"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer("Hello World", add_special_tokens=False).input_ids) == "hello world"
    with_special = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    assert tokenizer.decode(with_special, skip_special_tokens=True) == text


def test_vocabulary_holds_the_toxic_words_the_demo_needs(tokenizer):
    vocab = tokenizer.get_vocab()
    for word in ("fuck", "shit", "bitch", "idiot", "stupid", "kill", "please", "thank"):
        assert word in vocab


def test_vocab_file_is_reproducible_from_rtp(tmp_path):
    if not RTP_DIR.is_dir():
        pytest.skip(f"{RTP_DIR} not found: the RTP samples are needed to rebuild the vocabulary")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import build_tiny_vocab
    finally:
        sys.path.pop(0)
    out = tmp_path / "vocab.txt"
    assert build_tiny_vocab.main([str(RTP_DIR), "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == TINY_VOCAB_FILE.read_text(encoding="utf-8")


def test_missing_vocab_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        build_tiny_tokenizer(tmp_path / "nowhere.txt")


def test_cli_writes_a_loadable_model(tmp_path):
    folder = tmp_path / "cli model"
    done = subprocess.run([sys.executable, "-m", "safegen", "tiny-model", str(folder), "--seed", "4"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert str(folder) in done.stdout
    loaded = AutoModel.from_pretrained(folder)
    assert loaded(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, loaded.config.embedding_size)
