"""Benchmark: how well each fidelity rung ranks trials, against their final perplexity.

    python benchmarks/prefix_ranking.py docs/results/bench_pruning/smollm2_16k-full.db --prefixes 0.25,0.5

Takes a finished run without pruning (a pruning benchmark's ``*-full.db``: every trial measured on
every searched window), measures each trial again on the first searched window cut to each prefix,
and prints, per rung (each prefix, then the running perplexity after 1, 2, ... full windows), the
Spearman rank correlation with the final perplexity, where the run's best trials rank on that rung,
and what the rung costs in seconds against a full window. A pruner that keeps only trials that beat
the best needs a rung that puts the best trials first; the correlation says how well it orders the rest.
Prefix rungs are timed here; full windows by the run that measured them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import optuna
from optuna.trial import TrialState

from hpo.cli import comma_separated
from hpo.pruning import FidelityStep
from hpo.study import load_workload, search_space_for
from studies import load_preset


def ranks(values: list[float]) -> np.ndarray:
    return np.argsort(np.argsort(values))


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (no ties expected: perplexities to many digits)."""
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("database", type=Path, help="a finished run without pruning (SQLite)")
    parser.add_argument("--prefixes", type=comma_separated(float), default=(0.25, 0.5),
                        help="prefix rungs as fractions of a window")
    parser.add_argument("--best", type=int, default=4, help="how many of the best trials to follow")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{args.database}"
    study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
    trials = [t for t in study.trials if t.state == TrialState.COMPLETE]
    full_steps = sorted(trials[0].intermediate_values)
    if any(sorted(t.intermediate_values) != full_steps for t in trials):
        raise SystemExit(f"{args.database}: every trial must have been measured on the same windows")

    preset = load_preset(study.study_name).replace(data__samples=1, data__heldout_samples=0)
    workload = load_workload(preset)
    space = search_space_for(preset, workload)
    window_tokens = workload.windows[0].numel()

    rungs: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    for fraction in args.prefixes:
        name, tokens = f"window 0, first {fraction:g}", round(window_tokens * fraction)
        step = FidelityStep(0, tokens, tokens, True)
        start = time.perf_counter()
        rungs[name] = [workload.step_perplexity(space.to_factors(t.params), step, desc=name).perplexity for t in trials]
        seconds[name] = (time.perf_counter() - start) / len(trials)
    # Full windows were timed by the run that measured them.
    window_seconds = float(np.mean([(t.datetime_complete - t.datetime_start).total_seconds() for t in trials]))
    window_seconds /= len(full_steps)
    for count, step in enumerate(full_steps, start=1):
        rungs[f"windows 0-{count - 1}"] = [t.intermediate_values[step] for t in trials]
        seconds[f"windows 0-{count - 1}"] = count * window_seconds

    final = [t.value for t in trials]
    best = np.argsort(final)[: args.best]
    figures = {"database": str(args.database), "trials": len(trials), "rungs": {}}
    print(f"\n## Rungs of {study.study_name}: {len(trials)} trials, ranks of the {args.best} best (0 = first)\n")
    print("| rung | Spearman with the final perplexity | ranks of the best trials | seconds per trial |")
    print("|---|---|---|---|")
    for name, values in rungs.items():
        order = ranks(values)
        best_ranks = [int(order[i]) for i in best]
        correlation = spearman(values, final)
        figures["rungs"][name] = {"spearman": correlation, "best_ranks": best_ranks, "seconds": seconds[name]}
        print(f"| {name} | {correlation:.3f} | {best_ranks} | {seconds[name]:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
