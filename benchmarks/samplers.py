"""Benchmark: the samplers of ``[search] sampler`` side by side, on one loaded model.

    python benchmarks/samplers.py --study tiny --n-trials 16   # a random model: the mechanics only

Runs the study once per sampler (``longrope``, ``tpe``, ``cmaes``, ``gp`` or those given to
``--samplers``) with the same windows, seed and budget of finished trials, pruning off, each in its
own SQLite file under ``--out`` (running it again continues those studies), and prints for each the
best searched perplexity after every quarter of the budget, the trial that found the best, and the
run's wall time. Every study opens with the same baselines (PI, NTK, YaRN, linear YaRN), projected
into its space: exactly into LongRoPE's per-pair space, YaRN only approximately into the curves.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from hpo.records import open_storage
from hpo.study import load_workload, open_study, run_search, search_space_for
from studies import SAMPLERS, load_preset

QUARTERS = (0.25, 0.5, 0.75, 1.0)


def best_after(study: optuna.Study, trials: int) -> float:
    """The best complete value among the study's first ``trials`` trials (NaN without one)."""
    values = [t.value for t in study.trials[:trials] if t.state == TrialState.COMPLETE and t.value is not None]
    return min(values, default=math.nan)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="tiny", help="preset name or .toml path")
    parser.add_argument("--n-trials", type=int, help="finished trials per sampler (default: the preset's)")
    parser.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated, among " + ", ".join(SAMPLERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_samplers"))
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = load_preset(args.study).replace(search__n_trials=args.n_trials, search__seed=args.seed,
                                           search__pruning=False)
    workload = load_workload(base)
    args.out.mkdir(parents=True, exist_ok=True)
    n_trials = base.search.n_trials
    header = (f"{'sampler':<9} | " + " | ".join(f"best @{round(q * n_trials):>4}" for q in QUARTERS)
              + " | best trial | seconds")
    lines = [f"{base.name}: {n_trials} trials per sampler, seed {args.seed}, pruning off", header, "-" * len(header)]
    for sampler in args.samplers.split(","):
        preset = base.replace(name=f"{base.name}-{sampler}", search__sampler=sampler)
        storage = open_storage(f"sqlite:///{(args.out / f'{preset.name}.db').resolve()}")
        space = search_space_for(preset, workload)
        study = open_study(preset, storage, space, workload)
        started = time.perf_counter()
        run_search(study, storage, workload, space, preset, progress=False)
        seconds = time.perf_counter() - started
        bests = [best_after(study, round(q * n_trials)) for q in QUARTERS]
        lines.append(f"{sampler:<9} | " + " | ".join(f"{b:10.4f}" for b in bests)
                     + f" | {study.best_trial.number:>10} | {seconds:7.1f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
