"""Benchmark: how close a trial's long forward runs to this machine's peak, and its memory by length.

    python benchmarks/throughput.py                                    # 4k-32k, ~20 min on 2 AVX2 cores
    python benchmarks/throughput.py --lengths 65536 --no-peaks --variants none   # does 64k fit?

(a) Peaks: matmul GFLOP/s in fp32 and bf16 at a large square size and at the model's own shapes (the
q/k/v/o, MLP and lm-head products at ``--shape-tokens``), and causal ``scaled_dot_product_attention`` at
the model's head layout. (b) The forward a trial runs (:func:`objectives.perplexity.window_nll` on the
model patched with LongRoPE-style factors and start tokens, so our hook runs) at each length, timed by
part with forward hooks: attention kernel, q/k/v/o projections, MLP, norms, RoPE (the rotary module and
our start-token hook), the rest of attention (applying RoPE, reshapes), the lm-head and the loss; each
part's FLOPs, GFLOP/s and ratio to the peak of (a). The forward's ratio to the peak of its mix is its
FLOPs over the time they would take at (a)'s square-matmul peak for the matmul FLOPs and (a)'s SDPA rate
for the attention FLOPs. (c) Peak resident memory (``ru_maxrss``) per length, each length in a fresh
process. (d) Variants at ``--variant-length``: the forward as trials run it next to one change each, so
what a change buys is a ratio measured in the same run. One table is printed and JSON written.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from models.baselines import baseline  # noqa: E402
from models.loading import DEFAULT_MODEL, load_model  # noqa: E402
from models.patch import apply_factors  # noqa: E402
from models.precision import LayerShape, best_seconds, cpu_description  # noqa: E402
from models.rope import RopeFactors, RopeGeometry  # noqa: E402
from objectives.perplexity import layer_progress, window_nll  # noqa: E402

START_TOKENS = 4  # so the start-token hook runs, as in a LongRoPE trial
VARIANTS = ("as trials run", "no progress hooks", "inference_mode", "other dtype", "torch.compile")


def rate(run: Callable[[], object], flops: float, repeats: int = 3) -> float:
    """Best GFLOP/s of ``run`` over ``repeats`` calls after one warm-up call."""
    return flops / best_seconds(run, repeats) / 1e9


def matmul_rate(rows: int, inner: int, cols: int, dtype: torch.dtype) -> float:
    """GFLOP/s of ``F.linear`` (the model's own call, which may take another kernel than ``@``)."""
    x, weight = torch.randn(rows, inner).to(dtype), torch.randn(cols, inner).to(dtype)
    with torch.inference_mode():
        return rate(lambda: F.linear(x, weight), 2.0 * rows * inner * cols)


def sdpa_rate(tokens: int, shape: LayerShape, dtype: torch.dtype) -> float:
    q = torch.randn(1, shape.heads, tokens, shape.head_dim).to(dtype)
    k, v = (torch.randn(1, shape.kv_heads, tokens, shape.head_dim).to(dtype) for _ in range(2))
    gqa = shape.heads != shape.kv_heads
    with torch.inference_mode():
        return rate(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa),
                    shape.attention_flops(tokens), repeats=1)


def largest_quick_square(dtype: torch.dtype, budget_s: float = 1.0) -> int:
    """The largest square size up to 4096 whose matmul takes under ``budget_s`` here (emulated bf16 is slow)."""
    size = 512
    while size < 4096:
        a = torch.randn(2 * size, 2 * size).to(dtype)
        started = time.perf_counter()
        F.linear(a, a)
        if time.perf_counter() - started > budget_s:
            break
        size *= 2
    return size


