"""LongRoPE2's needle-driven perplexity: loss only on answers that need the far context.

Plain perplexity on long documents is dominated by tokens that only need the
last few hundred tokens. Here each window gets ``needles`` short facts ("The
secret code number 3 is 482913.") inserted at evenly spread depths, and ends
with the questions and answers; only the answer digits are scored, so the
fitness rewards factors that let the model retrieve from every depth.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def needle_windows(
    windows: Sequence[torch.Tensor], tokenizer, needles: int, seed: int = 0
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Windows of the same lengths with needles inserted, and masks marking the answer tokens.

    Needle ``j`` (of ``needles``) sits at depth ``(j + 1) / (needles + 1)`` of the
    haystack; keys are 6-digit numbers drawn from ``seed``, so runs repeat.
    """
    if needles < 1:
        raise ValueError(f"needles must be >= 1, got {needles}")
    rng = random.Random(seed)
    out_windows, out_masks = [], []
    for window in windows:
        keys = [str(rng.randint(100_000, 999_999)) for _ in range(needles)]
        facts = [_ids(tokenizer, f" The secret code number {j + 1} is {key}. ") for j, key in enumerate(keys)]
        tail, answer = [], []
        for j, key in enumerate(keys):
            question = _ids(tokenizer, f"\nWhat is secret code number {j + 1}? The secret code number {j + 1} is")
            digits = _ids(tokenizer, f" {key}.")
            tail += question + digits
            answer += [False] * len(question) + [True] * len(digits)
        haystack_len = window.numel() - sum(map(len, facts)) - len(tail)
        if haystack_len < needles + 1:
            raise ValueError(f"a window of {window.numel()} tokens is too short for {needles} needles")
        haystack = window[:haystack_len].tolist()
        depths = [round(haystack_len * (j + 1) / (needles + 1)) for j in range(needles)]
        tokens, previous = [], 0
        for depth, fact in zip(depths, facts, strict=True):
            tokens += haystack[previous:depth] + fact
            previous = depth
        tokens += haystack[previous:]
        mask = [False] * len(tokens) + answer
        tokens += tail
        out_windows.append(torch.tensor(tokens, dtype=torch.long))
        out_masks.append(torch.tensor(mask, dtype=torch.bool))
    return out_windows, out_masks
