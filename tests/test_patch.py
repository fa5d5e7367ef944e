"""Patching RoPE in place: identity, agreement with transformers' own methods, n_hat, restore, export."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from models.baselines import linear_interpolation, no_scaling, yarn
from models.export import rope_parameters, save_extended_model
from models.patch import apply_factors, patched, restore_original, rotary_modules
from models.rope import FactorError, RopeFactors, RopeGeometry
from tests.conftest import TINY_WINDOW, tiny_llama, tiny_llama_config

TARGET = 4 * TINY_WINDOW


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def same_weights_model(reference, **rope_parameters):
    other = LlamaForCausalLM(tiny_llama_config(**rope_parameters)).eval()
    other.load_state_dict(reference.state_dict())
    return other


def geometry_of(model) -> RopeGeometry:
    return RopeGeometry.from_config(model.config)


def test_identity_factors_leave_logits_unchanged(model, input_ids):
    before = logits(model, input_ids)
    apply_factors(model, no_scaling(geometry_of(model), TARGET))
    assert torch.equal(logits(model, input_ids), before)


def test_uniform_factors_match_transformers_linear(model, input_ids):
    scale = TARGET / TINY_WINDOW
    stock = same_weights_model(model, factor=scale, rope_type="linear")
    apply_factors(model, linear_interpolation(geometry_of(model), TARGET))
    torch.testing.assert_close(logits(model, input_ids), logits(stock, input_ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("beta_fast", "beta_slow"), [(32.0, 1.0), (128.0, 2.0)])
def test_yarn_matches_transformers_yarn(model, input_ids, beta_fast, beta_slow):
    scale = TARGET / TINY_WINDOW
    stock = same_weights_model(model, rope_type="yarn", factor=scale, original_max_position_embeddings=TINY_WINDOW,
                               beta_fast=beta_fast, beta_slow=beta_slow)
    ours = yarn(geometry_of(model), TARGET, beta_fast=beta_fast, beta_slow=beta_slow)
    stock_rotary = rotary_modules(stock)[0]
    inv_freq, attention_scaling = ours.inv_freq(geometry_of(model))
    torch.testing.assert_close(inv_freq, stock_rotary.inv_freq, rtol=1e-6, atol=0)
    assert attention_scaling == pytest.approx(stock_rotary.attention_scaling)
    apply_factors(model, ours)
    torch.testing.assert_close(logits(model, input_ids), logits(stock, input_ids), rtol=1e-5, atol=1e-5)


def test_change_again_and_restore(model, input_ids):
    original = logits(model, input_ids)
    geometry = geometry_of(model)
    apply_factors(model, yarn(geometry, TARGET))
    yarn_logits = logits(model, input_ids)
    apply_factors(model, linear_interpolation(geometry, TARGET))
    pi_logits = logits(model, input_ids)
    assert not torch.allclose(yarn_logits, pi_logits)
    apply_factors(model, yarn(geometry, TARGET))
    assert torch.equal(logits(model, input_ids), yarn_logits)
    restore_original(model)
    assert torch.equal(logits(model, input_ids), original)


def test_patched_context_restores_on_error(model, input_ids):
    original = logits(model, input_ids)
    with pytest.raises(RuntimeError), patched(model, linear_interpolation(geometry_of(model), TARGET)):
        raise RuntimeError("trial failed")
    assert torch.equal(logits(model, input_ids), original)


def test_wrong_factor_count_is_rejected(model):
    factors = RopeFactors(rescale_factors=(2.0,) * 5, original_length=TINY_WINDOW, target_length=TARGET)
    with pytest.raises(FactorError, match="needs 8"):
        apply_factors(model, factors)


def rotary_output(model, positions: torch.Tensor):
    rotary = rotary_modules(model)[0]
    x = torch.zeros(1, positions.numel(), 16)
    return rotary(x, positions[None])


def test_start_tokens_keep_original_rotation(model):
    geometry = geometry_of(model)
    positions = torch.arange(2 * TINY_WINDOW)
    original_cos, original_sin = rotary_output(model, positions)
    scaled = linear_interpolation(geometry, TARGET, attention_scaling=1.25)
    apply_factors(model, scaled)
    scaled_cos, scaled_sin = rotary_output(model, positions)
    n_hat = 8
    apply_factors(model, RopeFactors(scaled.rescale_factors, TINY_WINDOW, TARGET, start_tokens=n_hat,
                                     attention_scaling=1.25))
    cos, sin = rotary_output(model, positions)
    # below n_hat: the original cos/sin, without the attention scaling (the reference's
    # _add_original_embeddings copies the original embeddings back unscaled)
    torch.testing.assert_close(cos[:, :n_hat], original_cos[:, :n_hat])
    torch.testing.assert_close(sin[:, :n_hat], original_sin[:, :n_hat])
    # at and above n_hat: the rescaled angles
    torch.testing.assert_close(cos[:, n_hat:], scaled_cos[:, n_hat:])
    torch.testing.assert_close(sin[:, n_hat:], scaled_sin[:, n_hat:])
    assert not torch.allclose(cos[:, 1:n_hat], scaled_cos[:, 1:n_hat])


def test_start_tokens_change_logits_and_work_with_kv_cache(model, input_ids):
    geometry = geometry_of(model)
    pi = linear_interpolation(geometry, TARGET)
    apply_factors(model, pi)
    without = logits(model, input_ids)
    apply_factors(model, RopeFactors(pi.rescale_factors, TINY_WINDOW, TARGET, start_tokens=4))
    with_start = logits(model, input_ids)
    assert not torch.allclose(without, with_start)
    # incremental decoding with the KV cache sees the same rotations as one full forward
    with torch.no_grad():
        prefix = model(input_ids[:, :-1], use_cache=True)
        last = model(input_ids[:, -1:], past_key_values=prefix.past_key_values).logits
    torch.testing.assert_close(last[:, -1], with_start[:, -1], rtol=1e-4, atol=1e-4)


def test_patching_a_longrope_model_ignores_its_cached_long_factors(input_ids):
    geometry_config = tiny_llama_config()
    n = geometry_config.head_dim // 2
    longrope = tiny_llama(rope_type="longrope", long_factor=[3.0] * n, short_factor=[1.0] * n,
                          original_max_position_embeddings=TINY_WINDOW, factor=4.0)
    longrope.config.max_position_embeddings = TARGET
    logits(longrope, input_ids)  # fills the module's long_inv_freq cache
    reference = same_weights_model(longrope)
    pi = linear_interpolation(geometry_of(reference), TARGET)
    apply_factors(longrope, pi)
    apply_factors(reference, pi)
    torch.testing.assert_close(logits(longrope, input_ids), logits(reference, input_ids), rtol=1e-5, atol=1e-5)


def test_exported_longrope_config_reproduces_patched_logits(model, input_ids, tmp_path):
    geometry = geometry_of(model)
    factors = yarn(geometry, TARGET)
    factors = RopeFactors(tuple(f * 1.1 for f in factors.rescale_factors), TINY_WINDOW, TARGET,
                          attention_scaling=1.13)

    class NoTokenizer:
        def save_pretrained(self, path):
            return path

    apply_factors(model, factors)
    save_extended_model(model, NoTokenizer(), tmp_path, factors)  # saving leaves the model patched
    stock = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert stock.config.rope_parameters["rope_type"] == "longrope"
    assert model.config.rope_parameters["rope_type"] == "default"
    assert input_ids.shape[1] > TINY_WINDOW
    torch.testing.assert_close(logits(stock, input_ids), logits(model, input_ids), rtol=1e-5, atol=1e-5)


def test_export_warns_that_start_tokens_are_ignored(model, caplog):
    geometry = geometry_of(model)
    factors = RopeFactors(yarn(geometry, TARGET).rescale_factors, TINY_WINDOW, TARGET, start_tokens=4)
    block = rope_parameters(factors, geometry)
    assert block["rope_type"] == "longrope" and block["original_max_position_embeddings"] == TINY_WINDOW
    assert "ignore" in caplog.text and "start_tokens" in caplog.text
