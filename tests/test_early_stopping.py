"""Early stopping (hpo/early_stopping.py): the rules on hand-built studies, presets, and tiny runs that stop."""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
import pytest
import ray
from optuna.trial import TrialState

from hpo.early_stopping import budget_reason, stop_reason
from hpo.pruning import fidelity_schedule
from hpo.records import GENERATION_KEY, STOPPED_ATTR
from hpo.run import main
from studies import PresetError, list_presets, load_preset

TINY = Path(__file__).resolve().parents[1] / "studies" / "tiny.toml"
PAPER_PRESETS = ("llama2_16k", "llama2_32k", "llama2_128k", "llama2_256k", "mistral_32k", "llama3_128k")


def make_study(generations: list[list[float]], direction: str = "minimize") -> optuna.Study:
    """An in-memory study with one complete trial per value, generation by generation."""
    study = optuna.create_study(direction=direction)
    for generation, values in enumerate(generations):
        for value in values:
            add(study, generation, value)
    return study


def add(study: optuna.Study, generation: int, value: float | None, state: TrialState = TrialState.COMPLETE) -> None:
    study.add_trial(optuna.trial.create_trial(state=state, value=value, system_attrs={GENERATION_KEY: generation}))


def test_flat_best_over_the_window_stops():
    # Generations 0..2 are complete (a generation-3 trial exists); the best stays 10.0 from 0 to 2.
    study = make_study([[12.0, 10.0], [11.0], [10.0005], [13.0]])
    assert stop_reason(study, delta=0.001, generations=2) == (
        "best 10.0000 changed by 0 < 0.001 over the last 2 generations (generations 0-2)")
    assert stop_reason(study, delta=0.001, generations=3) is None  # generation 3 is not complete yet


def test_improvement_larger_than_delta_within_the_window_goes_on():
    study = make_study([[10.0], [9.99], [10.5], [11.0]])
    assert stop_reason(study, delta=0.001, generations=2) is None  # 10 -> 9.99 over generations 0-2
    add(study, 4, 12.0)  # completes generation 3: no improvement over generations 1-3
    assert stop_reason(study, delta=0.001, generations=2) == (
        "best 9.9900 changed by 0 < 0.001 over the last 2 generations (generations 1-3)")


def test_change_equal_to_delta_goes_on_and_a_slow_creep_stops():
    assert stop_reason(make_study([[10.0], [9.5], [9.0]]), delta=0.5, generations=1) is None  # 0.5 is not < 0.5
    creep = make_study([[10.0], [9.75], [9.5], [9.25], [20.0]])  # 0.25 per generation (exact in binary)
    assert stop_reason(creep, delta=0.75, generations=2) == (
        "best 9.5000 changed by 0.5 < 0.75 over the last 2 generations (generations 0-2)")
    assert stop_reason(creep, delta=0.5, generations=2) is None  # 0.5 per 2 generations is not < 0.5


def test_fewer_generations_than_the_window_go_on():
    study = make_study([[10.0, 11.0], [12.0], [13.0]])  # generations 0 and 1 complete
    assert stop_reason(study, delta=1e9, generations=2) is None
    assert stop_reason(study, delta=1e9, generations=1) is not None
    assert stop_reason(optuna.create_study(), delta=1e9, generations=1) is None


def test_generation_size_completes_the_newest_generation_and_running_trials_hold_it_open():
    study = make_study([[10.0, 11.0], [12.0], [13.0, 14.0]])  # generation 2 is the newest
    assert stop_reason(study, delta=1e9, generations=2) is None
    assert stop_reason(study, delta=1e9, generations=2, generation_size=lambda g: 2) is not None  # full
    assert stop_reason(study, delta=1e9, generations=2, generation_size=lambda g: 3) is None  # one more to go
    add(study, 2, None, TrialState.RUNNING)  # a trial of generation 2 still running: not complete
    assert stop_reason(study, delta=1e9, generations=2, generation_size=lambda g: 2) is None
    add(study, 3, 15.0)
    assert stop_reason(study, delta=1e9, generations=2) is None


