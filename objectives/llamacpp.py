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

BATCH_TOKENS = 512  # tokens decoded, and logits held, at once: 512 x a 152k vocabulary is 300 MiB


def load_gguf_runtime(path: str | Path, context_tokens: int, **context_params: Any):
    """A ``llama_cpp.Llama`` over ``path`` for :func:`gguf_nll`.

    ``context_params`` go to ``Llama`` as they are (llama.cpp's own RoPE scaling, for instance:
    ``rope_scaling_type``, ``rope_freq_scale``, ``yarn_orig_ctx``). Without ``logits_all`` its score buffer
    holds one batch's logits, not the whole context's (32k tokens of a 49k vocabulary: 6 GiB).
    """
    from llama_cpp import Llama  # imported here: only GGUF evaluation needs the compiled runtime

    return Llama(model_path=str(path), n_ctx=context_tokens, n_batch=min(context_tokens, BATCH_TOKENS),
                 n_ubatch=BATCH_TOKENS, n_threads=os.cpu_count(), verbose=False, **context_params)


def gguf_nll(runtime: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each token after the first of one window, as llama.cpp computes it.

    ``Llama.eval`` keeps every position's logits only with ``logits_all`` (n_ctx x vocab floats at once), so
    this decodes the window batch by batch itself, asking llama.cpp for every logit of a batch and scoring
    it before the next (through llama-cpp-python's own batch and context, pinned in constraints.txt).
    """
    tokens = input_ids.reshape(-1).tolist()
    if len(tokens) > runtime.n_ctx():
        raise ValueError(f"a {len(tokens):,}-token window does not fit llama.cpp's {runtime.n_ctx():,}-token context")
    runtime._ctx.kv_cache_seq_rm(-1, 0, -1)  # a previous window must not leak into this one
    losses = []
    for start in range(0, len(tokens) - 1, runtime.n_batch):
        batch = tokens[start:start + runtime.n_batch]
        runtime._batch.set_batch(batch=batch, n_past=start, logits_all=True)
        runtime._ctx.decode(runtime._batch)
        logits = np.ctypeslib.as_array(runtime._ctx.get_logits(), shape=(len(batch), runtime.n_vocab()))
        targets = torch.tensor(tokens[start + 1:start + len(batch) + 1])
        # the last token of the window has no target: its logits row is dropped
        losses.append(torch.nn.functional.cross_entropy(torch.from_numpy(logits[:len(targets)]), targets,
                                                        reduction="none"))
    return torch.cat(losses)


def gguf_perplexity(runtime: Any, windows: list[torch.Tensor]) -> float:
    """Perplexity over ``windows`` (every token after each window's first), as one mean like ours."""
    losses = torch.cat([gguf_nll(runtime, window) for window in windows])
    return math.exp(losses.mean().item())