def peaks(shape: LayerShape, vocab: int, shape_tokens: int, attention_lengths: list[int]) -> dict:
    """(a): GFLOP/s by dtype and operation; ``square`` holds the square size each dtype was measured at."""
    found: dict[str, dict[str, float]] = {"square": {}}
    q_width, kv_width = shape.q_width, shape.kv_width
    shapes = {f"matmul {shape_tokens}x{shape.hidden}x{q_width} (q, o)": (shape_tokens, shape.hidden, q_width),
              f"matmul {shape_tokens}x{shape.hidden}x{kv_width} (k, v)": (shape_tokens, shape.hidden, kv_width),
              f"matmul {shape_tokens}x{shape.hidden}x{shape.intermediate} (gate, up)":
                  (shape_tokens, shape.hidden, shape.intermediate),
              f"matmul {shape_tokens}x{shape.intermediate}x{shape.hidden} (down)":
                  (shape_tokens, shape.intermediate, shape.hidden),
              f"matmul 2048x{shape.hidden}x{vocab} (lm-head chunk)": (2048, shape.hidden, vocab)}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        size = largest_quick_square(dtype)
        found["square"][name] = size
        rates = {"matmul square": matmul_rate(size, size, size, dtype)}
        rates.update({op: matmul_rate(*dims, dtype) for op, dims in shapes.items()})
        rates.update({f"sdpa causal {tokens}": sdpa_rate(tokens, shape, dtype) for tokens in attention_lengths})
        found[name] = rates
    return found


class PartTimer:
    """Seconds spent in each part of the forward, from forward hooks and a wrapped attention function."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.seconds: dict[str, float] = defaultdict(float)

    def _timed(self, module: torch.nn.Module, part: str) -> list:
        started: list[float] = []

        def before(*_) -> None:
            started.append(time.perf_counter())

        def after(*_) -> None:
            self.seconds[part] += time.perf_counter() - started.pop()

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    @contextmanager
    def __call__(self):
        decoder = self.model.get_decoder()
        handles = self._timed(decoder, "decoder") + self._timed(self.model.get_output_embeddings(), "lm-head")
        handles += self._timed(decoder.rotary_emb, "RoPE (rotary module, start-token hook)")
        handles += self._timed(decoder.norm, "norms")
        for layer in decoder.layers:
            attention = layer.self_attn
            handles += self._timed(attention, "attention block")
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                handles += self._timed(getattr(attention, name), "q/k/v/o projections")
            handles += self._timed(layer.mlp, "MLP")
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                handles += self._timed(norm, "norms")
        implementation = self.model.config._attn_implementation
        kernel = ALL_ATTENTION_FUNCTIONS[implementation]

        def timed_kernel(*args, **kwargs):
            started = time.perf_counter()
            try:
                return kernel(*args, **kwargs)
            finally:
                self.seconds["attention kernel"] += time.perf_counter() - started

        ALL_ATTENTION_FUNCTIONS[implementation] = timed_kernel
        try:
            yield self
        finally:
            ALL_ATTENTION_FUNCTIONS[implementation] = kernel
            for handle in handles:
                handle.remove()

    def parts(self, total_s: float) -> dict[str, float]:
        """Disjoint parts that add up to ``total_s``."""
        s = dict(self.seconds)
        inside_attention = s["attention kernel"] + s["q/k/v/o projections"]
        parts = {"attention kernel": s["attention kernel"], "q/k/v/o projections": s["q/k/v/o projections"],
                 "MLP": s["MLP"], "norms": s["norms"], "RoPE (rotary module, start-token hook)":
                     s["RoPE (rotary module, start-token hook)"],
                 "rest of attention (apply RoPE, reshapes)": s["attention block"] - inside_attention}
        parts["rest of decoder (embedding, residuals, masks)"] = s["decoder"] - sum(parts.values())
        parts["lm-head"] = s["lm-head"]
        parts["loss (log-softmax, gather)"] = total_s - s["decoder"] - s["lm-head"]
        return parts


def part_flops(shape: LayerShape, layers: int, vocab: int, tokens: int) -> dict[str, float]:
    projections = shape.projection_flops(tokens)
    return {"attention kernel": layers * shape.attention_flops(tokens),
            "q/k/v/o projections": layers * projections["q/k/v/o projections"],
            "MLP": layers * projections["MLP"], "lm-head": 2.0 * (tokens - 1) * shape.hidden * vocab}


def trial_factors(model: torch.nn.Module, length: int) -> RopeFactors:
    """YaRN's factors with LongRoPE's start tokens: a trial's patch with every hook we add."""
    geometry = RopeGeometry.from_config(model.config)
    return replace(baseline("yarn", geometry, max(length, geometry.original_length)), start_tokens=START_TOKENS)


