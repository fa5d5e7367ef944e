"""Benchmark: the samplers of ``[search] sampler`` side by side, on one loaded model, over several seeds.

    python benchmarks/samplers.py --study tiny --n-trials 16 --seeds 0,1,2   # a random model: the mechanics only
    python benchmarks/samplers.py --study smollm2_16k --n-trials 40 --seeds 0,1,2 --samplers longrope,tpe,gp,hybrid \
        --html runs/bench_samplers/convergence.html
    python benchmarks/samplers.py --study smollm2_16k --n-trials 40 --seeds 0,1,2 --samplers longrope,tpe,hybrid \
        --unpruned-reference --prefixes 0.25   # every sampler with pruning against the plain evolutionary search
    python benchmarks/samplers.py --study smollm2_16k --n-trials 40 --seeds 0,1,2 --samplers longrope \
        --unpruned-reference --prefixes 0.25 --max-full-evaluations 13   # pruned runs: a third of the evaluations

Runs the study once per sampler and seed with the same windows and budget of finished trials (pruning
as the preset says; ``--no-pruning`` turns it off), each in its own SQLite file under ``--out``: running
it again continues those studies, so a finished one costs nothing (a replay) and an interrupted one
resumes. Every study opens with the same baselines, projected into its space.

The reference is the first sampler of ``--samplers`` (``longrope``: the evolutionary search). With
``--unpruned-reference`` it is that sampler *without* pruning, run besides every sampler of the list with
the preset's pruning (strict: rank 1, margin 0, and ``--prefixes`` as rungs when given), which asks
whether a search that stops trials early reaches the plain search's best for fewer full-length
evaluations (the reference's study is ``STUDY-SAMPLER-seedN-unpruned``). ``--max-full-evaluations N`` gives
the runs with pruning a budget of N full-length evaluations instead of ``--n-trials`` finished trials
(``[search] max_full_evaluations``; at most 4x ``--n-trials`` trials, for a run that prunes nearly everything),
since a pruned trial costs a fraction of a full one: a study that already spent more keeps its trials. For each
sampler and seed the table gives the best searched perplexity, and the full-length window evaluations
(one searched window measured at the target length; prefix rungs not counted), the windows read (prefix
rungs counted as the share of a window they read: a cost that does not depend on what else the machine
ran) and the trial seconds spent until the first complete trial at or below the reference's best at that
seed, as a share of what the reference spent in its whole run ("-" when never reached), and the best
trial's perplexity on the held-out windows (one more evaluation per run, stored in its study). A summary
gives each sampler's mean and spread over the seeds. ``--html`` writes the convergence figure of every
study (dashboards.figures).

The baselines that open every study are the same trials at every seed (their values depend on the workload,
not on the seed), so a new run copies them from a study of the same sampler at another seed under ``--out``
that ran them under the same settings (workload, space, ``[search]`` but its seed and budget), with their
intermediate values, states and times: the table counts them as if run again, and the copies name their
origin (trial user attr ``copied_from``). At 2x on SmolLM2 they are ~28 minutes of a 2-core CPU per run.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from dashboards.figures import convergence
from dashboards.report import render_html
from hpo.cli import add_dtype_argument, checked_dtype, comma_separated, command, positive
from hpo.pruning import FidelityStep, TrialCost, cost_to_reach
from hpo.records import SEARCH_SPACE_ATTR, SEEDS_KEY, STAGE_ATTR, WORKLOAD_ATTR, open_storage, seed_records
from hpo.study import Workload, load_workload, open_study, run_search, search_space_for
from hpo.trials import StopSignals
from studies import SAMPLERS, StudyPreset, load_preset

SETTINGS_ATTR = "benchmark:search"  # study user attr: the [search] settings a run's trials depend on


@dataclass
class Run:
    """One sampler at one seed: its trials in evaluation order (one worker) and what they spent."""

    sampler: str
    seed: int
    preset: StudyPreset
    study: optuna.Study
    schedule: list[FidelityStep]  # the steps a trial is measured in
    unpruned: bool = False  # the reference without pruning of --unpruned-reference

    @property
    def trials(self) -> list[FrozenTrial]:
        return sorted(self.study.get_trials(deepcopy=False), key=lambda t: t.number)

    @property
    def best(self) -> float:
        return self.study.best_value

    @property
    def label(self) -> str:
        """The sampler's name, marked when this is the reference without pruning."""
        return f"{self.sampler} (no pruning)" if self.unpruned else self.sampler

    def heldout(self, workload: Workload) -> float:
        """The best trial's perplexity on the held-out windows (stored in the study once measured)."""
        key = f"benchmark:heldout:{self.study.best_trial.number}"
        if key not in self.study.user_attrs:
            space = search_space_for(self.preset, workload)
            value, _ = workload.split_perplexity(space.to_factors(self.study.best_trial.params), split="heldout")
            self.study.set_user_attr(key, value)
        return self.study.user_attrs[key]

    def spent(self, until: float | None = None) -> TrialCost | None:
        """What the run spent up to the first complete trial at or below ``until`` (the whole run when ``None``);
        ``None`` when no trial reached it."""
        reached = cost_to_reach(self.trials, self.schedule, until)
        return reached and reached[0]


