import os
from pathlib import Path

import pytest

# Tests never reach a model hub: everything they load is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RTP_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "rtp"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random LLaDA-shaped model with an English word tokenizer, written once per session."""
    from safegen.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def tiny_generator_parts(tiny_model_dir):
    from safegen.models.loading import load_model

    return load_model(str(tiny_model_dir), quantization="none")