def test_only_complete_trials_make_the_best():
    study = make_study([[10.0], [11.0], [12.0], [13.0]])
    add(study, 1, 5.0, TrialState.PRUNED)  # lower, but pruned: no best
    add(study, 2, None, TrialState.FAIL)
    assert stop_reason(study, delta=0.001, generations=2) is not None
    add(study, 2, 9.0)  # a complete one that improves by 1 within generations 0-2
    assert stop_reason(study, delta=0.001, generations=2) is None


def test_maximized_study_stops_when_the_best_stops_rising():
    assert stop_reason(make_study([[1.0], [2.0], [3.0]], "maximize"), delta=0.5, generations=1) is None
    flat = make_study([[3.0], [2.0], [1.0]], "maximize")
    assert stop_reason(flat, delta=0.5, generations=1) == (
        "best 3.0000 changed by 0 < 0.5 over the last 1 generations (generations 0-1)")


def test_paper_presets_stop_like_the_reference_and_the_cpu_ones_do_not():
    for name in list_presets():
        search = load_preset(name).search
        if name in PAPER_PRESETS:
            assert (search.early_stop_generations, search.early_stop_delta) == (20, 0.001), name
        else:
            assert search.early_stop_generations is None, name


@pytest.mark.parametrize(("line", "message"), [
    ("early_stop_delta = -0.1", "search.early_stop_delta must be a number >= 0"),
    ('early_stop_delta = "small"', "search.early_stop_delta must be a number >= 0"),
    ("early_stop_delta = nan", "search.early_stop_delta must be a number >= 0"),
    ("early_stop_generations = 0", "search.early_stop_generations must be a positive integer"),
    ("early_stop_generations = 2.5", "search.early_stop_generations must be a positive integer"),
    ("early_stop_generations = true", "search.early_stop_generations must be a positive integer"),
    ("max_full_evaluations = 0", "search.max_full_evaluations must be a positive integer"),
    ("max_full_evaluations = 2.5", "search.max_full_evaluations must be a positive integer"),
])
def test_bad_early_stop_settings_are_rejected(tmp_path, line, message):
    path = tmp_path / "bad.toml"
    path.write_text(TINY.read_text().replace("[search]\n", f"[search]\n{line}\n"))
    with pytest.raises(PresetError, match=message):
        load_preset(str(path))


def flat_preset(directory: Path, early_stop: bool = True) -> Path:
    """The tiny preset with a budget of 60 and, with ``early_stop``, any change counting as flat.

    One searched window and none held out, to keep it fast.
    """
    directory.mkdir(parents=True, exist_ok=True)
    extra = "\nearly_stop_generations = 2\nearly_stop_delta = 1e9" if early_stop else ""
    text = TINY.read_text()
    for old, new in (("n_trials = 16", f"n_trials = 60{extra}"),
                     ("samples = 2\nheldout_samples = 1", "samples = 1\nheldout_samples = 0")):
        assert old in text
        text = text.replace(old, new)
    path = directory / "tiny_flat.toml"
    path.write_text(text)
    return path


def test_tiny_run_stops_after_the_window_and_a_rerun_adds_no_trial(tmp_path, capsys, caplog):
    out = tmp_path / "out"
    command = ["--study", str(flat_preset(tmp_path)), "--out", str(out), "--quiet"]
    assert main(command) == 0
    storage = f"sqlite:///{out / 'study.db'}"
    study = optuna.load_study(study_name="tiny_flat", storage=storage)
    trials = study.trials
    # Generation 0 holds 6 trials, every later one 2 mutants + 2 crossovers: it stops once generation 2 is done.
    assert len(trials) == 6 + 4 + 4 and all(t.state == TrialState.COMPLETE for t in trials)
    assert max(t.system_attrs[GENERATION_KEY] for t in trials) == 2
    reason = study.user_attrs[STOPPED_ATTR]
    assert reason.endswith("over the last 2 generations (generations 0-2)")
    printed = capsys.readouterr().out
    assert "14 trials in the study" in printed and f"stopped early: {reason}" in printed

    caplog.set_level(logging.INFO, logger="hpo.study")
    assert main(command[:-1]) == 0  # the same command (logging on): no new trial, the reason again
    assert len(optuna.load_study(study_name="tiny_flat", storage=storage).trials) == 14
    assert f"stopped early: {reason}" in capsys.readouterr().out
    assert f"early stop: {reason}; no new trials" in caplog.text

    # With early stopping off the same study goes on, and no longer claims to have stopped.
    assert main(["--study", str(flat_preset(tmp_path / "off", early_stop=False)), "--out", str(out), "--quiet",
                 "--n-trials", "16"]) == 0
    study = optuna.load_study(study_name="tiny_flat", storage=storage)
    assert len(study.trials) == 16 and study.user_attrs.get(STOPPED_ATTR) is None
    assert "stopped early" not in capsys.readouterr().out


