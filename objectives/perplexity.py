"""Long-context perplexity without materialising the full logits tensor.

A 32k-token window of a 49k-vocabulary model would need 6 GB of fp32 logits.
We run the decoder once, then apply the LM head to ``chunk_tokens`` hidden
states at a time and accumulate the summed negative log-likelihood.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from objectives.packing import model_inputs

DEFAULT_CHUNK_TOKENS = 2048


@dataclass
class PerplexityResult:
    """Token-weighted perplexity over windows, each window's own and (with position bins) each position range's."""

    nll_sum: float
    tokens: int
    seconds: float
    window_perplexities: list[float] = field(default_factory=list)
    position_nll_sums: list[float] = field(default_factory=list)
    position_tokens: list[int] = field(default_factory=list)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.tokens)

    @classmethod
    def empty(cls, position_bins: int = 1) -> PerplexityResult:
        """Nothing counted yet, with ``position_bins`` equal ranges of positions to count into."""
        if position_bins < 1:
            raise ValueError(f"position_bins must be >= 1, got {position_bins}")
        return cls(nll_sum=0.0, tokens=0, seconds=0.0, position_nll_sums=[0.0] * position_bins,
                   position_tokens=[0] * position_bins)

    def add_window(self, nll: torch.Tensor, positions: torch.Tensor, span: int) -> None:
        """Count one window's scored tokens: ``nll`` of each, at ``positions`` in ``0..span-1``, which the
        position ranges divide."""
        window_nll_sum = nll.sum().item()
        self.nll_sum += window_nll_sum
        self.tokens += nll.numel()
        self.window_perplexities.append(math.exp(window_nll_sum / nll.numel()))
        bins = len(self.position_tokens)
        which = positions * bins // span
        for position_bin in range(bins):
            in_bin = which == position_bin
            self.position_nll_sums[position_bin] += nll[in_bin].sum().item()
            self.position_tokens[position_bin] += int(in_bin.sum())

    @property
    def position_perplexities(self) -> list[float]:
        """Perplexity of the tokens in each of the equal position ranges, the window's start first (NaN: none)."""
        return [math.exp(nll / count) if count else math.nan
                for nll, count in zip(self.position_nll_sums, self.position_tokens, strict=True)]


