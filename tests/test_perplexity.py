"""Chunked perplexity equals the full-logits loss; sliding windows score every token once."""

from __future__ import annotations

import math

import pytest
import torch

from objectives import perplexity as perplexity_module
from objectives.perplexity import perplexity, sliding_window_perplexity, window_nll


def full_logits_nll(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        out = model(ids[None], labels=ids[None])
    return out.loss.item() * (ids.numel() - 1)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 64, 10_000])
def test_chunked_loss_equals_full_logits_loss(model, input_ids, chunk_tokens):
    ids = input_ids[0]
    nll, count = window_nll(model, ids, chunk_tokens=chunk_tokens)
    assert count == ids.numel() - 1
    assert nll == pytest.approx(full_logits_nll(model, ids), rel=1e-5)


def test_perplexity_is_token_weighted_over_windows(model, input_ids):
    windows = [input_ids[0, :50], input_ids[0, 50:150]]
    result = perplexity(model, windows, progress=False)
    nlls = [full_logits_nll(model, w) for w in windows]
    assert result.tokens == 49 + 99
    assert result.perplexity == pytest.approx(math.exp(sum(nlls) / 148), rel=1e-5)
    assert len(result.window_perplexities) == 2


def test_position_bins_hold_each_range_of_positions(model, input_ids):
    windows = [input_ids[0, :40], input_ids[0, 40:80]]
    result = perplexity(model, windows, progress=False, position_bins=4)
    assert result.position_tokens == [2 * 9, 2 * 10, 2 * 10, 2 * 10]  # position 0 is never scored
    assert sum(result.position_nll_sums) == pytest.approx(result.nll_sum, rel=1e-12)
    whole = perplexity(model, windows, progress=False)
    assert result.perplexity == pytest.approx(whole.perplexity, rel=1e-12)
    with torch.no_grad():
        losses = [torch.nn.functional.cross_entropy(model(w[None]).logits[0, :-1], w[1:], reduction="none")
                  for w in windows]
    last_quarter = torch.cat([loss[29:] for loss in losses])  # tokens 30..39 are predicted by positions 29..38
    assert result.position_perplexities[3] == pytest.approx(math.exp(last_quarter.mean().item()), rel=1e-5)
    with pytest.raises(ValueError, match="position_bins"):
        perplexity(model, windows, progress=False, position_bins=0)


def test_sliding_window_scores_each_token_once(model, input_ids):
    stream = input_ids[0]
    result = sliding_window_perplexity(model, stream, window=64, stride=32, progress=False)
    assert result.tokens == stream.numel() - 1  # every token after the first, exactly once
    separate = sliding_window_perplexity(model, stream, window=64, stride=64, progress=False)
    expected = perplexity(model, [stream[i:i + 64] for i in range(0, 192, 64)], progress=False)
    assert separate.perplexity == pytest.approx(expected.perplexity, rel=1e-6)
    # overlapping context helps a model that uses it; at least it must differ from separate windows
    assert result.perplexity != pytest.approx(separate.perplexity, rel=1e-9)


def test_sliding_window_position_bins_divide_the_stream(model, input_ids):
    stream = input_ids[0, :192]
    separate = sliding_window_perplexity(model, stream, window=64, stride=64, progress=False, position_bins=3)
    for position_bin in range(3):  # each range is one of the separate windows
        alone = perplexity(model, [stream[64 * position_bin:64 * (position_bin + 1)]], progress=False)
        assert separate.position_perplexities[position_bin] == pytest.approx(alone.perplexity, rel=1e-9)
    overlapping = sliding_window_perplexity(model, stream, window=64, stride=16, progress=False, position_bins=4,
                                            bos_token_id=0)
    assert overlapping.position_tokens == [48, 48, 48, 48]  # every token scored once (the tail by a last window)
    assert sum(overlapping.position_nll_sums) == pytest.approx(overlapping.nll_sum, rel=1e-12)


def test_sliding_window_rejects_short_text_and_bad_stride(model, input_ids):
    with pytest.raises(ValueError, match="too short"):
        sliding_window_perplexity(model, input_ids[0, :10], window=64, stride=32, progress=False)
    with pytest.raises(ValueError, match="stride"):
        sliding_window_perplexity(model, input_ids[0], window=64, stride=65, progress=False)


def test_score_mask_scores_only_the_masked_tokens(model, input_ids):
    ids = input_ids[0, :40]
    mask = torch.zeros(40, dtype=torch.bool)
    mask[[5, 6, 30]] = True
    nll, count = window_nll(model, ids, score_mask=mask)
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    expected = torch.nn.functional.cross_entropy(logits[[4, 5, 29]], ids[[5, 6, 30]], reduction="sum").item()
    assert count == 3
    assert nll == pytest.approx(expected, rel=1e-5)


def test_progress_bars_do_not_change_the_result(model, input_ids, monkeypatch):
    class RefreshingBar:  # tqdm.update returns True whenever it redraws, as it does on slow real forwards
        def __init__(self, **_):
            pass

        def update(self, _):
            return True

        def close(self):
            pass

    monkeypatch.setattr(perplexity_module, "tqdm", RefreshingBar)
    windows = [input_ids[0]]
    quiet = perplexity(model, windows, progress=False)
    shown = perplexity(model, windows, progress=True)
    assert shown.perplexity == quiet.perplexity


def reference_sliding_nll(model, stream: torch.Tensor, window: int, stride: int, bos: int) -> tuple[float, int]:
    """Summed NLL and scored tokens the way the LongRoPE reference (evaluation/perplexity.py) reads a stream:
    BOS prepended to window - 1 tokens, labels -100 except the tokens not scored by an earlier window."""
    body, seq_len, prev_end, nll, count = window - 1, stream.numel(), 0, 0.0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + body, seq_len)
        input_ids = torch.cat([torch.tensor([bos]), stream[begin:end]])[None]
        target = input_ids.clone()
        target[:, :-(end - prev_end)] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target).loss
        scored = int((target[:, 1:] != -100).sum())
        nll, count = nll + loss.item() * scored, count + scored
        prev_end = end
        if end == seq_len:
            break
    return nll, count


def test_sliding_window_with_bos_matches_the_reference(model, input_ids):
    stream = input_ids[0, :63 + 4 * 32]  # whole windows only: the reference ends on a shorter one otherwise
    result = sliding_window_perplexity(model, stream, window=64, stride=32, bos_token_id=5, progress=False)
    nll, count = reference_sliding_nll(model, stream, window=64, stride=32, bos=5)
    assert result.tokens == count == stream.numel()  # every token once, the first one too (predicted from BOS)
    assert result.nll_sum == pytest.approx(nll, rel=1e-5)


def test_sliding_windows_each_start_with_bos(model, input_ids):
    seen = []

    def record(_module, _args, kwargs):
        seen.append(kwargs["input_ids"][0].clone())

    handle = model.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    try:
        stream = input_ids[0]
        sliding_window_perplexity(model, stream, window=64, stride=32, bos_token_id=5, progress=False)
    finally:
        handle.remove()
    starts = list(range(0, stream.numel() - 63 + 1, 32))
    if starts[-1] + 63 < stream.numel():  # the last window ends flush with the stream
        starts.append(stream.numel() - 63)
    assert len(seen) == len(starts)
    for start, window in zip(starts, seen, strict=True):  # BOS prepended to the next 63 tokens, none replaced
        assert window.tolist() == [5, *stream[start:start + 63].tolist()]
    with pytest.raises(ValueError, match=r"stride <= window - 1 \(BOS takes one\)"):
        sliding_window_perplexity(model, stream, window=64, stride=64, bos_token_id=5, progress=False)
