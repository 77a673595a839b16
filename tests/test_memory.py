"""safegen.models.memory: the estimate from a config against what bitsandbytes actually stores, and the command."""
import json

import pytest
import torch

from safegen.cli import main
from safegen.models.llada import LLaDAConfig
from safegen.models.loading import HEAD_MODULE, load_model
from safegen.models.memory import estimate, meta_model, weight_bytes
from safegen.models.tiny import write_tiny_model

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def stored_bytes(model) -> int:
    """Bytes of every tensor that holds the loaded weights, quantization state included."""
    total = 0
    for module in model.modules():
        for p in module.parameters(recurse=False):
            total += p.numel() * p.element_size()
            state = getattr(p, "quant_state", None)
            if state is not None:  # NF4: per-block scales, their own scales and the offset
                total += state.absmax.numel() * state.absmax.element_size()
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
                total += state.offset.numel() * state.offset.element_size()
            if getattr(p, "SCB", None) is not None:  # LLM.int8: one scale per output row
                total += p.SCB.numel() * p.SCB.element_size()
    return total


@pytest.mark.parametrize("quantization", ["4bit", "8bit", "none"])
def test_weight_bytes_match_what_loading_stores(tiny_dir, quantization):
    model, _, _ = load_model(str(tiny_dir), quantization=quantization, device_map="cpu")
    assert type(dict(model.named_modules())[HEAD_MODULE]) is torch.nn.Linear
    # On the CPU the unquantized weights are float32: 4 bytes each.
    assert weight_bytes(meta_model(model.config), quantization, kept_bytes=4) == stored_bytes(model)


def test_8b_estimate_counts_the_meta_model():
    config = LLaDAConfig()
    result = estimate(config, seq_len=128)
    model = meta_model(config)
    assert all(p.device.type == "meta" for p in model.parameters())
    assert result.parameters == sum(p.numel() for p in model.parameters()) == 8_015_581_184
    assert result.weight_bytes["bf16"] == 2 * result.parameters
    # The blocks' linears are 87% of the weights; the 16-bit embedding and head keep NF4 above 5 GB.
    assert result.quantized_parameters == 32 * (4 * 4096 ** 2 + 3 * 4096 * 12288)
    assert 5.5e9 < result.weight_bytes["4bit"] < result.weight_bytes["8bit"] < 9.2e9
    assert result.activation_bytes_per_row == 128 * (126464 + 2 * 4096 + 3 * 12288) * 2


def test_memory_command(tiny_dir, tmp_path, capsys):
    assert main(["memory", "--model", str(tiny_dir), "--seq-len", "64", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    model, _, _ = load_model(str(tiny_dir), quantization="none")
    assert shown["parameters"] == sum(p.numel() for p in model.parameters())
    assert shown["seq_len"] == 64
    capsys.readouterr()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["memory", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'bert'" in err