def run(base: StudyPreset, workload: Workload, sampler: str, seed: int, out: Path, unpruned: bool = False,
        max_full_evaluations: int | None = None) -> Run:
    """The study of ``sampler`` at ``seed`` in ``out``, run (or continued) to the preset's budget; with
    ``unpruned``, without pruning, in a study of its own; with ``max_full_evaluations`` (runs with pruning),
    to that many full-length evaluations, or 4x the preset's trials."""
    name = f"{base.name}-{sampler}-seed{seed}" + ("-unpruned" if unpruned else "")
    preset = base.replace(name=name, search__sampler=sampler, search__seed=seed)
    if unpruned:
        preset = preset.replace(search__pruning=False)
    elif max_full_evaluations:
        preset = preset.replace(search__n_trials=4 * base.search.n_trials,
                                search__max_full_evaluations=max_full_evaluations)
    path = (out / f"{preset.name}.db").resolve()
    storage = open_storage(f"sqlite:///{path}")
    space = search_space_for(preset, workload)
    study = open_study(preset, storage, space, workload)
    if SETTINGS_ATTR not in study.user_attrs:  # a study from before they were recorded ran under today's command
        study.set_user_attr(SETTINGS_ATTR, search_settings(preset))
    seeds = json.loads(json.dumps([{"method": seed.method, "params": space.to_params(seed)}
                                   for seed in workload.seeds(space, preset.search.hand_made_seeds)]))
    donor = copy_seed_trials(study, seeds, out.glob(f"{base.name}-{sampler}-seed*.db"))
    if donor:
        print(f"{preset.name}: the seed trials copied from {donor}", file=sys.stderr, flush=True)
    # runs last hours on a CPU: say which study the trial bar below counts
    budget = f" or {max_full_evaluations} full-length evaluations" if preset.search.max_full_evaluations else ""
    print(f"{preset.name}: {preset.search.n_trials} trials{budget} in {path}", file=sys.stderr, flush=True)
    run_search(study, storage, workload, space, preset)
    return Run(sampler, seed, preset, study, workload.schedule(preset.search), unpruned)


def search_settings(preset: StudyPreset) -> dict:
    """The ``[search]`` settings a study's seed trials depend on: all but the seed and the budgets."""
    settings = {key: value for key, value in asdict(preset.search).items()
                if key not in ("seed", "n_trials", "max_full_evaluations")}
    return json.loads(json.dumps(settings))  # as a user attr reads back: tuples as lists


def copy_seed_trials(study: optuna.Study, seeds: list[dict], donors) -> str | None:
    """Open the new ``study`` with the seed trials of the first study in the SQLite files ``donors`` that has
    the same settings, workload and ``seeds`` (``{"method", "params"}`` records, as :data:`SEEDS_KEY` holds
    them) and ran all of its seed trials first; returns that study's name, ``None`` when there is none or
    ``study`` already has trials (a continued run keeps its own)."""
    if study.get_trials(deepcopy=False):
        return None
    same = (SETTINGS_ATTR, WORKLOAD_ATTR, STAGE_ATTR, SEARCH_SPACE_ATTR)
    for path in sorted(donors):
        name = path.stem
        if name == study.study_name:
            continue
        try:
            donor = optuna.load_study(study_name=name, storage=open_storage(f"sqlite:///{path.resolve()}"))
        except KeyError:  # a file of another study
            continue
        trials = sorted(donor.get_trials(deepcopy=False), key=lambda t: t.number)
        seed_trials = [trial for trial in trials if "seed" in trial.user_attrs]
        if (any(donor.user_attrs.get(key) != study.user_attrs.get(key) for key in same)
                or seed_records(donor) != seeds or trials[:len(seed_trials)] != seed_trials
                or any(trial.state not in (TrialState.COMPLETE, TrialState.PRUNED) for trial in seed_trials)):
            continue
        study._storage.set_study_system_attr(study._study_id, SEEDS_KEY, seeds)  # enqueue_seeds: already opened
        for trial in seed_trials:
            copied = copy.deepcopy(trial)
            copied.user_attrs = {"copied_from": f"{name}#{trial.number}", **trial.user_attrs}  # the first origin
            study.add_trial(copied)
        return name
    return None


def spread(values: list[float], digits: int) -> str:
    """``mean (min-max)``, or the one value, or ``-`` for none."""
    if len(values) < 2:
        return f"{values[0]:.{digits}f}" if values else "-"
    return f"{statistics.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


