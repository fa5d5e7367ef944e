"""Evaluate RoPE rescalings on long-context tasks: the one evaluation entry point.

    python -m hpo.evaluate --model smollm2-135m --methods none,pi,ntk,yarn \\
        --lengths 8192,16384 --samples 2 [--factors best_factors.json] [--json out.json] [--csv out.csv]
    python -m hpo.evaluate --study smollm2_16k [--out runs/smollm2_16k | --storage URL] \\
        --tasks ppl,passkey,needle-ppl --lengths 8192,16384 --samples 2 --seed 0

Candidates are the baselines of ``--methods`` (and ``config``: the model's own RoPE,
unpatched, so an exported ``longrope`` model is measured as stock transformers runs it,
short factors within its original window and long ones beyond), each ``--factors`` file,
and with ``--study`` the best factors of that study (read from its storage, or from
``DIR/best_factors.json`` when the directory has no ``study.db``). Tasks:

- ``ppl``: perplexity of ``samples`` windows of each length (or a sliding window);
- ``passkey``: passkey retrieval (:mod:`objectives.passkey`), ``samples`` prompts
  in each of ``--depth-bins`` depth ranges, accuracy per length and depth;
- ``needle-ppl``: LongRoPE2's needle-driven perplexity (:mod:`objectives.needle`);
- ``ruler``: RULER's synthetic tasks through lm-eval (:mod:`objectives.ruler`), or ``ruler:TASK`` for one
  of them (the essay-haystack tasks read the embedded essays), ``samples`` generations per task and length.

The model is loaded once; only its RoPE changes between candidates. The result
is a tidy table, one row per (method, task, length, depth): printed, and written
as CSV and JSON (with ``--study``, by default ``DIR/evaluation.csv`` and ``.json``),
which :func:`read_results` and the reports in :mod:`dashboards` read.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable, Collection
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from hpo.cli import add_dtype_argument, checked_dtype, comma_separated, command, configure_logging, positive
from hpo.records import EVALUATION_FILE, RULER_PREFIX, EvaluationRow, study_dir, study_factors, write_results
from models.baselines import BASELINES, HAND_MADE_NAMES, baseline, is_baseline
from models.loading import DEFAULT_MODEL, load_model
from models.patch import patched
from models.rope import RopeFactors, RopeGeometry
from objectives.data import EMBEDDED_CORPUS, WINDOW_MODES, load_documents, load_windows
from objectives.needle import needle_windows
from objectives.passkey import evaluate_passkey, group_by_depth, passkey_prompts
from objectives.perplexity import PerplexityResult, perplexity, sliding_window_perplexity
from objectives.ruler import ESSAY_TASKS, RULER_TASKS, SYNTHETIC_TASKS, evaluate_ruler

logger = logging.getLogger(__name__)

TASKS = ("ppl", "passkey", "needle-ppl", "ruler", *(RULER_PREFIX + task for task in RULER_TASKS))
CONFIG_METHOD = "config"  # no patch: the RoPE the model's config defines
DEFAULT_LENGTHS = [8192, 16384]
POSITION_BLOCK = "ppl by position"  # the printed table's block of ppl rows per position range
# ----------------------------------------------------------------------------------------------------------------
# Tasks. Each prepares its inputs once per length and returns a function that measures the model
# with whatever RoPE it has at call time, so every candidate sees the same windows and prompts.

Measure = Callable[[str], list[EvaluationRow]]


@dataclass(frozen=True)
class TaskInputs:
    """What the tasks read and how much of it: the same for every candidate and length."""

    data: str = EMBEDDED_CORPUS  # a corpus name or path (objectives.data.load_windows)
    samples: int = 1  # windows per length (ppl, needle-ppl), prompts per depth bin (passkey), per task (ruler)
    first_window: int = 0  # windows of the corpus to skip
    window_mode: str | None = None  # objectives.data.WINDOW_MODES; None: the corpus's own
    sliding_stride_tokens: int | None = None  # ppl: one sliding window over the stream instead of separate windows
    position_bins: int = 1  # ppl: also a row per equal range of positions in the windows
    depth_bins: int = 5  # passkey: equal depth ranges the keys are drawn in
    needles: int = 4  # needle-ppl: needles per window
    seed: int = 0  # of the passkey keys and depths and the needles
    progress: bool = True


def _perplexity_task(inputs: TaskInputs, model, tokenizer, length: int) -> Measure:
    if inputs.sliding_stride_tokens:
        stream = load_windows(inputs.data, tokenizer, length * inputs.samples, 1, first_window=inputs.first_window,
                              mode=inputs.window_mode, add_bos=False)[0]

        def score(name: str) -> PerplexityResult:
            return sliding_window_perplexity(model, stream, length, inputs.sliding_stride_tokens,
                                             bos_token_id=tokenizer.bos_token_id, progress=inputs.progress,
                                             position_bins=inputs.position_bins)
    else:
        windows = load_windows(inputs.data, tokenizer, length, inputs.samples, first_window=inputs.first_window,
                               mode=inputs.window_mode)

        def score(name: str) -> PerplexityResult:
            return perplexity(model, windows, progress=inputs.progress, desc=f"{name}@{length}",
                              position_bins=inputs.position_bins)

    def measure(name: str) -> list[EvaluationRow]:
        result = score(name)
        windows_read = len(result.window_perplexities)
        overall = EvaluationRow(name, length, result.seconds, result.tokens, windows_read, task="ppl",
                                perplexity=result.perplexity)
        if inputs.position_bins == 1:
            return [overall]
        # one row per position range, its depth the range's centre: where in the window the loss grows
        return [overall, *(EvaluationRow(name, length, 0.0, tokens, windows_read, task="ppl", perplexity=value,
                                         depth=(index + 0.5) / inputs.position_bins)
                           for index, (tokens, value) in enumerate(zip(result.position_tokens,
                                                                       result.position_perplexities, strict=True)))]

    return measure


def _needle_task(inputs: TaskInputs, model, tokenizer, length: int) -> Measure:
    windows = load_windows(inputs.data, tokenizer, length, inputs.samples, first_window=inputs.first_window,
                           mode=inputs.window_mode)
    windows, masks = needle_windows(windows, tokenizer, inputs.needles, seed=inputs.seed)

    def measure(name: str) -> list[EvaluationRow]:
        result = perplexity(model, windows, score_masks=masks, progress=inputs.progress,
                            desc=f"{name}@{length} needles")
        return [EvaluationRow(name, length, result.seconds, result.tokens, len(windows), task="needle-ppl",
                              perplexity=result.perplexity)]

    return measure


def _passkey_task(inputs: TaskInputs, model, tokenizer, length: int) -> Measure:
    prompts = passkey_prompts(tokenizer, length, inputs.samples, depth_bins=inputs.depth_bins, seed=inputs.seed)

    def measure(name: str) -> list[EvaluationRow]:
        outcomes = evaluate_passkey(model, tokenizer, prompts, progress=inputs.progress,
                                    desc=f"{name}@{length} passkey")
        return [EvaluationRow(name, length, sum(o.seconds for o in cell), sum(o.prompt.input_ids.numel() for o in cell),
                              len(cell), task="passkey", accuracy=sum(o.correct for o in cell) / len(cell),
                              depth=depth)
                for depth, cell in group_by_depth(outcomes, inputs.depth_bins).items()]

    return measure


def _ruler_task(inputs: TaskInputs, model, tokenizer, length: int, tasks: list[str]) -> Measure:
    essays = load_documents("essays") if any(task in ESSAY_TASKS for task in tasks) else []

    def measure(name: str) -> list[EvaluationRow]:
        return [EvaluationRow(name, length, score.seconds, score.prompt_tokens, score.samples,
                              task=RULER_PREFIX + score.task, accuracy=score.score)
                for score in evaluate_ruler(model, tokenizer, tasks, length, inputs.samples, essays)]

    return measure


TaskBuilder = Callable[[TaskInputs, object, object, int], Measure]
TASK_BUILDERS: dict[str, TaskBuilder] = {
    "ppl": _perplexity_task,
    "passkey": _passkey_task,
    "needle-ppl": _needle_task,
}


def _task_builders(tasks: list[str]) -> list[tuple[str, TaskBuilder]]:
    """``(label, builder)`` per task to run: the RULER tasks asked (``ruler`` = its synthetic ones) as one."""
    ruler = [task.removeprefix(RULER_PREFIX) for task in tasks if task.startswith(RULER_PREFIX)]
    if "ruler" in tasks:
        ruler = list(dict.fromkeys([*SYNTHETIC_TASKS, *ruler]))
    builders = [(task, TASK_BUILDERS[task]) for task in tasks if task in TASK_BUILDERS]
    if ruler:
        builders.append(("ruler", functools.partial(_ruler_task, tasks=ruler)))
    return builders


def evaluate(model, tokenizer, geometry: RopeGeometry, methods: list[str], factor_sets: list[tuple[str, RopeFactors]],
             tasks: list[str], lengths: list[int], inputs: TaskInputs) -> list[EvaluationRow]:
    """Every candidate on every task of :data:`TASKS` at every length, on one loaded model.

    The candidates are the baselines ``methods`` (built for ``geometry`` at each length; ``config`` is the
    model's own RoPE, unpatched) and the named ``factor_sets``. Every row says the precision it was measured in.
    """
    builders = _task_builders(tasks)
    dtype = str(model.dtype).removeprefix("torch.")
    rows = []
    bar = tqdm(total=len(lengths) * len(builders) * (len(methods) + len(factor_sets)), desc="evaluations",
               unit="eval", disable=not inputs.progress)
    for length in lengths:
        candidates = [(name, None if name == CONFIG_METHOD else baseline(name, geometry, length))
                      for name in methods] + factor_sets
        for task, build in builders:
            measure = build(inputs, model, tokenizer, length)
            for name, factors in candidates:
                bar.set_postfix_str(f"{name} {task}@{length}")
                with patched(model, factors) if factors else nullcontext():
                    new_rows = measure(name)
                for row in new_rows:
                    row.dtype = dtype
                    logger.info("%s", describe(row))
                rows += new_rows
                bar.update(1)
    bar.close()
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The command line.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hpo.evaluate",
        description="Evaluate RoPE rescalings (baselines, factor files, a study's best factors) on perplexity, "
                    "passkey retrieval and needle-driven perplexity.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=None,
                        help=f"short name, hub id, local model directory or .gguf file "
                             f"(default: the study's model, else {DEFAULT_MODEL})")
    parser.add_argument("--methods", default="none,pi,ntk,yarn",
                        help=f"comma-separated baselines among {', '.join(BASELINES)}; a hand-made curve "
                             "as hpo.run's comparison names it, 'ntk+attn (s=SCALE)' (NTK built for another "
                             "scale, with LongRoPE's attention scaling) or 'yarn (BETA_FAST/BETA_SLOW)'; or "
                             f"{CONFIG_METHOD} (the model's own RoPE, e.g. an exported longrope model's short/long "
                             "switch); may be empty")
    parser.add_argument("--factors", action="append", default=[], metavar="FILE",
                        help="a factor file (JSON) to evaluate as one more method; repeatable")
    parser.add_argument("--study", default=None, metavar="NAME",
                        help="also evaluate this study's best factors (method 'longrope:NAME')")
    parser.add_argument("--storage", default=None, metavar="URL", help="the study's storage URL")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="the study's output directory (default: runs/NAME)")
    parser.add_argument("--tasks", default="ppl",
                        help="comma-separated tasks among ppl, passkey, needle-ppl, ruler (RULER's synthetic tasks: "
                             f"{', '.join(SYNTHETIC_TASKS)}) and ruler:TASK for any of {', '.join(RULER_TASKS)}")
    parser.add_argument("--lengths", type=comma_separated(int), default=None,
                        help="lengths in tokens (default: the study's original and target lengths, "
                             f"else {','.join(map(str, DEFAULT_LENGTHS))})")
    parser.add_argument("--samples", "--limit", type=positive(int), default=1,
                        help="windows per length (ppl, needle-ppl); prompts per length and depth bin (passkey); "
                             "samples per task and length (ruler)")
    parser.add_argument("--depth-bins", type=int, default=5, help="passkey: equal depth ranges the keys are drawn in")
    parser.add_argument("--needles", type=int, default=4, help="needle-ppl: needles per window")
    parser.add_argument("--seed", type=int, default=0, help="seed of the passkey keys and depths and the needles")
    parser.add_argument("--first-window", type=int, default=0, help="skip this many windows of the corpus")
    parser.add_argument("--data", default=EMBEDDED_CORPUS,
                        help="'essays', a .txt/.jsonl/.parquet path or directory, pg19, proof-pile, hf:NAME[:SPLIT]")
    parser.add_argument("--window-mode", choices=WINDOW_MODES, default=None,
                        help="documents: first tokens of each document; stream: consecutive windows "
                             "(default: stream for essays, documents otherwise)")
    parser.add_argument("--sliding-stride", type=positive(int), default=None, metavar="TOKENS",
                        help="ppl: score the stream with a sliding window of each length moved by this stride "
                             "(over samples x length tokens) instead of separate windows; each window starts "
                             "with the tokenizer's BOS, as in the LongRoPE reference")
    parser.add_argument("--position-bins", type=positive(int), default=1, metavar="N",
                        help="ppl: also report the perplexity of each of N equal ranges of positions in the windows "
                             "(with --sliding-stride, in the stream read), a row per range, its depth the range's "
                             "centre: where in a long window the loss grows")
    parser.add_argument("--original-length", type=int, default=None,
                        help="the model's pretrained window (default: the study's, else from the model config)")
    add_dtype_argument(parser, None, "model precision (default: with --study, the one the study ran in, else auto)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--attn", default="auto", help="attention implementation: auto, sdpa, eager, flash_attention_2")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="write the results as JSON (with --study, default DIR/evaluation.json)")
    parser.add_argument("--csv", type=Path, default=None, metavar="FILE",
                        help="write the results as CSV (with --study, default DIR/evaluation.csv)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def _names(text: str, is_known: Callable[[str], bool], choices: Collection[str], what: str) -> list[str]:
    """The comma-separated names of ``text``; one that ``is_known`` refuses is an error that lists ``choices``."""
    names = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [name for name in names if not is_known(name)]
    if unknown:
        raise ValueError(f"unknown {what}(s) {', '.join(unknown)}; choose from {', '.join(choices)}")
    return names


def run(args: argparse.Namespace) -> list[EvaluationRow]:
    """The command line's evaluation: loads the model and the candidates ``args`` name, then :func:`evaluate`.

    ``args.model`` is set to the model actually loaded, so callers can record it.
    """
    methods = _names(args.methods, lambda name: name == CONFIG_METHOD or is_baseline(name),
                     [*BASELINES, *HAND_MADE_NAMES, CONFIG_METHOD], "method")
    tasks = _names(args.tasks, TASKS.__contains__, TASKS, "task")
    if not tasks:
        raise ValueError(f"--tasks is empty; choose from {', '.join(TASKS)}")
    found, study_model_name = study_factors(args.study, args.storage, args.out) if args.study else (None, None)
    args.model = args.model or study_model_name or DEFAULT_MODEL
    precision = checked_dtype(args.dtype) or (found.metadata.get("dtype") if found else None) or "auto"
    model, tokenizer = load_model(args.model, dtype=precision, device=args.device,
                                  attn_implementation=args.attn)
    geometry = RopeGeometry.from_config(model.config)
    original_length = args.original_length or (found.original_length if found else None)
    if original_length:
        geometry = RopeGeometry(geometry.rotary_dim, geometry.base, original_length)
    extra = [(Path(f).stem, RopeFactors.load(f, geometry)) for f in args.factors]
    if found:
        found.validate(geometry)
        extra.insert(0, (f"longrope:{args.study}", found))
    lengths = args.lengths or ([geometry.original_length, found.target_length] if found else DEFAULT_LENGTHS)

    inputs = TaskInputs(data=args.data, samples=args.samples, first_window=args.first_window,
                        window_mode=args.window_mode, sliding_stride_tokens=args.sliding_stride,
                        position_bins=args.position_bins,
                        depth_bins=args.depth_bins, needles=args.needles, seed=args.seed,
                        progress=not args.no_progress)
    return evaluate(model, tokenizer, geometry, methods, extra, tasks, lengths, inputs)


# ----------------------------------------------------------------------------------------------------------------
# The results table.


def describe(row: EvaluationRow) -> str:
    """One row in words, for the log."""
    where = f"{row.method} {row.task}@{row.length}"
    if row.task == "passkey":
        return f"{where} depth {row.depth:.2f}: accuracy {row.accuracy:.2f} of {row.windows} ({row.seconds:.1f}s)"
    if row.depth is not None:
        return f"{where} positions around {row.depth:.1%} of the window: perplexity {row.perplexity:.3f}"
    if row.accuracy is not None:
        return f"{where}: score {row.accuracy:.2f} over {row.windows} samples ({row.seconds:.1f}s)"
    return f"{where}: perplexity {row.perplexity:.3f} ({row.seconds:.1f}s)"


def format_table(rows: list[EvaluationRow]) -> str:
    """One block per task: methods down, lengths across.

    Perplexity cells read ``perplexity (seconds)``; passkey cells ``accuracy% (seconds)``
    over all depths of that length. Perplexity by position range (``ppl`` rows with a depth) is a block of its own.
    """
    rows = [EvaluationRow(f"{r.method} @{r.depth:.1%}", r.length, r.seconds, r.tokens, r.windows, task=POSITION_BLOCK,
                          perplexity=r.perplexity, dtype=r.dtype) if r.task == "ppl" and r.depth is not None else r
            for r in rows]
    blocks = []
    for task in dict.fromkeys(row.task for row in rows):
        task_rows = [row for row in rows if row.task == task]
        cells: dict[tuple[str, int], str] = {}
        if task == "passkey":
            for method, length in dict.fromkeys((row.method, row.length) for row in task_rows):
                cell = [r for r in task_rows if (r.method, r.length) == (method, length)]
                accuracy = sum(r.accuracy * r.windows for r in cell) / sum(r.windows for r in cell)
                cells[method, length] = f"{100 * accuracy:7.1f}% ({sum(r.seconds for r in cell):6.1f}s)"
            title = "passkey: accuracy over all depths (seconds)"
        elif task.startswith(RULER_PREFIX):
            cells = {(r.method, r.length): f"{100 * r.accuracy:5.1f}% of {r.windows} ({r.seconds:5.0f}s)"
                     for r in task_rows}
            title = f"{task}: score over samples (seconds)"
        elif task == POSITION_BLOCK:
            cells = {(r.method, r.length): f"{r.perplexity:8.2f}" for r in task_rows}
            title = f"{task}: perplexity of the tokens around that share of the window"
        else:
            cells = {(r.method, r.length): f"{r.perplexity:8.2f} ({r.seconds:6.1f}s)" for r in task_rows}
            title = f"{task}: perplexity (seconds)"
        precisions = sorted({row.dtype for row in task_rows if row.dtype})
        if precisions:
            title += f", {'/'.join(precisions)}"
        lengths = sorted({length for _, length in cells})
        methods = list(dict.fromkeys(method for method, _ in cells))
        width = max(len(m) for m in methods + ["method"])
        header = f"{'method':<{width}} | " + " | ".join(f"{length:>18,}" for length in lengths)
        lines = [title, header, "-" * len(header)]
        for method in methods:
            values = " | ".join(f"{cells.get((method, length), '-'):>18}" for length in lengths)
            lines.append(f"{method:<{width}} | {values}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


@command()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    rows = run(args)
    print(format_table(rows))
    csv_path, json_path = args.csv, args.json
    if args.study and csv_path is None and json_path is None:
        csv_path = study_dir(args.study, args.out) / EVALUATION_FILE
        json_path = csv_path.with_suffix(".json")
    meta = {"model": args.model, "data": args.data, "study": args.study, "tasks": args.tasks, "seed": args.seed}
    for path in write_results(rows, csv=csv_path, json_path=json_path, meta=meta):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