def measure_length(args: argparse.Namespace) -> dict:
    """One forward at ``args.child_length`` in this (fresh) process: parts, seconds, peak memory."""
    length, variant = args.child_length, args.variant
    model, _ = load_model(args.model, dtype=args.dtype)
    if variant == "other dtype":  # the type that --dtype did not give
        model, _ = load_model(args.model, dtype="bfloat16" if model.dtype == torch.float32 else "float32")
    apply_factors(model, trial_factors(model, length))
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    timer = PartTimer(model)
    if variant == "torch.compile":
        for layer in model.get_decoder().layers:  # in place: the decoder stays what window_nll calls
            layer.compile(dynamic=False)
        started = time.perf_counter()
        window_nll(model, ids)  # compiles at this length
        compile_s = time.perf_counter() - started
    progress = variant in ("as trials run", "other dtype", "inference_mode")  # compiled layers take no hooks
    grad_mode = torch.inference_mode() if variant == "inference_mode" else nullcontext()
    parts_timed = variant == "as trials run" and not args.no_parts
    with grad_mode, layer_progress(model, f"{length:,} tokens", progress), (timer() if parts_timed else nullcontext()):
        started = time.perf_counter()
        window_nll(model, ids)
        total_s = time.perf_counter() - started
    result = {"length": length, "variant": variant, "dtype": str(model.dtype).removeprefix("torch."),
              "seconds": total_s, "rss_loaded_gib": rss_loaded,
              "rss_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    if parts_timed:
        result["parts_s"] = timer.parts(total_s)
    if variant == "torch.compile":
        result["compile_s"] = compile_s - total_s
    return result


def in_fresh_process(args: argparse.Namespace, length: int, variant: str) -> dict:
    command = [sys.executable, __file__, "--model", args.model, "--dtype", args.dtype, "--child-length",
               str(length), "--variant", variant] + (["--no-parts"] if args.no_parts else [])
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        return {"length": length, "variant": variant, "error": f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def forward_ratios(run: dict, rates: dict[str, float], flops: dict[str, float]) -> dict[str, float]:
    """The forward's share of the matmul peak and of the peak for its mix of matmul and attention FLOPs;
    empty without peaks."""
    matmul_peak = max((value for name, value in rates.items() if name.startswith("matmul")), default=None)
    attention_rates = [value for name, value in rates.items() if name.startswith("sdpa")]
    if not matmul_peak or not attention_rates:
        return {}
    attention_peak = rates.get(f"sdpa causal {run['length']}", attention_rates[-1])
    attention = flops["attention kernel"]
    ideal_s = (sum(flops.values()) - attention) / (matmul_peak * 1e9) + attention / (attention_peak * 1e9)
    return {"matmul_peak": matmul_peak, "mix": ideal_s / run["seconds"],
            "matmul": sum(flops.values()) / run["seconds"] / 1e9 / matmul_peak}


def report(machine: str, peak: dict, runs: list[dict], variants: list[dict], shape: LayerShape, layers: int,
           vocab: int) -> None:
    print(f"# Throughput on {machine}\n")
    if peak:
        dtypes = [name for name in peak if name != "square"]
        print("## (a) Peaks, GFLOP/s\n\n| operation | " + " | ".join(dtypes) + " |\n|---|" + "---|" * len(dtypes))
        for name in peak[dtypes[0]]:
            print(f"| {name} | " + " | ".join(f"{peak[dtype][name]:.1f}" for dtype in dtypes) + " |")
        print("\nsquare sizes: " + ", ".join(f"{dtype} {size}" for dtype, size in peak["square"].items()))
    summary = []
    for run in runs:
        if "error" in run:
            print(f"\n## {run['length']:,} tokens: failed ({run['error']})")
            continue
        flops = part_flops(shape, layers, vocab, run["length"])
        ratios = forward_ratios(run, peak.get(run["dtype"], {}), flops)
        summary.append((run, ratios, flops))
        if "parts_s" not in run:
            continue
        print(f"\n## (b) {run['length']:,} tokens by part\n")
        print("| part | seconds | share | GFLOP | GFLOP/s | of matmul peak |\n|---|---|---|---|---|---|")
        for part, seconds in run["parts_s"].items():
            line = f"| {part} | {seconds:.2f} | {seconds / run['seconds']:.1%} |"
            if part in flops:
                achieved = flops[part] / seconds / 1e9
                share = f"{achieved / ratios['matmul_peak']:.0%}" if ratios else "-"
                line += f" {flops[part] / 1e9:,.0f} | {achieved:.1f} | {share} |"
            else:
                line += " - | - | - |"
            print(line)
    print("\n## (b, c) The forward by length: speed, its share of the peaks of (a), peak resident memory\n")
    print("| tokens | dtype | seconds | tokens/s | GFLOP/s | of its mix's peak | of the matmul peak "
          "| attention kernel share | peak resident GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run, ratios, flops in summary:
        mix = f"{ratios['mix']:.0%} | {ratios['matmul']:.0%}" if ratios else "- | -"
        attention = f"{run['parts_s']['attention kernel'] / run['seconds']:.0%}" if "parts_s" in run else "-"
        gflops = sum(flops.values()) / run["seconds"] / 1e9
        print(f"| {run['length']:,} | {run['dtype']} | {run['seconds']:.1f} | {run['length'] / run['seconds']:,.0f} "
              f"| {gflops:.1f} | {mix} | {attention} | {run['rss_peak_gib']:.2f} |")
    if summary and summary[0][1]:
        print("\nits mix's peak: the forward's matmul FLOPs at the best matmul rate of (a), its attention FLOPs "
              "at (a)'s SDPA rate at that length (the longest measured beyond)")
    if variants:
        reference = variants[0]
        print(f"\n## (d) Variants at {reference['length']:,} tokens (each in a fresh process)\n")
        print("| variant | dtype | seconds | speed vs as trials run | peak resident GiB | note |")
        print("|---|---|---|---|---|---|")
        for run in variants:
            if "error" in run:
                print(f"| {run['variant']} | - | - | - | - | failed: {run['error']} |")
                continue
            note = f"compiling took {run['compile_s']:.0f} s more" if "compile_s" in run else ""
            print(f"| {run['variant']} | {run['dtype']} | {run['seconds']:.1f} | "
                  f"{reference['seconds'] / run['seconds']:.2f}x | {run['rss_peak_gib']:.2f} | {note} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dtype", default="auto", help="the type trials run in (auto: measured fastest)")
    parser.add_argument("--lengths", default="4096,8192,16384,32768")
    parser.add_argument("--shape-tokens", type=int, default=16384, help="rows of the model-shape matmuls in (a)")
    parser.add_argument("--no-peaks", action="store_true", help="skip (a); (b) then has no ratios")
    parser.add_argument("--no-parts", action="store_true", help="no part hooks in (b): the total alone")
    parser.add_argument("--variant-length", type=int, default=8192)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated among: {', '.join(VARIANTS)}; or none")
    parser.add_argument("--json", type=Path, default=Path("runs/throughput.json"))
    parser.add_argument("--child-length", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="as trials run", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_length:
        print(json.dumps(measure_length(args)))
        return

    model, _ = load_model(args.model, dtype="float32")
    shape, layers, vocab = LayerShape.from_config(model.config), model.config.num_hidden_layers, model.config.vocab_size
    del model
    lengths = [int(length) for length in args.lengths.split(",")]
    machine = (f"{platform.machine()} {cpu_description()[0]}, {torch.get_num_threads()} torch threads on "
               f"{os.cpu_count()} CPUs, torch {torch.__version__}, {args.model}")
    attention_lengths = sorted({min(lengths), *(length for length in lengths if length <= 16384)})
    peak = {} if args.no_peaks else peaks(shape, vocab, args.shape_tokens, attention_lengths)
    runs = [in_fresh_process(args, length, "as trials run") for length in lengths]
    chosen = [] if args.variants == "none" else args.variants.split(",")
    variants = [in_fresh_process(args, args.variant_length, variant) for variant in chosen]
    report(machine, peak, runs, variants, shape, layers, vocab)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine, "peaks_gflops": peak, "lengths": runs,
                                     "variants": variants}, indent=1))
    print(f"\nJSON: {args.json}")


if __name__ == "__main__":
    main()
