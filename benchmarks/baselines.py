"""Benchmark: baseline perplexity at 8k/16k and fp32 vs bf16 throughput, measured in one run.

    python benchmarks/baselines.py [--lengths 8192,16384] [--throughput-length 2048] [--json FILE]

Prints two markdown tables for the README: perplexity (method x length) on the
embedded essays, and forward tokens per second of fp32 and bf16 on the same
window, timed alternately so both see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from hpo.cli import comma_separated
from hpo.evaluate import TaskInputs, evaluate, format_table
from models.loading import DEFAULT_MODEL, load_model
from models.rope import RopeGeometry
from objectives.data import load_windows
from objectives.perplexity import window_nll


def throughput(model_name: str, length: int, repeats: int) -> dict[str, float]:
    """Tokens per second of one forward + chunked loss, fp32 and bf16 timed alternately."""
    loaded = {name: load_model(model_name, dtype=name) for name in ("float32", "bfloat16")}
    models = {name: model for name, (model, _) in loaded.items()}
    tokenizer = loaded["float32"][1]
    window = load_windows("essays", tokenizer, length, 1)[0]
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():  # warm-up: first calls pay for kernel selection
        window_nll(model, window[:256])
    for _ in range(repeats):
        for name, model in models.items():
            started = time.perf_counter()
            window_nll(model, window)
            seconds[name].append(time.perf_counter() - started)
    return {name: length / statistics.median(values) for name, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--lengths", type=comma_separated(int), default=(8192, 16384))
    parser.add_argument("--methods", default="none,pi,ntk,yarn")
    parser.add_argument("--throughput-length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    started = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype="float32")
    rows = evaluate(model, tokenizer, RopeGeometry.from_config(model.config), args.methods.split(","), [], ["ppl"],
                    list(args.lengths), TaskInputs(progress=False))
    print("\n## Perplexity on the essays (first window, fp32)\n")
    print(format_table(rows))

    rates = throughput(args.model, args.throughput_length, args.repeats)
    print(f"\n## Throughput, {args.throughput_length:,}-token window, median of {args.repeats}\n")
    print("| dtype | tokens/s |\n|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:,.1f} |")
    print(f"\nbf16 / fp32 speed ratio: {rates['bfloat16'] / rates['float32']:.2f}x")
    print(f"total wall time: {time.perf_counter() - started:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({"perplexity": [vars(r) for r in rows], "tokens_per_s": rates}, indent=2))


if __name__ == "__main__":
    main()
