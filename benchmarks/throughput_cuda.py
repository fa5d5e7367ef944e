"""Benchmark: a trial's long forward on a CUDA GPU, by attention kernel: tokens/s, FLOP utilisation, memory.

    python benchmarks/throughput_cuda.py                                   # the embedded model, 4k-128k
    python benchmarks/throughput_cuda.py --model DIR --random-weights      # a model's config alone

(a) Peaks of this GPU in bf16: matmul at 8192^3 (``--square``) and at the model's own shapes (``--shape-tokens``
rows), and causal ``scaled_dot_product_attention`` at the model's head layout with each kernel. (b) The forward a trial
runs (:func:`objectives.perplexity.window_nll` on the model patched with YaRN factors and LongRoPE start tokens,
as ``benchmarks/throughput.py`` does on a CPU) at each length with each attention kernel: SDPA held to its
flash, memory-efficient, cuDNN or math kernel, SDPA left to pick its kernel (as in a trial), and flash-attn 2
when it is installed. Each row gives the NLL per token (the same for every kernel, to bf16 rounding), the best
of ``--repeats`` forwards after a warm-up, tokens/s, the model FLOP utilisation (the forward's FLOPs over its
time, against (a)'s square matmul rate and against the datasheet's dense bf16 peak where the GPU is known) and
the peak GPU memory allocated. SDPA held to a kernel raises instead of falling back, so a row that fails says
the forward cannot take that kernel (a materialized mask cannot take flash, for instance).

Speed does not depend on the weights: ``--random-weights`` builds the model from its ``config.json`` alone, on a
machine that cannot reach the weights. ``--budget-s`` skips what would start after that many seconds, so a
short lease returns what it measured; the JSON is written after every row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.utils import is_flash_attn_2_available

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.throughput import part_flops, trial_factors  # noqa: E402
from models.loading import DEFAULT_MODEL, load_model  # noqa: E402
from models.patch import apply_factors  # noqa: E402
from models.precision import LayerShape, best_seconds  # noqa: E402
from objectives.perplexity import window_nll  # noqa: E402

SDPA_KERNELS = {"sdpa flash": SDPBackend.FLASH_ATTENTION, "sdpa memory-efficient": SDPBackend.EFFICIENT_ATTENTION,
                "sdpa cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa math": SDPBackend.MATH}
SDPA_DEFAULT = "sdpa default"  # SDPA picks its kernel, as it does in every trial
FLASH_ATTN_2 = "flash-attn 2"
# Dense bf16 tensor-core peaks from the vendors' datasheets (SXM parts), TFLOP/s; matched by name.
DATASHEET_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


def seconds(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best wall seconds of ``run`` (:func:`~models.precision.best_seconds`), the device synchronized after each
    call so that the work it queued is timed too."""
    def synchronized() -> None:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return best_seconds(synchronized, repeats)


def kernel_context(kernel: str) -> AbstractContextManager:
    """SDPA held to ``kernel`` (no fallback); flash-attn 2 is the model's attention implementation instead."""
    return sdpa_kernel(SDPA_KERNELS[kernel]) if kernel in SDPA_KERNELS else nullcontext()


