"""The factor type: JSON round trip and every validation error."""

from __future__ import annotations

import json
import math

import pytest
import torch

from models.rope import FactorError, RopeFactors, RopeGeometry

GEOMETRY = RopeGeometry(rotary_dim=16, base=10000.0, original_length=64)


def make(**overrides) -> RopeFactors:
    values = dict(rescale_factors=tuple(1.0 + i / 4 for i in range(8)), original_length=64, target_length=256,
                  start_tokens=4, attention_scaling=1.1, method="longrope", metadata={"study": "tiny"})
    values.update(overrides)
    return RopeFactors(**values)


def test_round_trip(tmp_path):
    factors = make()
    path = factors.save(tmp_path / "sub" / "factors.json")
    loaded = RopeFactors.load(path, GEOMETRY)
    assert loaded == factors
    assert loaded.metadata == {"study": "tiny"}
    assert loaded.scale == 4.0
    data = json.loads(path.read_text())
    assert data["format"] == "longrope-hpo/rope-factors" and data["version"] == 1


def test_inv_freq_divides_original_frequencies():
    inv_freq, scaling = make().inv_freq(GEOMETRY)
    original = GEOMETRY.original_inv_freq()
    assert scaling == 1.1
    assert inv_freq.tolist() == pytest.approx((original / (1.0 + torch.arange(8) / 4)).tolist())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rescale_factors": ()}, "empty"),
        ({"rescale_factors": (1.0, math.nan) + (1.0,) * 6}, "non-finite"),
        ({"rescale_factors": (1.0, math.inf) + (1.0,) * 6}, "non-finite"),
        ({"rescale_factors": (0.9,) + (1.0,) * 7}, ">= 1.0"),
        ({"attention_scaling": 0.0}, "attention_scaling"),
        ({"attention_scaling": math.nan}, "attention_scaling"),
        ({"start_tokens": -1}, "start_tokens"),
        ({"start_tokens": 2.5}, "start_tokens"),
        ({"original_length": 0}, "original_length"),
        ({"target_length": "16k"}, "target_length"),
    ],
)
def test_invalid_values_are_rejected(overrides, message):
    with pytest.raises(FactorError, match=message):
        make(**overrides)


def test_wrong_length_for_the_model(tmp_path):
    path = make(rescale_factors=(1.0,) * 7).save(tmp_path / "f.json")
    with pytest.raises(FactorError, match="7 rescale factors given.*needs 8"):
        RopeFactors.load(path, GEOMETRY)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"format": "something-else", "rescale_factors": [1], "original_length": 1, "target_length": 2}',
         "not a rope-factors file"),
        ('{"rescale_factors": [1.0]}', "lacks original_length, target_length"),
        ('{"rescale_factors": "1,2", "original_length": 8, "target_length": 16}', "list of numbers"),
        ('{"rescale_factors": [1, "x"], "original_length": 8, "target_length": 16}', "list of numbers"),
        ('{"version": 99, "rescale_factors": [1], "original_length": 8, "target_length": 16}', "newer"),
    ],
)
def test_malformed_files_are_rejected_with_the_path(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(FactorError, match=message) as raised:
        RopeFactors.load(path)
    assert "bad.json" in str(raised.value)


def test_missing_file(tmp_path):
    with pytest.raises(FactorError, match="does not exist"):
        RopeFactors.load(tmp_path / "nope.json")
