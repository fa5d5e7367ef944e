"""Shared fixtures: a tiny random llama for fast tests, the real embedded model where behaviour must be real."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY_WINDOW = 64


def tiny_llama_config(**rope_parameters) -> LlamaConfig:
    """A 2-layer llama with head_dim 16 (8 rotary pairs) and a 64-token window."""
    return LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=TINY_WINDOW,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, **rope_parameters},
        attn_implementation="eager", tie_word_embeddings=False,
    )


def tiny_llama(**rope_parameters) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(**rope_parameters)).eval()


@pytest.fixture
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def input_ids() -> torch.Tensor:
    """Longer than the tiny window, so rescaling matters."""
    return torch.randint(0, 128, (1, 3 * TINY_WINDOW), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def real_model():
    """The embedded SmolLM2-135M (fetched into the cache by `make test`'s set-up)."""
    from models.loading import load_model

    return load_model("smollm2-135m", dtype="float32")
