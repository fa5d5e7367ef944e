"""Perplexity of RoPE rescalings across lengths, from the command line.

    python -m objectives.evaluate --model smollm2-135m --methods none,pi,ntk,yarn \\
        --lengths 8192,16384 --samples 2 [--factors best_factors.json] [--json out.json]

Prints a table (method x length -> perplexity, seconds). The model is loaded
once; only its RoPE changes between methods.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from models.assets import AssetError
from models.baselines import BASELINES, baseline
from models.loading import DEFAULT_MODEL, ModelLoadError, load_model
from models.patch import patched
from models.rope import FactorError, RopeFactors, RopeGeometry
from objectives.data import EMBEDDED_CORPUS, WINDOW_MODES, DataError, load_windows
from objectives.perplexity import perplexity, sliding_window_perplexity

logger = logging.getLogger(__name__)


@dataclass
class EvaluationRow:
    method: str
    length: int
    perplexity: float
    seconds: float
    tokens: int
    windows: int


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m objectives.evaluate",
        description="Measure long-context perplexity of RoPE rescalings (baselines and factor files).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="short name, hub id, local model directory or .gguf file")
    parser.add_argument("--methods", default="none,pi,ntk,yarn",
                        help=f"comma-separated baselines among {', '.join(BASELINES)} (may be empty)")
    parser.add_argument("--factors", action="append", default=[], metavar="FILE",
                        help="a factor file (JSON) to evaluate as one more method; repeatable")
    parser.add_argument("--lengths", type=_int_list, default=[8192, 16384], help="window lengths in tokens")
    parser.add_argument("--samples", type=int, default=1, help="windows per length")
    parser.add_argument("--first-window", type=int, default=0, help="skip this many windows of the corpus")
    parser.add_argument("--data", default=EMBEDDED_CORPUS,
                        help="'essays', a .txt/.jsonl/.parquet path or directory, pg19, proof-pile, hf:NAME[:SPLIT]")
    parser.add_argument("--window-mode", choices=WINDOW_MODES, default=None,
                        help="documents: first tokens of each document; stream: consecutive windows "
                             "(default: stream for essays, documents otherwise)")
    parser.add_argument("--sliding-stride", type=int, default=None, metavar="TOKENS",
                        help="score the stream with a sliding window of each length moved by this stride "
                             "(over samples x length tokens) instead of separate windows")
    parser.add_argument("--original-length", type=int, default=None,
                        help="the model's pretrained window (default: from its config)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where native), float32, bfloat16, float16")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--attn", default="auto", help="attention implementation: auto, sdpa, eager, flash_attention_2")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def format_table(rows: list[EvaluationRow]) -> str:
    """Methods down, lengths across; each cell ``perplexity (seconds)``."""
    lengths = sorted({row.length for row in rows})
    methods = list(dict.fromkeys(row.method for row in rows))
    cells = {(row.method, row.length): f"{row.perplexity:8.2f} ({row.seconds:6.1f}s)" for row in rows}
    width = max(len(m) for m in methods + ["method"])
    header = f"{'method':<{width}} | " + " | ".join(f"{length:>18,}" for length in lengths)
    lines = [header, "-" * len(header)]
    for method in methods:
        values = " | ".join(f"{cells.get((method, length), '-'):>18}" for length in lengths)
        lines.append(f"{method:<{width}} | {values}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> list[EvaluationRow]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in BASELINES]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(BASELINES)}")
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, attn_implementation=args.attn)
    geometry = RopeGeometry.from_config(model.config)
    if args.original_length:
        geometry = RopeGeometry(geometry.rotary_dim, geometry.base, args.original_length)
    factor_files = [(Path(f).stem, RopeFactors.load(f, geometry)) for f in args.factors]
    rows = []
    for length in args.lengths:
        candidates = [(name, baseline(name, geometry, length)) for name in methods] + factor_files
        if args.sliding_stride:
            stream = load_windows(args.data, tokenizer, length * args.samples, 1,
                                  first_window=args.first_window, mode=args.window_mode)[0]
        else:
            windows = load_windows(args.data, tokenizer, length, args.samples,
                                   first_window=args.first_window, mode=args.window_mode)
        for name, factors in candidates:
            with patched(model, factors):
                if args.sliding_stride:
                    result = sliding_window_perplexity(model, stream, length, args.sliding_stride,
                                                       progress=not args.no_progress)
                else:
                    result = perplexity(model, windows, progress=not args.no_progress, desc=f"{name}@{length}")
            row = EvaluationRow(name, length, result.perplexity, result.seconds, result.tokens,
                                len(result.window_perplexities))
            logger.info("%s at %d tokens: perplexity %.3f (%.1fs)", name, length, row.perplexity, row.seconds)
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        rows = run(args)
    except (AssetError, ModelLoadError, FactorError, DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": args.model, "data": args.data,
                                         "results": [asdict(r) for r in rows]}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
