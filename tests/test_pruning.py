"""Multi-fidelity pruning: fidelity steps, stepwise values, and pruned trials in a real tiny study."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from hpo import study as study_module
from hpo.pruning import FidelityStep, ParentPruner, TrialCost, cost_to_reach, fidelity_schedule, trial_cost
from hpo.sampler import PARENTS_KEY, LongRoPESampler
from hpo.study import load_workload
from models.baselines import yarn
from studies import load_preset

GENERATION_KEY = LongRoPESampler._get_generation_key()
PARENT_CACHE = LongRoPESampler._get_parent_cache_key_prefix()

# The tiny preset with 3 searched windows, a half-window rung first, and pruning on. The random model's
# perplexities differ by about 1e-5 relative between factor sets, hence no margin.
PRESET = """target_length = 256
[model]
name = "tiny-random-llama"
dtype = "float32"
[data]
samples = 3
heldout_samples = 1
[search]
n_trials = 20
hand_made_seeds = false
population = 6
parents = 3
mutants = 2
crossovers = 2
start_tokens = [0, 2, 4]
attention_scaling = [1.0, 1.3]
pruning = true
pruning_margin = 0.0
pruning_prefixes = [0.5]
"""
FULL_STEPS = [256, 512, 768]
ALL_STEPS = [128, *FULL_STEPS]


def run_study(tmp_path, *extra: str, preset_text: str = PRESET) -> optuna.Study:
    preset = tmp_path / "tiny_pruning.toml"
    preset.write_text(preset_text)
    result = subprocess.run([sys.executable, "-m", "hpo.run", "--study", str(preset), "--out", str(tmp_path),
                             "--quiet", *extra], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return optuna.load_study(study_name="tiny_pruning", storage=f"sqlite:///{tmp_path / 'study.db'}")


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> optuna.Study:
    return run_study(tmp_path_factory.mktemp("pruning"))


def test_fidelity_schedule_counts_the_tokens_read():
    assert fidelity_schedule([256, 256, 256], (0.25, 0.5)) == [
        FidelityStep(0, 64, 64, True), FidelityStep(0, 128, 128, True),
        FidelityStep(0, 256, 256, False), FidelityStep(1, 256, 512, False), FidelityStep(2, 256, 768, False),
    ]
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        fidelity_schedule([256], (1.0,))


def test_a_trials_cost_counts_prefix_rungs_as_the_share_of_the_window_they_read():
    schedule = fidelity_schedule([256, 256], (0.25,))
    start = datetime(2026, 1, 1)

    def trial(number, steps, state, value=None, seconds=10.0):
        return FrozenTrial(number=number, state=state, value=value, datetime_start=start,
                           datetime_complete=start + timedelta(seconds=seconds), params={}, distributions={},
                           user_attrs={}, system_attrs={}, intermediate_values=dict.fromkeys(steps, 20.0),
                           trial_id=number)

    pruned = trial(0, [64], TrialState.PRUNED, seconds=2.0)
    complete = trial(1, [64, 256, 512], TrialState.COMPLETE, value=19.0)
    assert trial_cost(pruned, schedule) == TrialCost(0, 0.25, 2.0)
    assert trial_cost(complete, schedule) == TrialCost(2, 2.25, 10.0)
    assert cost_to_reach([pruned, complete], schedule, 19.0) == (TrialCost(2, 2.5, 12.0), complete)
    assert cost_to_reach([pruned, complete], schedule, 18.0) is None
    assert cost_to_reach([pruned, complete], schedule) == (TrialCost(2, 2.5, 12.0), None)


def test_stepwise_values_end_at_the_full_fitness():
    preset = load_preset("tiny").replace(data__samples=3, search__pruning=True, search__pruning_prefixes=(0.5,))
    workload = load_workload(preset)
    factors = yarn(workload.geometry, preset.target_length)
    schedule = workload.schedule(preset.search)
    assert [step.step for step in schedule] == ALL_STEPS
    assert [step.step for step in workload.schedule(preset.replace(search__pruning=False).search)] == FULL_STEPS
    measured = list(workload.trial_steps(factors, schedule))
    value, per_window = workload.split_perplexity(factors)
    assert measured[-1].value == value  # the same sums in the same order: bit for bit
    assert [m.perplexity for m in measured[1:]] == per_window
    prefix = workload.step_perplexity(factors, schedule[0])
    assert measured[0].value == prefix.perplexity and prefix.tokens == 127


def test_pruned_trials_keep_their_partial_values(study):
    trials = study.trials
    assert len(trials) == 20 and all(t.state.is_finished() for t in trials)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "nothing was pruned"
    for trial in pruned:
        steps = sorted(trial.intermediate_values)
        assert steps == ALL_STEPS[: len(steps)] and len(steps) < len(ALL_STEPS)
        assert trial.value == trial.intermediate_values[steps[-1]]
        assert len(trial.user_attrs["window_perplexities"]) == len(steps) - 1  # the prefix rung is no window
    for trial in trials:
        if trial.state == TrialState.COMPLETE:
            assert sorted(trial.intermediate_values) == ALL_STEPS
            assert trial.value == trial.intermediate_values[FULL_STEPS[-1]]


def test_pruned_trials_are_never_parents(study):
    trials = study.trials
    pruned = {t.number for t in trials if t.state == TrialState.PRUNED}
    bred_from = {n for t in trials for n in t.system_attrs.get(PARENTS_KEY, [])}
    assert bred_from and not bred_from & pruned
    id_to_number = {t._trial_id: t.number for t in trials}
    attrs = study._storage.get_study_system_attrs(study._study_id)
    cached = {id_to_number[i] for key, ids in attrs.items() if key.startswith(PARENT_CACHE) for i in ids}
    assert cached and not cached & pruned


def assert_pruned_exactly_when_behind(trials: list[optuna.trial.FrozenTrial], rank: int) -> None:
    """Each trial ran on while within the ``rank`` best complete trials before it, and stopped when it fell behind."""
    for trial in trials:  # one worker: a trial's pruning decisions saw exactly the trials numbered before it
        complete_before = [t for t in trials[: trial.number] if t.state == TrialState.COMPLETE]
        steps = sorted(trial.intermediate_values)
        for step in steps:
            values = sorted(t.intermediate_values[step] for t in complete_before if step in t.intermediate_values)
            within_rank = len(values) < rank or trial.intermediate_values[step] <= values[rank - 1]
            stopped_here = trial.state == TrialState.PRUNED and step == steps[-1]
            assert within_rank != stopped_here or step == FULL_STEPS[-1]


def test_pruning_stops_trials_behind_the_parents_and_pruned_trials_fill_generations(study):
    trials = study.trials
    assert_pruned_exactly_when_behind(trials, rank=3)
    assert any(t.state == TrialState.PRUNED for t in trials if t.system_attrs[GENERATION_KEY] == 0)
    sizes: dict[int, int] = {}
    for trial in trials:
        sizes[trial.system_attrs[GENERATION_KEY]] = sizes.get(trial.system_attrs[GENERATION_KEY], 0) + 1
    *full, _last = sorted(sizes)
    assert [sizes[g] for g in full] == [6] + [4] * (len(full) - 1)  # pruned trials count, as complete ones do


def test_a_stricter_rank_prunes_more_and_still_breeds_from_complete_trials(tmp_path, study):
    strict = run_study(tmp_path, preset_text=PRESET.replace("pruning = true\n", "pruning = true\npruning_rank = 1\n"))
    trials = strict.trials
    assert_pruned_exactly_when_behind(trials, rank=1)
    pruned = {t.number for t in trials if t.state == TrialState.PRUNED}
    assert len(pruned) > sum(t.state == TrialState.PRUNED for t in study.trials)
    bred_from = {n for t in trials for n in t.system_attrs.get(PARENTS_KEY, [])}
    assert bred_from and not bred_from & pruned
    assert len(trials) == 20


def test_no_pruning_measures_every_window(tmp_path):
    study = run_study(tmp_path, "--no-pruning", "--n-trials", "10")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 10
    assert all(sorted(t.intermediate_values) == FULL_STEPS for t in study.trials)  # no prefix rung either


def test_the_pruner_sees_trials_that_other_workers_completed_while_a_trial_ran():
    storage = optuna.storages.InMemoryStorage()
    pruner = ParentPruner(rank=2, margin=0.0)
    mine = optuna.create_study(storage=storage, study_name="shared", pruner=pruner)
    theirs = optuna.load_study(storage=storage, study_name="shared", pruner=pruner)
    running = mine.ask()
    running.report(5.0, step=1)
    assert not running.should_prune()  # no complete trial yet
    for value in (1.0, 2.0):  # another worker completes two trials meanwhile
        trial = theirs.ask()
        trial.report(value, step=2)
        theirs.tell(trial, value)
    running.report(3.0, step=2)
    assert running.should_prune()


def load_benchmark(monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "bench_pruning", Path(__file__).parents[1] / "benchmarks" / "pruning.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    return bench


def test_the_pruning_benchmark_compares_its_arms_and_an_interrupted_one_continues_with_reuse(
        tmp_path, monkeypatch, capsys):
    bench = load_benchmark(monkeypatch)
    args = ["--study", "tiny", "--samples", "2", "--n-trials", "6", "--margin", "0", "--out", str(tmp_path)]
    measure = study_module.Workload.step_perplexity
    calls = {"n": 0}

    def interrupted(self, factors, step, desc="trial"):
        calls["n"] += 1
        if calls["n"] == 15:  # in the pruned arm, after the run without pruning (6 trials of 2 windows)
            raise KeyboardInterrupt
        return measure(self, factors, step, desc=desc)

    monkeypatch.setattr(study_module.Workload, "step_perplexity", interrupted)
    assert bench.main(args) == 130
    assert "run the same command with --reuse to continue" in capsys.readouterr().err
    monkeypatch.setattr(study_module.Workload, "step_perplexity", measure)
    assert bench.main([*args, "--reuse"]) == 0
    table = capsys.readouterr().out
    # the run without pruning was read back, the pruned one continued to its budget
    assert "6 trials (6 with pruning)" in table and "| trials complete / pruned | 6 / 0 |" in table


def test_a_replay_prunes_what_a_live_run_prunes_until_a_parent_set_differs(tmp_path, monkeypatch):
    bench = load_benchmark(monkeypatch)
    windows_only = PRESET.replace("pruning_prefixes = [0.5]\n", "")  # a run without pruning has no rungs
    (tmp_path / "full").mkdir()
    (tmp_path / "live").mkdir()
    full = run_study(tmp_path / "full", "--no-pruning", preset_text=windows_only)
    live = run_study(tmp_path / "live", preset_text=windows_only)
    replayed, exact_until = bench.replay(full, ParentPruner(rank=3, margin=0.0))
    exact = slice(0, exact_until)
    assert [t.params for t in live.trials[exact]] == [t.params for t in full.trials[exact]]
    assert [t.state for t in replayed[exact]] == [t.state for t in live.trials[exact]]
    assert [sorted(t.intermediate_values) for t in replayed[exact]] == [
        sorted(t.intermediate_values) for t in live.trials[exact]]
    assert any(t.state == TrialState.PRUNED for t in replayed[exact])
