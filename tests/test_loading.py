"""Loading: the embedded default is a real trained model; bad ids and paths fail clearly."""

from __future__ import annotations

import pytest
import torch

from models import assets
from models.loading import ModelLoadError, cpu_supports_bf16, load_model, pick_dtype
from objectives.data import load_windows
from objectives.perplexity import perplexity


def test_hub_id_that_cannot_be_reached_says_how_to_pass_a_local_path():
    with pytest.raises(ModelLoadError, match="--model DIR") as raised:
        load_model("longrope-hpo-tests/no-such-model", dtype="float32")
    assert "longrope-hpo-tests/no-such-model" in str(raised.value)


def test_missing_gguf_and_non_model_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "model.gguf"))
    with pytest.raises(ModelLoadError, match="not a loadable transformers model directory"):
        load_model(str(tmp_path))


def test_dtype_choice():
    cpu = torch.device("cpu")
    assert pick_dtype("auto", cpu) == (torch.bfloat16 if cpu_supports_bf16() else torch.float32)
    assert pick_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        pick_dtype("int3", cpu)


@pytest.mark.real_model
def test_embedded_model_is_a_trained_smollm2(real_model):
    model, tokenizer = real_model
    config = model.config
    assert (config.num_hidden_layers, config.head_dim, config.max_position_embeddings) == (30, 64, 8192)
    assert config.rope_parameters["rope_theta"] == 100000.0
    windows = load_windows("essays", tokenizer, 512, 2)
    result = perplexity(model, windows, progress=False)
    # a trained 135M model reads essays at perplexity in the tens; random weights give about the vocab size
    assert 3.0 < result.perplexity < 40.0


@pytest.mark.real_model
def test_gguf_file_loads_to_the_same_model_as_the_cached_conversion(real_model):
    model, tokenizer = real_model
    gguf_model, gguf_tokenizer = load_model(str(assets.smollm2_gguf_path()), dtype="float32")
    ids = torch.tensor([tokenizer("The grass is green. The sky is blue.")["input_ids"]])
    assert gguf_tokenizer("The grass is green.")["input_ids"] == tokenizer("The grass is green.")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(gguf_model(ids).logits, model(ids).logits)