def peaks(shape: LayerShape, vocab: int, square: int, shape_tokens: int, lengths: list[int], kernels: list[str],
          math_max_tokens: int, device: torch.device) -> dict[str, float]:
    """(a): bf16 TFLOP/s of the square and model-shape matmuls and of causal SDPA per kernel and length; the
    square matmul comes first. K and V have as many heads as Q, as the model's attention hands them over when
    it repeats the key-value heads."""
    def matmul(rows: int, inner: int, cols: int) -> float:
        x = torch.randn(rows, inner, device=device, dtype=torch.bfloat16)
        weight = torch.randn(cols, inner, device=device, dtype=torch.bfloat16)
        return 2.0 * rows * inner * cols / seconds(lambda: F.linear(x, weight), device, repeats=10) / 1e12

    q_width, kv_width = shape.q_width, shape.kv_width
    found = {f"matmul {square}x{square}x{square}": matmul(square, square, square),
             f"matmul {shape_tokens}x{shape.hidden}x{q_width} (q, o)": matmul(shape_tokens, shape.hidden, q_width),
             f"matmul {shape_tokens}x{shape.hidden}x{kv_width} (k, v)": matmul(shape_tokens, shape.hidden, kv_width),
             f"matmul {shape_tokens}x{shape.hidden}x{shape.intermediate} (gate, up)":
                 matmul(shape_tokens, shape.hidden, shape.intermediate),
             f"matmul {shape_tokens}x{shape.intermediate}x{shape.hidden} (down)":
                 matmul(shape_tokens, shape.intermediate, shape.hidden),
             f"matmul 2048x{shape.hidden}x{vocab} (lm-head chunk)": matmul(2048, shape.hidden, vocab)}
    for kernel in kernels:
        if kernel in SDPA_KERNELS:
            found.update({f"{kernel} causal {tokens}": sdpa_rate(shape, tokens, kernel, device) for tokens in lengths
                          if kernel != "sdpa math" or tokens <= math_max_tokens})
    return found


def sdpa_rate(shape: LayerShape, tokens: int, kernel: str, device: torch.device) -> float:
    """TFLOP/s of causal SDPA held to ``kernel`` at one layer's head layout; NaN where the kernel cannot run it."""
    q, k, v = (torch.randn(1, shape.heads, tokens, shape.head_dim, device=device, dtype=torch.bfloat16)
               for _ in range(3))
    try:
        with kernel_context(kernel), torch.inference_mode():
            run_s = seconds(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), device, 3)
    except (RuntimeError, torch.OutOfMemoryError):
        return float("nan")
    return shape.attention_flops(tokens) / run_s / 1e12


def build_model(args: argparse.Namespace, device: torch.device) -> PreTrainedModel:
    """The model in bf16 on ``device`` with SDPA: its weights, or random ones from its config (speed alone)."""
    if not args.random_weights:
        return load_model(args.model, dtype="bfloat16", device=str(device), attn_implementation="sdpa")[0]
    config = AutoConfig.from_pretrained(args.model)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def measure(model: PreTrainedModel, kernel: str, length: int, repeats: int, device: torch.device) -> dict:
    """(b): one row, the forward a trial runs at ``length`` tokens with ``kernel``."""
    model.set_attn_implementation("flash_attention_2" if kernel == FLASH_ATTN_2 else "sdpa")
    apply_factors(model, trial_factors(model, length))
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    row = {"kernel": kernel, "length": length}
    scores: list[tuple[float, int]] = []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        weights_gib = torch.cuda.memory_allocated(device) / 2 ** 30
    try:
        with kernel_context(kernel):
            row["seconds"] = seconds(lambda: scores.append(window_nll(model, ids)), device, repeats)
    except (RuntimeError, torch.OutOfMemoryError) as error:  # the kernel cannot run this forward
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        return row
    nll, count = scores[-1]
    row["nll_per_token"] = nll / count  # the same for every kernel, to bf16 rounding
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        row["beyond_weights_gib"] = row["peak_gib"] - weights_gib
    return row