def test_ray_backend_stops_asking_for_trials(tmp_path, capsys):
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        out = tmp_path / "out"
        command = ["--study", str(flat_preset(tmp_path)), "--out", str(out), "--backend", "ray", "--quiet"]
        assert main(command) == 0
        study = optuna.load_study(study_name="tiny_flat", storage=f"sqlite:///{out / 'study.db'}")
        # Two trials at a time: a generation may get one trial more than its size (asked while its last was
        # running), and trials of generation 3 are asked until generation 2 has no running trial.
        count = len(study.trials)
        assert 14 <= count <= 24 and all(t.state == TrialState.COMPLETE for t in study.trials)
        assert max(t.system_attrs[GENERATION_KEY] for t in study.trials) <= 3
        reason = study.user_attrs[STOPPED_ATTR]
        assert reason.endswith("(generations 0-2)") and f"stopped early: {reason}" in capsys.readouterr().out
        assert main(command) == 0
        assert len(optuna.load_study(study_name="tiny_flat", storage=f"sqlite:///{out / 'study.db'}").trials) == count
    finally:
        ray.shutdown()


def test_the_budget_counts_full_length_windows_of_finished_trials():
    schedule = fidelity_schedule([100, 100], prefixes=(0.5,))  # steps 50 (a prefix rung), 100 and 200
    study = optuna.create_study()
    for state, steps in ((TrialState.COMPLETE, (50, 100, 200)), (TrialState.PRUNED, (50,)),
                         (TrialState.PRUNED, (50, 100)), (TrialState.FAIL, (50, 100, 200))):
        study.add_trial(optuna.trial.create_trial(state=state, value=1.0 if state != TrialState.FAIL else None,
                                                  intermediate_values={step: 1.0 for step in steps}))
    # 2 windows of the complete trial and 1 of the trial pruned after its first window; not the failed one's
    assert budget_reason(study, schedule, max_full_evaluations=3) == (
        "3 full-length evaluations spent, the budget is 3 (max_full_evaluations)")
    assert budget_reason(study, schedule, max_full_evaluations=4) is None


def test_a_run_stops_at_its_budget_of_full_length_evaluations_and_goes_on_with_a_larger_one(tmp_path, capsys):
    out = tmp_path / "out"
    command = ["--study", str(flat_preset(tmp_path, early_stop=False)), "--out", str(out), "--quiet"]
    assert main([*command, "--max-full-evaluations", "5"]) == 0  # one searched window: one evaluation a trial
    storage = f"sqlite:///{out / 'study.db'}"
    study = optuna.load_study(study_name="tiny_flat", storage=storage)
    assert len(study.trials) == 5 and study.user_attrs[STOPPED_ATTR].startswith("5 full-length evaluations spent")
    assert "stopped early: 5 full-length evaluations spent, the budget is 5" in capsys.readouterr().out

    assert main([*command, "--max-full-evaluations", "7"]) == 0
    study = optuna.load_study(study_name="tiny_flat", storage=storage)
    assert len(study.trials) == 7 and study.user_attrs[STOPPED_ATTR].startswith("7 full-length evaluations spent")
