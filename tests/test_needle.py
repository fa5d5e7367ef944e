"""Needle-driven perplexity windows: same length, needles at the asked depths, only answers scored."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from models.loading import TINY_MODEL, _embedded_model_dir
from objectives.needle import needle_windows


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(_embedded_model_dir(TINY_MODEL))


def test_needles_keep_the_length_and_score_only_answer_digits(tokenizer):
    haystack = [torch.tensor(tokenizer("The grass is green. " * 200, add_special_tokens=False)["input_ids"][:600])]
    windows, masks = needle_windows(haystack, tokenizer, needles=3, seed=7)
    assert windows[0].numel() == 600 and masks[0].numel() == 600
    text = tokenizer.decode(windows[0])
    answers = tokenizer.decode(windows[0][masks[0]])
    for j in (1, 2, 3):
        assert text.count(f"secret code number {j} is") == 2  # the fact, and the answer at the end
    keys = [text.split(f"secret code number {j} is ")[1][:6] for j in (1, 2, 3)]
    assert all(key in answers for key in keys)
    assert set(answers) <= set("0123456789. ")
    # the facts sit at increasing depths spread through the window
    depths = [text.index(f"number {j} is") / len(text) for j in (1, 2, 3)]
    assert depths[0] < 0.35 < depths[1] < 0.65 < depths[2] < 0.9


def test_same_seed_same_keys_and_short_windows_rejected(tokenizer):
    haystack = [torch.arange(1000, 1400)]
    first, _ = needle_windows(haystack, tokenizer, needles=2, seed=1)
    again, _ = needle_windows(haystack, tokenizer, needles=2, seed=1)
    other, _ = needle_windows(haystack, tokenizer, needles=2, seed=2)
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], other[0])
    with pytest.raises(ValueError, match="too short"):
        needle_windows([torch.arange(30)], tokenizer, needles=4)
