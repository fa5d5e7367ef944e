"""Benchmark: the LongRoPE search with and without multi-fidelity pruning, measured in one run.

    python benchmarks/pruning.py --study smollm2_16k --samples 5 --n-trials 40 --margin 0.01,0
    python benchmarks/pruning.py --study smollm2_16k --samples 5 --n-trials 40 --margin 0 --rank 1 --reuse
    python benchmarks/pruning.py --study smollm2_16k --samples 5 --n-trials 40 --margin 0 --rank 1 \
        --prefixes 0.25 --pruned-trials 100 --reuse
    python benchmarks/pruning.py --study tiny --samples 6 --n-trials 40 --margin 0  # reduced: the mechanics only
    python benchmarks/pruning.py --replay runs/bench_pruning/smollm2_16k-full.db --margin 0.01,0 --rank 6,1

Runs the study on one loaded model with the same budget (finished trials), windows and seed:
once measuring every trial on every window, then once with :class:`hpo.pruning.ParentPruner`
for each asked rank and margin (the run without pruning is shared, so they compare side by side;
``--reuse`` resumes the runs already in ``--out`` instead, so a finished one is not run again, and
``--pruned-trials`` gives the pruned runs a larger trial budget than ``--n-trials``).
For each run it counts the full-length window evaluations (one searched window measured at the
target length), the windows read (prefix rungs included, each as the share of a window it reads)
and the trials' wall time (one worker: the run's time less the sampler's and the
storage's) spent until the first trial at or below the best perplexity both runs reached, and for
the whole run, and prints the ratios (without / with pruning). A pruner at the study's parent
count only stops trials behind every parent, which leaves the search itself unchanged unless a
pruned trial would have become a parent; a smaller rank prunes more and changes the search, so
the table also says how many trials proposed the same factors.

``--replay DB`` spends no evaluation: it feeds a finished run without pruning, trial by trial and
window by window, to :class:`hpo.pruning.ParentPruner` (at each rank and margin) and counts what
it would have pruned. The replayed run proposes the same trials as long as no pruned trial was in
a parent set; the table says from which trial on that no longer holds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from dataclasses import astuple, dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.cli import comma_separated, command
from hpo.pruning import FidelityStep, ParentPruner, TrialCost, cost_to_reach
from hpo.records import open_storage
from hpo.sampler import LongRoPESampler
from hpo.study import load_workload, open_study, run_search, search_space_for
from hpo.trials import StopSignals
from studies import StudyPreset, load_preset


@dataclass
class Arm:
    """One run of the study and what it spent."""

    pruning: bool
    best: float
    complete: int
    pruned: int
    cost: TrialCost
    trials: list[FrozenTrial]
    schedule: list[FidelityStep]

    def figures(self) -> dict:
        """The arm's counts for the JSON (its trials are in its study file)."""
        return {"pruning": self.pruning, "best": self.best, "complete": self.complete, "pruned": self.pruned,
                "full_evaluations": self.cost.full_evaluations,  # searched windows read at the full target length
                "prefix_evaluations": self.cost.windows - self.cost.full_evaluations,  # prefix rungs, in windows
                "trial_seconds": self.cost.seconds}


def run_arm(preset: StudyPreset, workload, out_dir: Path, reuse: bool = False) -> Arm:
    """Run ``preset``'s study in a fresh SQLite file (with ``reuse``: resume the file there) and count its cost."""
    search = preset.search
    label = f"pruning-{search.pruning_margin:g}" if search.pruning else "full"
    if search.pruning and search.pruning_rank not in (None, search.parents):  # the parent count is the default
        label += f"-rank{search.pruning_rank}"
    if search.pruning and search.pruning_prefixes:
        label += "-prefix" + ",".join(f"{fraction:g}" for fraction in search.pruning_prefixes)
    database = out_dir / f"{preset.name}-{label}.db"
    if not reuse:  # every run starts a fresh study
        for stale in (database, Path(f"{database}.claims.lock")):
            stale.unlink(missing_ok=True)
    storage = open_storage(f"sqlite:///{database}")
    space = search_space_for(preset, workload)
    study = open_study(preset, storage, space, workload)
    run_search(study, storage, workload, space, preset)  # resumes a reused study; nothing to do when it is finished
    return arm_of(study.trials, search.pruning, workload.schedule(search))


def arm_of(trials: list[FrozenTrial], pruning: bool, schedule: list[FidelityStep]) -> Arm:
    """What ``trials`` (a run's, in order; or the first of them) spent and found."""
    spent, _ = cost_to_reach(trials, schedule)
    return Arm(
        pruning=pruning,
        best=min(t.value for t in trials if t.state == TrialState.COMPLETE),
        complete=sum(t.state == TrialState.COMPLETE for t in trials),
        pruned=sum(t.state == TrialState.PRUNED for t in trials),
        cost=spent,
        trials=trials,
        schedule=schedule,
    )


