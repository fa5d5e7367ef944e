"""Passkey retrieval, with the prompt of the LongRoPE paper (from Landmark Attention).

A 5-digit key is hidden at some depth of a long, repetitive filler; the model
must read it back. The prompt is, line by line::

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. ...
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. (repeated)
    The pass key is 12345. Remember it. 12345 is the pass key.
    The grass is green. ... (repeated)
    What is the pass key? The pass key is

The answer is decoded greedily for a few tokens (with the KV cache) and is
correct when its first number is the key. :func:`passkey_prompts` draws keys
and depths from a seed, ``samples`` prompts in each of ``depth_bins`` equal
depth ranges, so accuracy can be read per length and per depth and runs repeat.
"""

from __future__ import annotations

import random
import re
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
KEY_DIGITS = 5


@dataclass(frozen=True)
class PasskeyPrompt:
    """One passkey prompt.

    ``depth`` is the asked depth: the fraction of the filler repetitions placed
    before the key line (0 = right after the task, 1 = right before the question).
    ``key_position`` is the index of the key line's first token in ``input_ids``.
    """

    input_ids: torch.Tensor
    key: str
    depth: float
    key_position: int


@dataclass(frozen=True)
class PasskeyOutcome:
    """What the model answered to one prompt."""

    prompt: PasskeyPrompt
    answer: str
    predicted: str | None
    seconds: float

    @property
    def correct(self) -> bool:
        return self.predicted == self.prompt.key


def _prompt_text(key: str, before: int, after: int) -> tuple[str, str]:
    """The text before the key line, and the whole prompt, with ``before``/``after`` filler repetitions."""
    # No empty line where a filler is absent (depth 0 or 1): "\n\n" would merge into one token.
    head = "".join(line + "\n" for line in (TASK, " ".join([FILLER] * before)) if line)
    tail = "".join("\n" + line for line in (" ".join([FILLER] * after), QUESTION) if line)
    return head, head + KEY_LINE.format(key=key) + tail


def build_passkey_prompt(tokenizer, length: int, key: str, depth: float) -> PasskeyPrompt:
    """The longest prompt of at most ``length`` tokens with ``key`` at ``depth`` (0..1).

    The filler is whole repetitions of :data:`FILLER`, so the prompt is shorter
    than ``length`` by less than one repetition (about 25 tokens). The tokenizer
    adds its special tokens (e.g. BOS) as in normal use; they count towards ``length``.
    Raises ``ValueError`` when not even one repetition fits.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")

    def tokens(text: str) -> list[int]:
        return tokenizer(text)["input_ids"]

    def build(repetitions: int) -> tuple[list[int], int]:
        before = round(depth * repetitions)
        head, text = _prompt_text(key, before, repetitions - before)
        return tokens(text), len(tokens(head))

    # Token counts are not exactly additive across sentence joins, so estimate, then step to the exact fit.
    fixed = len(build(0)[0])
    per_repetition = len(tokens(" " + FILLER))
    repetitions = max((length - fixed) // per_repetition, 0)
    while repetitions > 0 and len(build(repetitions)[0]) > length:
        repetitions -= 1
    while len(build(repetitions + 1)[0]) <= length:
        repetitions += 1
    if repetitions == 0:
        raise ValueError(f"a passkey prompt needs more than {length} tokens with this tokenizer")
    ids, key_position = build(repetitions)
    return PasskeyPrompt(torch.tensor(ids, dtype=torch.long), key, depth, key_position)


def passkey_prompts(tokenizer, length: int, samples: int, depth_bins: int = 5, seed: int = 0) -> list[PasskeyPrompt]:
    """``samples`` prompts in each of ``depth_bins`` equal depth ranges, keys and depths drawn from ``seed``.

    The draw depends only on ``(seed, length)``, so every method sees the same
    prompts and a second run repeats the first.
    """
    if samples < 1 or depth_bins < 1:
        raise ValueError(f"need samples >= 1 and depth_bins >= 1, got {samples} and {depth_bins}")
    rng = random.Random(f"passkey:{seed}:{length}")  # str seeds are hashed stably, unlike hash()
    prompts = []
    for depth_bin in range(depth_bins):
        for _ in range(samples):
            key = str(rng.randrange(10 ** (KEY_DIGITS - 1), 10**KEY_DIGITS))
            depth = (depth_bin + rng.random()) / depth_bins
            prompts.append(build_passkey_prompt(tokenizer, length, key, depth))
    return prompts


def depth_bin_centre(depth: float, depth_bins: int) -> float:
    """The centre of the depth range (of ``depth_bins`` equal ones in [0, 1]) that ``depth`` falls in."""
    index = min(int(depth * depth_bins), depth_bins - 1)
    return (index + 0.5) / depth_bins


def parse_passkey(answer: str) -> str | None:
    """The first number in the model's answer (``" 12345. Remember"`` -> ``"12345"``), or None."""
    found = re.search(r"\d+", answer)
    return found.group(0) if found else None


@torch.no_grad()
def greedy_decode(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int) -> list[int]:
    """Greedy continuation of one prompt: one prefill, then one token per step from the KV cache."""
    ids = input_ids.reshape(1, -1).to(model.device)
    # logits_to_keep=1: a long prompt's full logits would be length x vocab floats, and only the last is read
    output = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    eos = model.config.eos_token_id
    stop = set(eos if isinstance(eos, list) else [eos])
    generated: list[int] = []
    for _ in range(max_new_tokens):
        next_id = output.logits[0, -1].argmax()
        generated.append(int(next_id))
        if generated[-1] in stop:
            break
        output = model(input_ids=next_id.view(1, 1), past_key_values=output.past_key_values, use_cache=True)
    return generated


def evaluate_passkey(model: nn.Module, tokenizer, prompts: list[PasskeyPrompt], *, progress: bool = True,
                     desc: str = "passkey") -> list[PasskeyOutcome]:
    """Ask ``model`` (with whatever RoPE it has now) every prompt; one outcome per prompt, in order."""
    # Enough new tokens for the key however the tokenizer splits digits, plus a little slack.
    max_new_tokens = len(tokenizer(" " + "9" * KEY_DIGITS, add_special_tokens=False)["input_ids"]) + 2
    outcomes = []
    for prompt in tqdm(prompts, desc=desc, unit="prompt", leave=False, disable=not progress):
        started = time.perf_counter()
        answer = tokenizer.decode(greedy_decode(model, prompt.input_ids, max_new_tokens), skip_special_tokens=True)
        outcomes.append(PasskeyOutcome(prompt, answer, parse_passkey(answer), time.perf_counter() - started))
    return outcomes


def group_by_depth(outcomes: list[PasskeyOutcome], depth_bins: int) -> dict[float, list[PasskeyOutcome]]:
    """The outcomes grouped by the centre of their depth bin, bins in increasing depth."""
    groups: dict[float, list[PasskeyOutcome]] = defaultdict(list)
    for outcome in outcomes:
        groups[depth_bin_centre(outcome.prompt.depth, depth_bins)].append(outcome)
    return dict(sorted(groups.items()))