@contextmanager
def layer_progress(model: nn.Module, desc: str, enabled: bool = True) -> Iterator[None]:
    """A progress bar that advances once per decoder layer during the forwards inside the block."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not enabled or layers is None:
        yield
        return
    bar = tqdm(total=len(layers), desc=desc, unit="layer", leave=False)

    def advance(*_) -> None:  # must return None: a forward hook's return value replaces the layer's output
        bar.update(1)

    handles = [layer.register_forward_hook(advance) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        bar.close()


@torch.no_grad()
def token_nll(model: nn.Module, input_ids: torch.Tensor, score_from: int = 1,
              chunk_tokens: int = DEFAULT_CHUNK_TOKENS, score_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each scored token's NLL (float64, on the CPU) and its index in the window.

    Tokens ``score_from..T-1`` are scored (token ``t`` is predicted from positions
    ``< t``, so ``score_from >= 1``); ``score_mask`` (bool, one per token) narrows
    that further, e.g. to the answer tokens of needles, or away from the first
    token of each document packed in the window (whose ``position_ids`` restart at 0).
    """
    ids = input_ids.reshape(1, -1).to(model.device)
    total_len = ids.shape[1]
    scored = torch.zeros(total_len, dtype=torch.bool)
    scored[max(score_from, 1):] = True
    if score_mask is not None:
        scored &= score_mask.reshape(-1).cpu()
    if position_ids is not None:
        position_ids = position_ids.reshape(1, -1).to(model.device)
    hidden = model.get_decoder()(input_ids=ids, position_ids=position_ids, use_cache=False).last_hidden_state[0]
    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    targets = torch.nonzero(scored).flatten()
    losses = [torch.zeros(0, dtype=torch.float64)]
    for start in range(0, targets.numel(), chunk_tokens):
        rows = targets[start:start + chunk_tokens].to(hidden.device) - 1  # hidden state t-1 predicts token t
        logits = head(hidden[rows]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        losses.append(F.cross_entropy(logits, ids[0, rows + 1], reduction="none").double().cpu())
    return torch.cat(losses), targets


def window_nll(model: nn.Module, input_ids: torch.Tensor, score_from: int = 1,
               chunk_tokens: int = DEFAULT_CHUNK_TOKENS, score_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None) -> tuple[float, int]:
    """Summed NLL of the scored tokens of one window (see :func:`token_nll`), and how many were scored."""
    nll, targets = token_nll(model, input_ids, score_from, chunk_tokens, score_mask, position_ids)
    return nll.sum().item(), targets.numel()


def perplexity(model: nn.Module, windows: Sequence[torch.Tensor], *, progress: bool = True,
               desc: str = "perplexity", chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
               score_masks: Sequence[torch.Tensor] | None = None, position_bins: int = 1) -> PerplexityResult:
    """Perplexity of ``model`` over windows: every token after the first, or those in ``score_masks``.

    ``position_bins`` splits each window into that many equal ranges of positions and keeps the loss of each,
    pooled over the windows: where in a long window an extension loses.
    """
    result = PerplexityResult.empty(position_bins)
    started = time.perf_counter()
    for index, window in enumerate(windows):
        mask = None if score_masks is None else score_masks[index]
        with layer_progress(model, f"{desc} [{index + 1}/{len(windows)}, {window.numel():,} tok]", progress):
            nll, targets = token_nll(model, window, chunk_tokens=chunk_tokens, score_mask=mask)
        result.add_window(nll, targets, window.numel())
    result.seconds = time.perf_counter() - started
    return result


def sliding_window_perplexity(model: nn.Module, stream: torch.Tensor, window: int, stride: int, *,
                              max_tokens: int | None = None, bos_token_id: int | None = None,
                              progress: bool = True, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                              position_bins: int = 1) -> PerplexityResult:
    """Perplexity of a long stream read in windows of ``window`` tokens moved by ``stride``.

    Each token is scored once; a window's stream tokens before the last ``stride``
    are context carried over from the previous window. ``max_tokens`` caps how
    much of the stream is read. With ``bos_token_id``, each window is BOS followed
    by ``window - 1`` tokens of the stream, as the LongRoPE reference
    (``evaluation/perplexity.py``) measures: BOS is prepended, never scored, and
    the stream's first token is scored as predicted from BOS alone. The model then
    sees a sequence start at position 0, as in pretraining, rather than text cut
    mid-sentence. ``position_bins`` divides the stream (not each window) into equal ranges of positions, so
    they hold the same tokens as :func:`perplexity`'s ranges of one window the length of the stream.
    """
    bos = [] if bos_token_id is None else [bos_token_id]
    body = window - len(bos)  # stream tokens per window
    if not 0 < stride <= body:  # a longer stride would skip tokens
        raise ValueError(f"need 0 < stride <= {'window - 1 (BOS takes one)' if bos else 'window'}, "
                         f"got stride={stride}, window={window}")
    stream = stream.reshape(-1)
    end_of_stream = stream.numel() if max_tokens is None else min(stream.numel(), max_tokens)
    if end_of_stream < body:
        raise ValueError(f"text too short: {end_of_stream:,} tokens for a window of {window:,}")
    result = PerplexityResult.empty(position_bins)
    started = time.perf_counter()
    scored_until = 0
    starts = list(range(0, end_of_stream - body + 1, stride))
    if starts[-1] + body < end_of_stream:  # a last window flush with the end, so the stream's tail is scored too
        starts.append(end_of_stream - body)
    for step, begin in enumerate(starts):
        chunk = torch.cat([torch.tensor(bos, dtype=stream.dtype), stream[begin:begin + body]])
        score_from = scored_until - begin + len(bos)  # tokens before this were scored by an earlier window
        with layer_progress(model, f"sliding window [{step + 1}/{len(starts)}]", progress):
            nll, targets = token_nll(model, chunk, score_from=score_from, chunk_tokens=chunk_tokens)
        result.add_window(nll, begin + targets - len(bos), end_of_stream)
        scored_until = begin + body
    result.seconds = time.perf_counter() - started
    return result


def packed_rows_loss(model: nn.Module, tokens: torch.Tensor, starts: torch.Tensor) -> float:
    """Mean next-token loss over packed rows (:mod:`objectives.packing`), one row per forward, with the RoPE
    the model has now: through :func:`window_nll`'s chunked LM head, per-document positions, and documents'
    first tokens unscored, as in training. Leaves the model in eval mode."""
    model.eval()
    nll, count = 0.0, 0
    for row in range(len(tokens)):
        inputs = model_inputs(tokens[row:row + 1], starts[row:row + 1])
        row_nll, scored = window_nll(model, inputs["input_ids"], score_mask=~starts[row],
                                     position_ids=inputs["position_ids"])
        nll += row_nll
        count += scored
    return nll / count