def compare(full: Arm, pruned: Arm) -> tuple[list[tuple[str, ...]], dict]:
    """The table rows (without / with pruning / ratio) and the JSON figures of one pruned run against the full one."""
    target = max(full.best, pruned.best)  # the best perplexity both runs reached: each run reaches it
    (full_cost, full_trial), (pruned_cost, pruned_trial) = (
        cost_to_reach(arm.trials, arm.schedule, target) for arm in (full, pruned))
    same = sum(a.params == b.params for a, b in zip(full.trials, pruned.trials, strict=False))
    rows = [
        ("best perplexity", f"{full.best:.4f}", f"{pruned.best:.4f}", ""),
        ("trials complete / pruned", f"{full.complete} / {full.pruned}", f"{pruned.complete} / {pruned.pruned}", ""),
        (f"full-length evaluations to reach {target:.4f}", f"{full_cost.full_evaluations} (trial {full_trial.number})",
         f"{pruned_cost.full_evaluations} (trial {pruned_trial.number})",
         f"{full_cost.full_evaluations / pruned_cost.full_evaluations:.2f}x"),
        (f"windows read to reach {target:.4f}, prefix rungs included", f"{full_cost.windows:.2f}",
         f"{pruned_cost.windows:.2f}", f"{full_cost.windows / pruned_cost.windows:.2f}x"),
        (f"trial seconds to reach {target:.4f}", f"{full_cost.seconds:.1f}", f"{pruned_cost.seconds:.1f}",
         f"{full_cost.seconds / pruned_cost.seconds:.2f}x"),
        ("full-length evaluations, whole run", str(full.cost.full_evaluations), str(pruned.cost.full_evaluations),
         f"{full.cost.full_evaluations / pruned.cost.full_evaluations:.2f}x"),
        ("prefix-rung evaluations (in windows)", f"{full.cost.windows - full.cost.full_evaluations:.1f}",
         f"{pruned.cost.windows - pruned.cost.full_evaluations:.1f}", ""),
        ("trial seconds, whole run", f"{full.cost.seconds:.1f}", f"{pruned.cost.seconds:.1f}",
         f"{full.cost.seconds / pruned.cost.seconds:.2f}x"),
        ("trials with the same factors", f"{same} of {min(len(full.trials), len(pruned.trials))}", "", ""),
    ]
    figures = {"arm": pruned.figures(), "target": target,
               "to_target": {"full": list(astuple(full_cost)), "pruning": list(astuple(pruned_cost))},
               "same_factors": same}
    return rows, figures


def replay(full: optuna.Study, pruner: ParentPruner) -> tuple[list[FrozenTrial], int | None]:
    """``full``'s trials as ``pruner`` would have cut them, and where the replay stops being exact.

    ``full`` is a finished run without pruning (every trial reported every step); the replay asks,
    reports and tells its trials in trial order on an in-memory study, as the local backend does.
    A run with the pruner proposes the same trials until a generation's parent set (kept in the
    storage by the sampler) holds a trial the pruner stopped: the second value is the first trial
    of that generation, or ``None`` when no parent set does.
    """
    trials = sorted(full.trials, key=lambda t: t.number)
    number_of = {t._trial_id: t.number for t in trials}
    prefix = LongRoPESampler._get_parent_cache_key_prefix()
    parent_sets = {int(key.removeprefix(prefix)): {number_of[i] for i in ids}
                   for key, ids in full._storage.get_study_system_attrs(full._study_id).items()
                   if key.startswith(prefix)}
    generation_key = LongRoPESampler._get_generation_key()
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.RandomSampler(), pruner=pruner)
    pruned, diverged = set(), None
    for trial in trials:
        if diverged is None and pruned & parent_sets.get(trial.system_attrs.get(generation_key), set()):
            diverged = trial.number
        asked = study.ask()
        steps = sorted(trial.intermediate_values.items())
        for position, (step, value) in enumerate(steps):
            asked.report(value, step)
            # as hpo.trials.StudyTrials.report: never after the last step, where pruning saves nothing
            if position < len(steps) - 1 and asked.should_prune():
                pruned.add(trial.number)
                study.tell(asked, state=TrialState.PRUNED)
                break
        else:
            study.tell(asked, trial.value)
    return study.trials, diverged


def print_replays(database: Path, margins: list[float], ranks: list[int]) -> None:
    """The replay table of a finished run without pruning, one row per rank and margin."""
    storage = f"sqlite:///{database}"
    name = optuna.get_all_study_names(storage)[0]
    full = optuna.load_study(study_name=name, storage=storage)
    trials = sorted(full.trials, key=lambda t: t.number)
    if any(t.state != TrialState.COMPLETE for t in trials):
        raise SystemExit(f"{database}: a replay needs a run without pruning, every trial complete")
    # full windows only (the run had no prefix rungs to skip): a trial's evaluations are the steps it reported
    steps = set(trials[0].intermediate_values)
    best = min(trials, key=lambda t: t.value)
    to_best = sum(len(t.intermediate_values) for t in trials[: best.number + 1])
    total = sum(len(t.intermediate_values) for t in trials)
    print(f"\n## Replay of {name}: {len(trials)} trials x {len(steps)} windows, best {best.value:.4f} "
          f"(trial {best.number}, {to_best} window evaluations; {total} for the whole run)\n")
    print("| rank | margin | pruned | window evaluations to the best | whole run | "
          "exact until trial |\n|---|---|---|---|---|---|")
    for rank, margin in itertools.product(ranks, margins):
        replayed, diverged = replay(full, ParentPruner(rank, margin))
        kept = replayed[best.number].state == TrialState.COMPLETE
        spent = sum(len(t.intermediate_values) for t in replayed[: best.number + 1])
        whole = sum(len(t.intermediate_values) for t in replayed)
        pruned = sum(t.state == TrialState.PRUNED for t in replayed)
        to_best_cell = f"{spent} ({to_best / spent:.2f}x)" if kept else "best trial pruned"
        print(f"| {rank} | {margin:g} | {pruned} | {to_best_cell} | {whole} ({total / whole:.2f}x) | "
              f"{'the end' if diverged is None else diverged} |")


