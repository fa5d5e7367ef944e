"""Benchmark: peak memory of scoring one long window in llama.cpp, llama-cpp-python's ``logits_all`` way
against :func:`objectives.llamacpp.gguf_nll`'s batch-by-batch way, side by side in one run.

    python benchmarks/llamacpp_memory.py [--length 16384] [--first-window 1]

With ``logits_all=True`` the ``Llama`` object holds a context-length x vocabulary float32 array of scores
(16k tokens of SmolLM2's 49k vocabulary: 3 GiB; 128k of Llama 3's 128k: 64 GiB); ``gguf_nll`` asks
llama.cpp for one batch's logits at a time and scores them before the next. Each way runs in a process of
its own (the embedded Q4_1 GGUF, unextended, on an essay window), so each peak resident set is its own;
both must give the same losses.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import time

import numpy as np
import torch

from models.loading import DEFAULT_MODEL, gguf_file, load_model
from models.precision import cpu_description
from objectives.data import load_windows
from objectives.llamacpp import BATCH_TOKENS, gguf_nll, load_gguf_runtime


def logits_all_nll(window: torch.Tensor) -> torch.Tensor:
    """The losses through ``Llama.eval`` with every position's logits kept (the stock way, and ``gguf_nll``'s
    until 2026-12-08), scored ``BATCH_TOKENS`` rows at a time so only the kept scores weigh."""
    tokens = window.reshape(-1).tolist()
    runtime = load_gguf_runtime(gguf_file(DEFAULT_MODEL), len(tokens), logits_all=True)
    runtime.eval(tokens)
    targets = torch.tensor(tokens[1:])
    logits = torch.from_numpy(np.asarray(runtime.scores[:len(targets)]))  # a view: no copy
    chunks = zip(logits.split(BATCH_TOKENS), targets.split(BATCH_TOKENS), strict=True)
    return torch.cat([torch.nn.functional.cross_entropy(rows, chunk, reduction="none") for rows, chunk in chunks])


def batched_nll(window: torch.Tensor) -> torch.Tensor:
    return gguf_nll(load_gguf_runtime(gguf_file(DEFAULT_MODEL), window.numel()), window)


def measure(way: str, window: torch.Tensor, results) -> None:
    started = time.perf_counter()
    losses = {"logits_all": logits_all_nll, "gguf_nll": batched_nll}[way](window)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    results.put((way, losses.mean().item(), peak_gib, time.perf_counter() - started))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=16384, help="window tokens (and llama.cpp's context)")
    parser.add_argument("--first-window", type=int, default=1, help="essay window (default: 1)")
    args = parser.parse_args()
    tokenizer = load_model(DEFAULT_MODEL, dtype="float32")[1]  # the parent only cuts the window
    window = load_windows("essays", tokenizer, args.length, 1, first_window=args.first_window)[0]
    print(f"machine: {cpu_description()[0]}, {os.cpu_count()} cores; {DEFAULT_MODEL} Q4_1 GGUF, essay window "
          f"{args.first_window} of {args.length:,} tokens, {BATCH_TOKENS}-token batches")

    context = multiprocessing.get_context("spawn")
    rows = {}
    for way in ("logits_all", "gguf_nll"):
        results = context.Queue()
        process = context.Process(target=measure, args=(way, window, results))
        process.start()
        rows[way] = results.get()
        process.join()
    print("| way | mean NLL | peak RSS (GiB) | seconds |\n|---|---|---|---|")
    for way, nll, peak_gib, seconds in rows.values():
        print(f"| {way} | {nll:.5f} | {peak_gib:.2f} | {seconds:.0f} |")
    (_, stock_nll, stock_gib, stock_s), (_, ours_nll, ours_gib, ours_s) = rows.values()
    print(f"gguf_nll / logits_all: peak memory {ours_gib / stock_gib:.2f}x, time {ours_s / stock_s:.2f}x, "
          f"mean NLL differs by {abs(ours_nll - stock_nll):.1e}")


if __name__ == "__main__":
    main()