@command(interrupted="every finished trial is in its run's study under --out, and the running one's parameters "
                     "are queued to run first; run the same command to continue")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default="tiny", help="preset name or .toml path")
    parser.add_argument("--n-trials", type=int, help="finished trials per run (default: the preset's)")
    parser.add_argument("--samplers", default=",".join(SAMPLERS),
                        help="comma-separated, the reference first; among " + ", ".join(SAMPLERS))
    parser.add_argument("--seeds", type=comma_separated(int), default=(0,),
                        help="comma-separated seeds, one run per sampler and seed")
    parser.add_argument("--no-pruning", action="store_true", help="measure every trial on every window")
    parser.add_argument("--unpruned-reference", action="store_true",
                        help="the reference is the first sampler without pruning; every sampler then runs with "
                             "strict pruning (rank 1, margin 0) against it")
    parser.add_argument("--max-full-evaluations", type=positive(int),
                        help="the runs with pruning stop once they read this many searched windows at the target "
                             "length (at most 4x --n-trials trials) instead of at --n-trials; the reference without "
                             "pruning keeps --n-trials")
    parser.add_argument("--prefixes", type=comma_separated(float),
                        help="with pruning: prefix rungs as fractions of a window, e.g. 0.25")
    add_dtype_argument(parser, None, "override the preset's [model] dtype; a study continues only in the dtype it "
                       "began in, so give it when the runs move to a machine where auto picks another")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_samplers"))
    parser.add_argument("--html", type=Path, help="write the convergence figure of every run here")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    samplers, seeds = args.samplers.split(","), args.seeds
    base = load_preset(args.study).replace(search__n_trials=args.n_trials, model__dtype=checked_dtype(args.dtype))
    if args.no_pruning and args.unpruned_reference:
        parser.error("--no-pruning and --unpruned-reference exclude each other")
    if args.max_full_evaluations and not args.unpruned_reference:
        parser.error("--max-full-evaluations budgets the runs with pruning against --unpruned-reference")
    if args.no_pruning:
        base = base.replace(search__pruning=False)
    if args.unpruned_reference:
        base = base.replace(search__pruning=True, search__pruning_rank=1, search__pruning_margin=0.0)
    if args.prefixes:
        base = base.replace(search__pruning_prefixes=args.prefixes)
    workload = load_workload(base)
    args.out.mkdir(parents=True, exist_ok=True)
    with StopSignals():  # SIGTERM (a scheduler, `kill`) stops the runs as Ctrl-C does
        unpruned = {seed: run(base, workload, samplers[0], seed, args.out, unpruned=True)
                    for seed in seeds} if args.unpruned_reference else {}
        runs = {(sampler, seed): run(base, workload, sampler, seed, args.out,
                                     max_full_evaluations=args.max_full_evaluations)
                for sampler in samplers for seed in seeds}
    references = unpruned or {seed: runs[samplers[0], seed] for seed in seeds}
    every_run = [*unpruned.values(), *runs.values()]
    labels = list(dict.fromkeys(result.label for result in every_run))  # the reference first
    reference = labels[0]
    pruning = (f"rank {base.search.pruning_rank}, margin {base.search.pruning_margin:g}, prefix rungs "
               f"{list(base.search.pruning_prefixes)}" if base.search.pruning else "off")
    budget = (f"{base.search.n_trials} finished trials for the reference, {args.max_full_evaluations} full-length "
              f"evaluations for the others" if args.max_full_evaluations else
              f"{base.search.n_trials} finished trials per run")
    print(f"{base.name}: {budget}, pruning {pruning}, reference {reference}; "
          "cost = full-length window evaluations / windows read (a prefix rung as the share of a window it reads) "
          "/ trial seconds until the reference's best at that seed, as a share of the reference's whole run\n")
    print("| sampler | seed | best | held-out | best trial | evaluations to the reference's best | share "
          "| windows read share | seconds share |")
    print("|---|---|---|---|---|---|---|---|---|")
    shares: dict[str, list[float]] = {label: [] for label in labels}
    window_shares: dict[str, list[float]] = {label: [] for label in labels}
    for result in every_run:
        seed = result.seed
        target = references[seed]
        total = target.spent()
        reached = result.spent(until=target.best)
        if reached:
            shares[result.label].append(reached.full_evaluations / total.full_evaluations)
            window_shares[result.label].append(reached.windows / total.windows)
            cost = (f"{reached.full_evaluations} | {reached.full_evaluations / total.full_evaluations:.2f} "
                    f"| {reached.windows / total.windows:.2f} | {reached.seconds / total.seconds:.2f}")
        else:
            cost = "- | - | - | -"
        heldout = f"{result.heldout(workload):.4f}" if workload.heldout_windows else "-"
        print(f"| {result.label} | {seed} | {result.best:.4f} | {heldout} | {result.study.best_trial.number} "
              f"| {cost} |")
    print("\n| sampler | best, mean (min-max) | held-out, mean (min-max) | share of the reference's evaluations "
          "to reach its best | windows read share | reached |")
    print("|---|---|---|---|---|---|")
    for label in labels:
        of_label = [result for result in every_run if result.label == label]
        bests = [result.best for result in of_label]
        heldouts = [result.heldout(workload) for result in of_label] if workload.heldout_windows else []
        print(f"| {label} | {spread(bests, 4)} | {spread(heldouts, 4)} | {spread(shares[label], 2)} "
              f"| {spread(window_shares[label], 2)} | {len(shares[label])}/{len(seeds)} |")
    if args.html:
        figure = convergence([result.study for result in every_run])
        args.html.write_text(render_html({"convergence": figure}, f"Samplers on {base.name}"))
        print(f"\nconvergence figure: {args.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
