"""Loading: the embedded default is a real trained model; bad ids and paths fail clearly."""

from __future__ import annotations

import pytest
import torch

from models import assets, loading, precision
from models.baselines import yarn
from models.gguf_export import model_to_gguf
from models.loading import ModelLoadError, load_model, pick_dtype
from models.rope import RopeGeometry
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
    assert pick_dtype("auto", cpu) == torch.float32  # no config: what GGUF and hub models load in first
    assert pick_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        pick_dtype("int3", cpu)


@pytest.fixture
def probe_timings(tmp_path, monkeypatch) -> dict[torch.dtype, float]:
    """Fake per-layer seconds by dtype (set them in the returned dict); the probe's cache in tmp_path."""
    timings = {torch.float32: 2.0, torch.bfloat16: 1.0}
    calls = []
    monkeypatch.setattr(precision, "probe_file", lambda: tmp_path / precision.PROBE_FILE)
    monkeypatch.setattr(precision, "time_layer", lambda shape, dtype: calls.append(dtype) or timings[dtype])
    timings["calls"] = calls
    return timings


def test_auto_on_a_cpu_is_the_dtype_measured_fastest_for_the_model_and_the_probe_is_cached(probe_timings):
    config = load_model("tiny-random-llama", dtype="float32")[0].config
    assert pick_dtype("auto", torch.device("cpu"), config) == torch.bfloat16
    assert len(probe_timings["calls"]) == 2  # one timing per candidate
    probe_timings[torch.bfloat16] = 9.0  # a cached probe is not measured again
    assert pick_dtype("auto", torch.device("cpu"), config) == torch.bfloat16
    assert len(probe_timings["calls"]) == 2
    config.intermediate_size *= 2  # another shape is measured anew
    assert pick_dtype("auto", torch.device("cpu"), config) == torch.float32


def test_load_model_auto_runs_in_the_measured_dtype_and_keeps_rope_frequencies_in_fp32(probe_timings):
    model, _ = load_model("tiny-random-llama")
    assert model.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # loaded in bf16, not cast: no rounded RoPE
    probe_timings[torch.bfloat16] = 3.0
    assert load_model("tiny-random-llama", dtype="auto")[0].dtype == torch.bfloat16  # the cache decides
    assert load_model("tiny-random-llama", dtype="fp32")[0].dtype == torch.float32  # an asked type is kept


def test_layer_probe_times_both_candidates_at_a_model_shape():
    shape = precision.LayerShape(hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16)
    for dtype in precision.CANDIDATE_DTYPES:
        assert 0 < precision.time_layer(shape, dtype, tokens=64) < 10
    assert shape.attention_flops(4) == 4 * 4 * 16 * 10  # the lower triangle of a 4-token window: 10 pairs


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


def test_load_model_auto_reads_a_directory_once(probe_timings, monkeypatch):
    """The dtype is measured from the directory's config before the weights are read, not after a first load."""
    loads = []
    real = loading._load_pretrained
    monkeypatch.setattr(loading, "_load_pretrained", lambda *args: loads.append(args) or real(*args))
    model, _ = load_model("tiny-random-llama")
    assert model.dtype == torch.bfloat16 and len(loads) == 1


def test_load_model_auto_reads_a_gguf_file_once(probe_timings, monkeypatch, tmp_path):
    """A GGUF file's metadata gives the shapes before its weights are read, as a directory's config.json does."""
    model, tokenizer = load_model("tiny-random-llama", dtype="float32")
    geometry = RopeGeometry.from_config(model.config)
    path = model_to_gguf(model, tokenizer, tmp_path / "tiny.gguf", yarn(geometry, 2 * geometry.original_length))
    loads = []
    real = loading._load_gguf
    monkeypatch.setattr(loading, "_load_gguf", lambda *args: loads.append(args) or real(*args))
    gguf_model, _ = load_model(str(path))
    assert gguf_model.dtype == torch.bfloat16 and len(loads) == 1


def test_load_model_auto_measures_after_loading_when_the_config_does_not_read_first(probe_timings, monkeypatch):
    loads = []
    real = loading._load_pretrained
    monkeypatch.setattr(loading, "_load_pretrained", lambda *args: loads.append(args) or real(*args))
    monkeypatch.setattr(loading, "_config_before_weights", lambda name_or_path, local: None)
    model, _ = load_model("tiny-random-llama")  # loaded in fp32, measured, loaded again in bf16
    assert model.dtype == torch.bfloat16 and [args[1] for args in loads] == [torch.float32, torch.bfloat16]
