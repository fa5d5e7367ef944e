"""Loading switches sliding-window attention off, so every token sees the whole (extended) context.

Each model here has an 8-token window and 2 layers, so without our loading a token at position 30 cannot be
reached from token 0 (the raw transformers model is the control); with it, it is. Gemma 2's alternating local
layers are part of its architecture and stay.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    MinistralConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
    Starcoder2Config,
)

from models.export import extended_config, save_extended_model
from models.loading import full_attention_config, load_model
from models.rope import RopeFactors

WINDOW = 8
POSITION = 30  # past the receptive field of two 8-token sliding layers (2 x 7 tokens back)
TINY = {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 64,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def mistral() -> MistralConfig:
    return MistralConfig(**TINY, sliding_window=WINDOW)


def qwen2() -> Qwen2Config:
    return Qwen2Config(**TINY, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=0)


def save_tiny_model(config, directory: Path) -> Path:
    """``config`` with seeded random weights and a one-word tokenizer (``load_model`` loads one too)."""
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer = Tokenizer(WordLevel({"<unk>": 0}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(directory)
    return directory


def logits_at(model, position: int, first_token: int) -> torch.Tensor:
    ids = torch.arange(3, 3 + position + 1).unsqueeze(0)
    ids[0, 0] = first_token
    with torch.no_grad():
        return model(ids).logits[0, position]


def sees_token_zero(model) -> bool:
    return not torch.allclose(logits_at(model, POSITION, 5), logits_at(model, POSITION, 6))


@pytest.mark.parametrize("make_config", [mistral, qwen2], ids=["mistral", "qwen2-use_sliding_window"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_loaded_model_attends_past_the_window(make_config, attn, tmp_path, caplog):
    directory = save_tiny_model(make_config(), tmp_path / "model")
    raw = AutoModelForCausalLM.from_pretrained(directory, attn_implementation=attn).eval()
    assert not sees_token_zero(raw)  # control: transformers as shipped keeps the window
    with caplog.at_level(logging.INFO, logger="models.loading"):
        model, _ = load_model(str(directory), dtype="float32", device="cpu", attn_implementation=attn)
    assert sees_token_zero(model)
    assert model.config.sliding_window is None
    # what flash-attention reads: Qwen2's attention layers copy the window when built
    assert all(getattr(module, "sliding_window", None) is None for module in model.modules())
    assert "sliding_attention" not in (getattr(model.config, "layer_types", None) or [])
    message = next(record.getMessage() for record in caplog.records if "sliding-window" in record.getMessage())
    assert str(directory) in message and f"{WINDOW} tokens" in message


def test_exported_model_has_no_sliding_window(tmp_path):
    model, tokenizer = load_model(str(save_tiny_model(mistral(), tmp_path / "model")), dtype="float32",
                                  device="cpu")
    factors = RopeFactors((1.0, 1.0, 1.5, 2.0, 2.0, 2.0, 2.0, 2.0), original_length=32, target_length=64)
    save_extended_model(model, tokenizer, tmp_path / "extended", factors)
    assert json.loads((tmp_path / "extended" / "config.json").read_text())["sliding_window"] is None
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "extended").eval()
    assert stock.config.sliding_window is None  # not Mistral's default 4096
    assert sees_token_zero(stock)


def test_extended_config_drops_the_window_of_a_model_loaded_elsewhere():
    config = mistral()
    factors = RopeFactors((2.0,) * 8, original_length=32, target_length=64)
    assert extended_config(config, factors).sliding_window is None
    assert config.sliding_window == WINDOW  # the model's own config is left alone


@pytest.mark.parametrize("config, changed", [
    (MistralConfig(sliding_window=4096), ["sliding_window"]),
    (MixtralConfig(sliding_window=4096), ["sliding_window"]),
    (Phi3Config(sliding_window=2047), ["sliding_window"]),
    (Starcoder2Config(sliding_window=4096), ["sliding_window"]),
    (Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=4096, max_window_layers=2),
     ["sliding_window", "use_sliding_window", "layer_types"]),
    (Qwen3Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=4096, max_window_layers=0),
     ["sliding_window", "use_sliding_window", "layer_types"]),
    (MinistralConfig(num_hidden_layers=4), ["sliding_window", "layer_types"]),
    (Qwen2Config(num_hidden_layers=4, sliding_window=131072), []),  # use_sliding_window is off: no window
    (MistralConfig(sliding_window=None), []),
    (Gemma2Config(num_hidden_layers=4), []),  # alternating local/global layers by design
], ids=lambda value: type(value).__name__ if not isinstance(value, list) else str(len(value)))
def test_full_attention_config(config, changed):
    assert full_attention_config(config) == changed
    if changed:
        assert config.sliding_window is None
        assert "sliding_attention" not in (getattr(config, "layer_types", None) or [])
        assert not getattr(config, "use_sliding_window", False)


def test_gemma2_keeps_its_local_layers_with_a_warning(tmp_path, caplog):
    config = Gemma2Config(**TINY, sliding_window=WINDOW)
    directory = save_tiny_model(config, tmp_path / "model")
    with caplog.at_level(logging.WARNING, logger="models.loading"):
        model, _ = load_model(str(directory), dtype="float32", device="cpu", attn_implementation="eager")
    assert model.config.sliding_window == WINDOW
    assert "sliding_attention" in model.config.layer_types
    assert any("keeps its 8-token sliding window" in record.getMessage() for record in caplog.records)
