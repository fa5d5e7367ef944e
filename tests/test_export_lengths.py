"""Exported lengths come from the factors, not from the model config.

The model configs here state a 512-token window while the factors extend 128 -> 256 tokens (as a preset's
``original_length`` does): the export must say 128 / 2.0 / 256, so that stock transformers switches to the
long factors past 128 tokens, not past 512.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

import hpo.export
from hpo.run import main as run_study
from models.baselines import yarn
from models.export import extended_config, rope_parameters, save_extended_model, write_rope_parameters
from models.patch import apply_factors
from models.rope import FactorError, RopeFactors, RopeGeometry
from tests.conftest import tiny_llama_config

CONFIG_WINDOW, ORIGINAL, TARGET = 512, 128, 256
INPUT_LENGTH = 200  # past the factors' window, within the config's


class NoTokenizer:
    def save_pretrained(self, path):
        return path


def long_factors() -> RopeFactors:
    factors = yarn(RopeGeometry(rotary_dim=16, base=10000.0, original_length=ORIGINAL), TARGET)
    return RopeFactors(factors.rescale_factors, ORIGINAL, TARGET, attention_scaling=1.1)


def tiny_llama_with_a_longer_window() -> LlamaForCausalLM:
    config = tiny_llama_config()
    config.max_position_embeddings = CONFIG_WINDOW
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def expected_lengths(block: dict) -> None:
    assert block["original_max_position_embeddings"] == ORIGINAL
    assert block["factor"] == pytest.approx(TARGET / ORIGINAL)


def test_rope_parameters_and_config_take_the_lengths_from_the_factors(tmp_path):
    config = tiny_llama_with_a_longer_window().config
    factors = long_factors()
    expected_lengths(rope_parameters(factors, RopeGeometry.from_config(config)))
    extended = extended_config(config, factors)
    expected_lengths(extended.rope_parameters)
    assert extended.max_position_embeddings == TARGET
    assert config.max_position_embeddings == CONFIG_WINDOW  # a copy
    block = json.loads(write_rope_parameters(tmp_path / "rope.json", factors, RopeGeometry.from_config(config))
                       .read_text())
    expected_lengths(block["rope_parameters"])
    assert block["max_position_embeddings"] == TARGET


def test_stock_transformers_uses_the_long_factors_past_the_factors_window(tmp_path):
    model = tiny_llama_with_a_longer_window()
    factors = long_factors()
    save_extended_model(model, NoTokenizer(), tmp_path, factors)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    expected_lengths(stock.config.rope_parameters)
    assert stock.config.max_position_embeddings == TARGET
    ids = torch.randint(0, 128, (1, INPUT_LENGTH), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock_logits = stock(ids).logits
    geometry = RopeGeometry.from_config(model.config)
    long_inv_freq, _ = factors.inv_freq(geometry)
    torch.testing.assert_close(stock.model.rotary_emb.inv_freq, long_inv_freq)
    apply_factors(model, factors)
    with torch.no_grad():
        torch.testing.assert_close(stock_logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        stock(ids[:, :ORIGINAL])  # within the factors' window: the short factors (1, the original RoPE)
    torch.testing.assert_close(stock.model.rotary_emb.inv_freq, geometry.original_inv_freq())


def test_short_factors_must_be_for_the_long_factors_window():
    geometry = RopeGeometry(rotary_dim=16, base=10000.0, original_length=CONFIG_WINDOW)
    short = RopeFactors((1.0,) * 7 + (1.5,), ORIGINAL, ORIGINAL)
    assert rope_parameters(long_factors(), geometry, short)["short_factor"] == list(short.rescale_factors)
    with pytest.raises(FactorError, match="original window"):
        rope_parameters(long_factors(), geometry, RopeFactors((1.0,) * 8, TARGET, TARGET))


def test_phi3_window_outside_rope_parameters_follows_the_factors(tmp_path):
    """Phi-3 configs keep ``original_max_position_embeddings`` at the top level too, and transformers prefers it."""
    config = Phi3Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONFIG_WINDOW,
                        original_max_position_embeddings=CONFIG_WINDOW, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2)
    torch.manual_seed(0)
    save_extended_model(Phi3ForCausalLM(config).eval(), NoTokenizer(), tmp_path, long_factors())
    stock = AutoModelForCausalLM.from_pretrained(tmp_path)
    expected_lengths(stock.config.rope_parameters)
    assert stock.config.original_max_position_embeddings == ORIGINAL


SHORTER_WINDOW = """
description = "tiny random llama searched from a 64-token window although its config says 128"
target_length = 128

[model]
name = "tiny-random-llama"
dtype = "float32"
original_length = 64

[data]
source = "essays"
samples = 1
heldout_samples = 1

[search]
n_trials = 3
population = 3
parents = 2
mutants = 1
crossovers = 1
seed = 0
"""


def test_study_outputs_and_export_use_the_presets_original_length(tmp_path):
    preset = tmp_path / "tiny_window64.toml"
    preset.write_text(SHORTER_WINDOW)
    out = tmp_path / "run"
    assert run_study(["--study", str(preset), "--out", str(out), "--quiet"]) == 0
    block = json.loads((out / "rope_parameters.json").read_text())
    assert block["rope_parameters"]["original_max_position_embeddings"] == 64
    assert block["rope_parameters"]["factor"] == pytest.approx(2.0)
    assert block["max_position_embeddings"] == 128
    model_dir = tmp_path / "model"  # the study records its model: a preset from a file exports too
    assert hpo.export.main(["--study", "tiny_window64", "--out", str(out), "--to", str(model_dir)]) == 0
    config = json.loads((model_dir / "config.json").read_text())
    assert config["rope_parameters"] == block["rope_parameters"]
    assert config["max_position_embeddings"] == 128
    assert Path(model_dir / "tokenizer.json").is_file()


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_export_to_a_file_is_a_one_line_error_that_writes_nothing(tmp_path, capsys, where):
    existing = tmp_path / "model.bin"
    existing.write_bytes(b"keep me")
    target = existing if where == "file" else existing / "model"
    assert hpo.export.main(["--study", "tiny", "--out", str(tmp_path / "nowhere"), "--to", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{existing} is a file, not a directory" in err
    assert existing.read_bytes() == b"keep me"


def test_serving_runtimes_get_the_searched_attention_scaling_as_mscales(tmp_path):
    """vLLM and SGLang ignore ``attention_factor`` and scale by ``long_mscale``/``short_mscale`` instead."""
    geometry = RopeGeometry(rotary_dim=16, base=10000.0, original_length=CONFIG_WINDOW)
    block = rope_parameters(long_factors(), geometry)
    assert block["long_mscale"] == block["attention_factor"] == pytest.approx(1.1)
    assert block["short_mscale"] == 1.0  # short factors of 1: the original RoPE, unscaled
    short = RopeFactors((1.0,) * 7 + (1.5,), ORIGINAL, ORIGINAL, attention_scaling=1.02)
    assert rope_parameters(long_factors(), geometry, short)["short_mscale"] == pytest.approx(1.02)
    save_extended_model(tiny_llama_with_a_longer_window(), NoTokenizer(), tmp_path, long_factors())
    stock = AutoModelForCausalLM.from_pretrained(tmp_path)  # stock transformers still loads the block
    assert stock.config.rope_parameters["long_mscale"] == pytest.approx(1.1)
    assert stock.model.rotary_emb.attention_scaling == pytest.approx(1.1)
