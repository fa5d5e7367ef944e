"""One self-contained HTML report of one or more LongRoPE studies.

    python -m dashboards.report --study smollm2_16k [--out runs/smollm2_16k | --storage URL] \\
        [--results runs/smollm2_16k/evaluation.csv ...] [--html runs/smollm2_16k/report.html]
    python -m dashboards.report --study a --study b [--out A --out B] --html compare.html

The page holds the figures of :func:`dashboards.figures.report_figures` (factor
curves, search convergence, perplexity against length, passkey accuracy, the
effect of n_hat) with plotly.js inlined, so it opens offline. ``--study``
repeats to compare studies (overlaid curves); ``--out`` and ``--storage`` are
given once for all studies or once per study. Without ``--results`` the
report reads each study's ``evaluation.csv`` (written by ``python -m
hpo.evaluate --study NAME``) when there is one. The report goes to ``--html FILE``,
by default ``report.html`` in the first study's directory.
"""

from __future__ import annotations

import argparse
import html
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import optuna
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from optuna.trial import TrialState

from dashboards.figures import report_figures
from hpo.cli import command
from hpo.records import EVALUATION_FILE, SEARCH_SPACE_ATTR, load_study, read_results, study_dir

T = TypeVar("T")

CAPTIONS = {
    "factor-curves": "λ_i divides the frequency of rotary pair i. Bold: the best trial of each study; thin: its next "
                     "best trials; grey: the baselines the search started from (PI, NTK-aware, YaRN).",
    "convergence": "Each point is a trial's perplexity on the searched windows; the step line is the best so far. "
                   "Pruned (▽) and failed (×) trials sit at their last reported value, or at the top.",
    "perplexity-length": "Perplexity measured by python -m hpo.evaluate, one line per method.",
    "passkey-accuracy": "Share of passkeys retrieved, per context length and depth of the key (0% = top).",
    "ruler": "RULER's tasks through lm-eval: the share of the expected strings each method generated, per task "
             "and length (hover for the number of samples).",
    "start-tokens": "n_hat keeps the first positions on the original RoPE; each point is a complete trial.",
}
NO_COMPLETE_TRIAL = {
    "factor-curves": "No complete trial yet: only the baselines the search starts from are drawn (grey).",
    "start-tokens": "No complete trial yet: nothing to draw.",
}
REPORT_FILE = "report.html"


