"""Session fixtures: the embedded default model (converted once) and its HF oracle."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def default_model_path():
    from shared.model_provisioning import resolve_model

    return resolve_model().path


@pytest.fixture(scope="session")
def hf_base(default_model_path):
    """The HF transformers model on the same weights, float32, eval mode: the oracle."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)


@pytest.fixture
def nats_server(tmp_path):
    """A fresh embedded NATS server (JetStream, credentials, free port) for one test; `.url` to connect."""
    from shared.nats_server import EmbeddedNatsServer

    with EmbeddedNatsServer(tmp_path / "nats", port=0) as server:
        yield server
