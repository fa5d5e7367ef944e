"""Baselines as pure functions: shapes, limits, and agreement with the published formulas."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from models.baselines import (
    NTK_SCALE_MULTIPLIERS,
    baseline,
    critical_dimension,
    hand_made_curves,
    is_baseline,
    linear_interpolation,
    longrope2_initial,
    longrope_attention_scaling,
    no_scaling,
    ntk_aware,
    yarn,
)
from models.rope import RopeGeometry

SMOLLM2 = RopeGeometry(rotary_dim=64, base=100000.0, original_length=8192)
LLAMA3 = RopeGeometry(rotary_dim=128, base=500000.0, original_length=8192)


def is_monotone(values) -> bool:
    return all(a <= b + 1e-12 for a, b in zip(values[:-1], values[1:], strict=True))


@pytest.mark.parametrize("make", [no_scaling, linear_interpolation, ntk_aware, yarn, longrope2_initial])
@pytest.mark.parametrize("target", [16384, 32768, 131072])
def test_every_baseline_is_monotone_and_at_least_one(make, target):
    factors = make(SMOLLM2, target)
    assert factors.num_factors == 32
    assert is_monotone(factors.rescale_factors)
    assert min(factors.rescale_factors) >= 1.0
    assert factors.target_length == target and factors.original_length == 8192


def test_pi_and_ntk_limits():
    assert set(linear_interpolation(SMOLLM2, 16384).rescale_factors) == {2.0}
    ntk = ntk_aware(SMOLLM2, 16384).rescale_factors
    assert ntk[0] == 1.0
    assert ntk[-1] == pytest.approx(2.0 ** (64 / 62 * 62 / 64))  # base' / base = s^(d/(d-2)) at i = d/2 - 1


def test_ntk_equals_a_larger_base():
    factors = ntk_aware(SMOLLM2, 32768)
    new_base = SMOLLM2.base * 4.0 ** (64 / 62)
    expected = RopeGeometry(64, new_base, 8192).original_inv_freq()
    inv_freq, _ = factors.inv_freq(SMOLLM2)
    torch.testing.assert_close(inv_freq, expected, rtol=1e-5, atol=0)


def test_yarn_inv_freq_matches_transformers_for_smollm2():
    config = LlamaConfig(hidden_size=576, num_attention_heads=9, head_dim=64, max_position_embeddings=16384,
                         rope_parameters={"rope_type": "yarn", "rope_theta": 100000.0, "factor": 2.0,
                                          "original_max_position_embeddings": 8192})
    stock_inv_freq, stock_scaling = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    inv_freq, scaling = yarn(SMOLLM2, 16384).inv_freq(SMOLLM2)
    torch.testing.assert_close(inv_freq, stock_inv_freq, rtol=1e-6, atol=0)
    assert scaling == pytest.approx(stock_scaling) == pytest.approx(0.1 * math.log(2) + 1)


def test_lengths_within_the_window_need_no_rescaling():
    for name in ("pi", "ntk", "yarn"):
        assert set(baseline(name, SMOLLM2, 4096).rescale_factors) == {1.0}


def test_longrope_attention_scaling():
    assert longrope_attention_scaling(1.0, 8192) == 1.0
    assert longrope_attention_scaling(2.0, 8192) == pytest.approx(math.sqrt(1 + math.log(2) / math.log(8192)))


def test_critical_dimension_matches_the_longrope2_formula():
    # Llama-3-8B: ceil(64 * log_500000(8192 / 2pi)) - 1 = 34 (the reference example used 33: rounding varies)
    assert critical_dimension(LLAMA3) == 34
    exponent = math.log(8192 / (2 * math.pi)) / math.log(100000.0)
    assert critical_dimension(SMOLLM2) == math.ceil(32 * exponent) - 1


def test_longrope2_initial_is_ntk_shaped_below_the_critical_dim():
    factors = longrope2_initial(LLAMA3, 131072, critical_dim=33, critical_factor=20.0).rescale_factors
    assert factors[0] == 1.0
    for i in range(33):
        assert factors[i] == pytest.approx(20.0 ** (i / 33))
    assert all(f >= 20.0 for f in factors[33:])
    # from d_c on: strictly increasing by 0.1 per dim, as the reference's ntk_init
    assert factors[33:] == pytest.approx([20.0 + 0.1 * k for k in range(64 - 33)])


def test_yarn_with_factors_blended_linearly_as_the_reference_seed():
    """The reference blends factors (lambda = (1-r) + r s); YaRN itself blends inverse frequencies."""
    true_yarn = yarn(LLAMA3, 32768, beta_fast=128, beta_slow=2).rescale_factors
    linear = yarn(LLAMA3, 32768, beta_fast=128, beta_slow=2, blend="factor")
    assert linear.method == "yarn-linear" and linear.metadata == {"beta_fast": 128, "beta_slow": 2}
    ramp = [(f - 1.0) / (4.0 - 1.0) for f in linear.rescale_factors]  # r recovered from lambda = 1 + r (s - 1)
    assert all(0.0 <= r <= 1.0 for r in ramp)
    assert true_yarn == pytest.approx([1.0 / ((1 - r) + r / 4.0) for r in ramp])
    inside = [i for i, r in enumerate(ramp) if 0 < r < 1]
    assert inside and all(linear.rescale_factors[i] > true_yarn[i] for i in inside)
    with pytest.raises(ValueError, match="blend"):
        yarn(LLAMA3, 32768, blend="angle")


def test_unknown_baseline():
    with pytest.raises(ValueError, match="unknown method 'rope'"):
        baseline("rope", SMOLLM2, 16384)


def test_ntk_built_for_another_scale_tops_out_at_that_scale():
    factors = ntk_aware(SMOLLM2, 32768, effective_scale=6.0).rescale_factors
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(6.0) and is_monotone(factors)
    assert ntk_aware(SMOLLM2, 32768, effective_scale=4.0) == ntk_aware(SMOLLM2, 32768)
    with pytest.raises(ValueError, match="effective_scale"):
        ntk_aware(SMOLLM2, 32768, effective_scale=0.5)


def test_hand_made_families_start_with_the_named_baselines():
    families = hand_made_curves(SMOLLM2, 32768, beta_fast=64.0, beta_slow=2.0)
    ntk_family, yarn_family = families["ntk+attn"], families["yarn"]
    assert ntk_family["ntk+attn"] == baseline("ntk+attn", SMOLLM2, 32768)
    assert baseline("ntk+attn", SMOLLM2, 32768).attention_scaling == longrope_attention_scaling(4.0, 8192)
    assert [f.rescale_factors[-1] for f in ntk_family.values()] == pytest.approx([4 * m for m in NTK_SCALE_MULTIPLIERS])
    assert yarn_family["yarn"] == yarn(SMOLLM2, 32768, 64.0, 2.0)  # the preset's betas first, never twice
    assert len(yarn_family) == 4 and "yarn (32/1)" in yarn_family and "yarn (64/2)" not in yarn_family


def test_every_hand_made_curve_is_a_baseline_by_its_table_name():
    """`hpo.evaluate --methods "ntk+attn (s=5)"` evaluates the row hpo.run's comparison names so."""
    for family in hand_made_curves(SMOLLM2, 32768).values():
        for name, factors in family.items():
            assert is_baseline(name) and baseline(name, SMOLLM2, 32768) == factors
    assert baseline("ntk+attn (s=6.5)", SMOLLM2, 32768).rescale_factors[-1] == pytest.approx(6.5)
    assert not is_baseline("ntk+attn (s=)") and not is_baseline("yarn (64)")
    with pytest.raises(ValueError, match=r"ntk\+attn \(s=SCALE\)"):
        baseline("yarn (64)", SMOLLM2, 32768)