def captions_for(studies: Sequence[optuna.Study]) -> dict[str, str]:
    """The figures' captions, saying which studies have no complete trial (so no best trial) yet."""
    without = [s.study_name for s in studies if not s.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not without:
        return CAPTIONS
    if len(without) == len(studies):
        return {**CAPTIONS, **NO_COMPLETE_TRIAL}
    note = f" No complete trial yet in {', '.join(without)}: nothing of it but its baselines is drawn."
    return {**CAPTIONS, **{key: CAPTIONS[key] + note for key in NO_COMPLETE_TRIAL}}


def per_study(values: Sequence[T] | None, names: Sequence[str], option: str) -> list[T | None]:
    """``values`` given once (shared), once per study, or not at all (None for each)."""
    if not values:
        return [None] * len(names)
    if len(values) == 1:
        return list(values) * len(names)
    if len(values) == len(names):
        return list(values)
    raise ValueError(f"give {option} once, or once per --study ({len(names)} times), not {len(values)} times")


def open_studies(names: Sequence[str], storages: Sequence[str] | None = None,
                 outs: Sequence[Path] | None = None) -> list[optuna.Study]:
    """The studies ``names`` from their storages (see :func:`hpo.records.load_study`)."""
    pairs = zip(per_study(storages, names, "--storage"), per_study(outs, names, "--out"), strict=True)
    return [load_study(name, storage, out) for name, (storage, out) in zip(names, pairs, strict=True)]


def gather_results(paths: Sequence[Path], names: Sequence[str], outs: Sequence[Path] | None) -> pd.DataFrame | None:
    """The evaluation tables of ``paths``, or else each study's ``evaluation.csv``, in one frame (None if none)."""
    if not paths:
        paths = [found for name, out in zip(names, per_study(outs, names, "--out"), strict=True)
                 if (found := study_dir(name, out) / EVALUATION_FILE).is_file()]
    if not paths:
        return None
    return pd.concat([read_results(path) for path in paths], ignore_index=True)


def summary_table(studies: Sequence[optuna.Study]) -> str:
    """An HTML table: per study, its trials by state and its best trial."""
    header = "<tr><th>study</th><th>complete</th><th>pruned</th><th>failed</th><th>best trial</th>" \
             "<th>best perplexity</th><th>target length</th></tr>"
    rows = []
    for study in studies:
        trials = study.get_trials(deepcopy=False)
        count = {state: sum(t.state == state for t in trials) for state in TrialState}
        complete = count[TrialState.COMPLETE] > 0
        best = study.best_trial if complete else None
        target = study.user_attrs.get(SEARCH_SPACE_ATTR, {}).get("target_length")
        cells = [study.study_name, count[TrialState.COMPLETE], count[TrialState.PRUNED], count[TrialState.FAIL],
                 best.number if best else "-", f"{best.value:.4f}" if best else "-",
                 f"{target:,}" if target else "-"]
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    return f"<table>{header}{''.join(rows)}</table>"


def render_html(figures: dict[str, go.Figure], title: str, summary: str = "",
                captions: dict[str, str] = CAPTIONS) -> str:
    """A complete HTML page with every figure and its caption; plotly.js is inlined once, in the first figure."""
    sections = []
    for index, (figure_id, figure) in enumerate(figures.items()):
        plot = pio.to_html(figure, full_html=False, include_plotlyjs=index == 0, div_id=figure_id,
                           config={"displaylogo": False, "responsive": True})
        caption = html.escape(captions.get(figure_id, ""))
        sections.append(f'<section class="figure">{plot}<p class="caption">{caption}</p></section>')
    style = ("body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1200px;color:#222}"
             "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.3rem .7rem}"
             ".figure{margin:2rem 0}.caption{color:#555;font-size:.9rem;margin:.2rem 1rem}")
    generated = datetime.now().isoformat(timespec="seconds")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>Generated {generated} by python -m dashboards.report.</p>{summary}{''.join(sections)}"
            "</body></html>\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dashboards.report",
                                     description="Write a self-contained HTML report of LongRoPE studies.")
    parser.add_argument("--study", action="append", required=True, metavar="NAME",
                        help="study name; repeat to compare studies")
    parser.add_argument("--storage", action="append", metavar="URL",
                        help="storage URL, once for all studies or once per study (default: DIR/study.db)")
    parser.add_argument("--out", action="append", type=Path, metavar="DIR",
                        help="study output directory, once or once per study (default: runs/NAME)")
    parser.add_argument("--results", nargs="+", action="extend", type=Path, default=[], metavar="FILE",
                        help="evaluation tables (.csv/.json from python -m hpo.evaluate) "
                             "(default: each study's DIR/evaluation.csv, if any)")
    parser.add_argument("--top", type=int, default=5, help="trials drawn per study in the factor curves")
    parser.add_argument("--html", type=Path, metavar="FILE",
                        help=f"the report to write (default: the first study's DIR/{REPORT_FILE})")
    return parser


@command()
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    html_path = args.html or study_dir(args.study[0], args.out[0] if args.out else None) / REPORT_FILE
    if html_path.is_dir():
        raise ValueError(f"--html {html_path} is a directory: give the report's file name, e.g. "
                         f"{html_path / REPORT_FILE}")
    studies = open_studies(args.study, args.storage, args.out)
    results = gather_results(args.results, args.study, args.out)
    figures = report_figures(studies, results, top=args.top)
    if results is None:
        print("no evaluation results (pass --results FILE): the perplexity and passkey figures are left out")
    title = "LongRoPE study " + " vs ".join(args.study)
    try:
        html_path.parent.mkdir(parents=True, exist_ok=True)
        html_path.write_text(render_html(figures, title, summary_table(studies), captions_for(studies)))
    except OSError as error:
        print(f"error: cannot write the report to {html_path}: {error.strerror or error}", file=sys.stderr)
        return 2
    print(f"wrote {html_path} ({len(figures)} figures: {', '.join(figures)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
