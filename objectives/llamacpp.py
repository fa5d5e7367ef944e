"""Perplexity of a GGUF in llama.cpp (through llama-cpp-python), on token ids we give it.

Feeding ids rather than text makes the number comparable with :func:`objectives.perplexity.window_nll` on
the same window: both score every token after the first, with no special tokens added.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

LOGITS_CHUNK_TOKENS = 1024  # log-softmax in chunks: a 16k window of 49k-way logits is 3 GiB at once


def load_gguf_runtime(path: str | Path, context_tokens: int, **context_params: Any):
    """A ``llama_cpp.Llama`` over ``path`` that keeps every position's logits.

    ``context_params`` go to ``Llama`` as they are (llama.cpp's own RoPE scaling, for instance:
    ``rope_scaling_type``, ``rope_freq_scale``, ``yarn_orig_ctx``).
    """
    from llama_cpp import Llama  # imported here: only GGUF evaluation needs the compiled runtime

    return Llama(model_path=str(path), n_ctx=context_tokens, n_batch=min(context_tokens, 2048),
                 n_ubatch=512, logits_all=True, n_threads=os.cpu_count(), verbose=False, **context_params)


def gguf_nll(runtime: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each token after the first of one window, as llama.cpp computes it."""
    tokens = input_ids.reshape(-1).tolist()
    if len(tokens) > runtime.n_ctx():
        raise ValueError(f"a {len(tokens):,}-token window does not fit llama.cpp's {runtime.n_ctx():,}-token context")
    runtime.reset()  # eval then drops the whole KV cache: a previous window must not leak into this one
    runtime.eval(tokens)
    losses = []
    for start in range(0, len(tokens) - 1, LOGITS_CHUNK_TOKENS):
        stop = min(start + LOGITS_CHUNK_TOKENS, len(tokens) - 1)
        logits = torch.from_numpy(np.asarray(runtime.scores[start:stop], dtype=np.float32))
        targets = torch.tensor(tokens[start + 1:stop + 1])
        losses.append(torch.nn.functional.cross_entropy(logits, targets, reduction="none"))
    return torch.cat(losses)


def gguf_perplexity(runtime: Any, windows: list[torch.Tensor]) -> float:
    """Perplexity over ``windows`` (every token after each window's first), as one mean like ours."""
    losses = torch.cat([gguf_nll(runtime, window) for window in windows])
    return math.exp(losses.mean().item())