def run_arms(args: argparse.Namespace, preset: StudyPreset, margins: list[float], ranks: list[int]) -> None:
    """The run without pruning, then one pruned run per rank and margin, each compared with it in a table."""
    preset = preset.replace(
        data__samples=args.samples, data__heldout_samples=0, search__n_trials=args.n_trials, search__seed=args.seed,
        search__pruning_prefixes=args.prefixes)
    args.out.mkdir(parents=True, exist_ok=True)
    workload = load_workload(preset)
    full = run_arm(preset.replace(search__pruning=False), workload, args.out, args.reuse)
    search = preset.search
    figures = {"preset": preset.name, "samples": args.samples, "n_trials": search.n_trials, "seed": search.seed,
               "full": full.figures(), "pruning": []}
    for rank, margin in itertools.product(ranks, margins):
        arm_preset = preset.replace(search__pruning=True, search__pruning_margin=margin, search__pruning_rank=rank,
                                    search__n_trials=args.pruned_trials)
        pruned = run_arm(arm_preset, workload, args.out, args.reuse)
        # A longer pruned run is also compared at the same trial budget: its first trials are what a run
        # of that budget would have done (proposals depend on earlier trials only).
        budgets = sorted({len(pruned.trials), min(len(pruned.trials), len(full.trials))})
        for budget in budgets:
            same_budget = arm_of(pruned.trials[:budget], True, pruned.schedule)
            rows, arm_figures = compare(full, same_budget)
            figures["pruning"].append({"rank": rank, "margin": margin, "trials": budget, **arm_figures})
            print(f"\n## Pruning: {preset.name}, {args.samples} windows of {preset.target_length:,} tokens, "
                  f"{search.n_trials} trials ({budget} with pruning), seed {search.seed}, "
                  f"rank {rank} of {search.parents} parents, margin {margin}, "
                  f"prefix rungs {list(arm_preset.search.pruning_prefixes)}\n")
            print("| | without pruning | with pruning | ratio |\n|---|---|---|---|")
            for row in rows:
                print("| " + " | ".join(row) + " |")
        if args.json:  # after every arm: a stopped benchmark keeps what it measured
            args.json.write_text(json.dumps(figures, indent=2) + "\n")



@command(interrupted="every finished trial is in its arm's study under --out, and the running one's parameters "
                     "are queued to run first; run the same command with --reuse to continue")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="smollm2_16k", help="preset name or .toml path")
    parser.add_argument("--samples", type=int, default=5, help="searched windows (pruning needs several)")
    parser.add_argument("--n-trials", type=int, help="finished trials per run (default: the preset's)")
    parser.add_argument("--pruned-trials", type=int, help="finished trials per pruned run (default: --n-trials): "
                        "pruned trials are cheap, so a pruned run may get more to reach the same best")
    parser.add_argument("--seed", type=int, help="search seed (default: the preset's)")
    parser.add_argument("--margin", type=comma_separated(float),
                        help="pruning margin(s), comma-separated: one pruned run each (default: the preset's)")
    parser.add_argument("--prefixes", type=comma_separated(float),
                        help="prefix rungs as fractions of a window, e.g. 0.5 (default: none)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_pruning"), help="where the studies go")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--replay", type=Path, metavar="DB",
                        help="replay this finished run without pruning (a benchmark's *-full.db) instead of running")
    parser.add_argument("--rank", type=comma_separated(int),
                        help="ranks a running value must stay within, comma-separated: one pruned run (or replay) "
                             "per rank and margin (default: the study's parent count)")
    parser.add_argument("--reuse", action="store_true",
                        help="resume the runs already in --out (a finished one is read, not run again) instead "
                             "of starting fresh: to add arms to an earlier benchmark on the same machine")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    preset = load_preset(args.study)
    margins = list(args.margin or [preset.search.pruning_margin])
    ranks = list(args.rank or [preset.search.parents])
    if args.replay:
        print_replays(args.replay, margins, ranks)
        return 0

    with StopSignals():  # SIGTERM (a scheduler, `kill`) stops the arms as Ctrl-C does
        run_arms(args, preset, margins, ranks)
    return 0

if __name__ == "__main__":
    sys.exit(main())
