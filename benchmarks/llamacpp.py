"""Benchmark: perplexity in real llama.cpp of the embedded GGUF, unextended, with llama.cpp's own YaRN, and
exported with our factors, next to our patched transformers model on the same windows, in one run.

    python benchmarks/llamacpp.py [--factors docs/results/smollm2_16k/best_factors.json] \\
        [--first-window 1] [--samples 1] [--json FILE]

The windows default to essay window 1, which ``smollm2_16k`` held out. Rows:
- ``transformers``: our patched model (dequantized fp32), with the factors' start tokens and without them
  (a GGUF cannot carry n_hat);
- ``llama.cpp``: the embedded Q4_1 GGUF as it is, with llama.cpp's YaRN (``rope_scaling_type=yarn``, frequency
  scale 1/s over the original window), with YaRN's factors exported as ``rope_freqs``, and with the given
  factors exported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch
from llama_cpp import LLAMA_ROPE_SCALING_TYPE_YARN

from models.baselines import yarn
from models.gguf_export import extend_gguf
from models.loading import DEFAULT_MODEL, gguf_file, load_model
from models.patch import patched
from models.precision import cpu_description
from models.rope import RopeFactors, RopeGeometry
from objectives.data import load_windows
from objectives.llamacpp import gguf_perplexity, load_gguf_runtime
from objectives.perplexity import perplexity

DEFAULT_FACTORS = Path("docs/results/smollm2_16k/best_factors.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factors", type=Path, default=DEFAULT_FACTORS, help="the searched factors to export")
    parser.add_argument("--first-window", type=int, default=1, help="first essay window (default: 1, held out)")
    parser.add_argument("--samples", type=int, default=1, help="windows of the factors' target length")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_llamacpp"), help="where the GGUFs go")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    model, tokenizer = load_model(DEFAULT_MODEL, dtype="float32")
    geometry = RopeGeometry.from_config(model.config)
    searched = RopeFactors.load(args.factors, geometry)
    length = searched.target_length
    windows = load_windows("essays", tokenizer, length, args.samples, first_window=args.first_window)
    source = gguf_file(DEFAULT_MODEL)
    machine = f"{cpu_description()[0]}, {os.cpu_count()} cores"
    print(f"machine: {machine}, torch {torch.__version__}, {platform.python_version()}; "
          f"{args.samples} essay window(s) of {length:,} tokens from window {args.first_window}")

    rows = []

    def record(runtime: str, method: str, value: float, started: float) -> None:
        rows.append({"runtime": runtime, "method": method, "perplexity": value,
                     "seconds": time.perf_counter() - started})
        print(f"| {runtime} | {method} | {value:.3f} | {rows[-1]['seconds']:.0f} |", flush=True)

    print("\n| runtime | RoPE | perplexity | s |\n|---|---|---|---|")
    no_start_tokens = dataclasses.replace(searched, start_tokens=0)
    yarn_factors = yarn(geometry, length)
    for method, factors in ((f"searched, n_hat={searched.start_tokens}", searched),
                            ("searched, n_hat=0", no_start_tokens), ("yarn (ours)", yarn_factors)):
        started = time.perf_counter()
        with patched(model, factors):
            record("transformers fp32", method, perplexity(model, windows, progress=False).perplexity, started)
    del model

    args.work.mkdir(parents=True, exist_ok=True)
    llama_yarn = {"rope_scaling_type": LLAMA_ROPE_SCALING_TYPE_YARN, "rope_freq_scale": 1 / searched.scale,
                  "yarn_orig_ctx": searched.original_length}
    candidates = [("none (as shipped)", source, {}), ("llama.cpp yarn", source, llama_yarn),
                  ("yarn as rope_freqs", extend_gguf(source, args.work / "yarn.gguf", yarn_factors), {}),
                  ("searched as rope_freqs", extend_gguf(source, args.work / "searched.gguf", searched), {})]
    for method, path, params in candidates:
        started = time.perf_counter()
        runtime = load_gguf_runtime(path, length, **params)
        record("llama.cpp Q4_1", method, gguf_perplexity(runtime, windows), started)
        del runtime
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine, "length": length, "factors": str(args.factors),
                                         "first_window": args.first_window, "samples": args.samples,
                                         "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