def report(title: str, peak: dict[str, float], rows: list[dict], shape: LayerShape, layers: int, vocab: int,
           datasheet_tflops: float | None) -> None:
    print(f"# {title}\n\n## (a) Peaks, bf16 TFLOP/s\n\n| operation | TFLOP/s |\n|---|---|")
    for name, value in peak.items():
        print(f"| {name} | {value:.1f} |")
    matmul_peak = next(iter(peak.values()))  # the square matmul
    datasheet = f"{datasheet_tflops:.0f} TFLOP/s" if datasheet_tflops else "unknown for this GPU"
    print(f"\n## (b) The forward a trial runs, by attention kernel (datasheet dense bf16 peak: {datasheet})\n")
    print("| tokens | kernel | seconds | tokens/s | TFLOP/s | of matmul peak | of datasheet peak "
          "| attention FLOP share | peak GiB | beyond weights GiB | NLL/token |\n" + "|---" * 11 + "|")
    for row in rows:
        if "seconds" not in row:
            print(f"| {row['length']:,} | {row['kernel']} | {row.get('error', 'skipped')} |||||||")
            continue
        flops = part_flops(shape, layers, vocab, row["length"])
        achieved = sum(flops.values()) / row["seconds"] / 1e12
        of_datasheet = f"{achieved / datasheet_tflops:.0%}" if datasheet_tflops else "-"
        memory = (f"{row['peak_gib']:.2f} | {row['beyond_weights_gib']:.2f}" if "peak_gib" in row else "- | -")
        print(f"| {row['length']:,} | {row['kernel']} | {row['seconds']:.3f} | {row['length'] / row['seconds']:,.0f} "
              f"| {achieved:.1f} | {achieved / matmul_peak:.0%} | {of_datasheet} "
              f"| {flops['attention kernel'] / sum(flops.values()):.0%} | {memory} | {row['nll_per_token']:.4f} |")
    print("\nFLOPs: projections, MLP and lm-head at 2 per multiply-add, causal attention over the lower triangle "
          "(models.precision.LayerShape); norms, RoPE and the loss are not counted.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="short name, local directory or hub id")
    parser.add_argument("--random-weights", action="store_true",
                        help="build the model from its config.json with random weights (speed does not depend on them)")
    parser.add_argument("--lengths", default="4096,8192,16384,32768,65536,131072")
    parser.add_argument("--kernels", default=",".join([SDPA_DEFAULT, *SDPA_KERNELS, FLASH_ATTN_2]),
                        help="attention kernels to compare (flash-attn 2 only where it is installed)")
    parser.add_argument("--math-max-tokens", type=int, default=16384,
                        help="the math kernel materializes the L x L scores: not above this length")
    parser.add_argument("--square", type=int, default=8192, help="size of the square matmul whose rate is the peak")
    parser.add_argument("--shape-tokens", type=int, default=16384, help="rows of the model-shape matmuls in (a)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per row, after one warm-up")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="start nothing after this many seconds")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: the tests' smoke run
    parser.add_argument("--json", type=Path, default=Path("runs/throughput_cuda.json"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "throughput_cuda.py needs a CUDA GPU; on a CPU run benchmarks/throughput.py\n")
    device = torch.device(args.device)
    started = time.perf_counter()
    lengths = [int(length) for length in args.lengths.split(",")]
    kernels = [kernel for kernel in args.kernels.split(",") if kernel != FLASH_ATTN_2 or is_flash_attn_2_available()]
    model = build_model(args, device)
    shape, layers, vocab = LayerShape.from_config(model.config), model.config.num_hidden_layers, model.config.vocab_size
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    datasheet = next((tflops for name, tflops in DATASHEET_BF16_TFLOPS.items() if name in gpu), None)
    result = {"gpu": gpu, "torch": torch.__version__, "model": args.model, "random_weights": args.random_weights,
              "flash_attn_2_installed": is_flash_attn_2_available(), "rows": []}
    result["peaks_tflops"] = peaks(shape, vocab, args.square, args.shape_tokens, lengths, kernels,
                                   args.math_max_tokens, device)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    for length in lengths:
        for kernel in kernels:
            if time.perf_counter() - started > args.budget_s:
                result["rows"].append({"kernel": kernel, "length": length, "error": "skipped: over --budget-s"})
            elif kernel == "sdpa math" and length > args.math_max_tokens:
                continue
            else:
                result["rows"].append(measure(model, kernel, length, args.repeats, device))
            args.json.write_text(json.dumps(result, indent=1))
    weights = "random weights, " if args.random_weights else ""
    flash_attn_2 = "installed" if result["flash_attn_2_installed"] else "not installed"
    title = f"{args.model} ({weights}bf16) on {gpu}, torch {torch.__version__}, flash-attn 2 {flash_attn_2}"
    report(title, result["peaks_tflops"], result["rows"], shape, layers, vocab, datasheet)
    print(f"\nwrote {args.json} ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
