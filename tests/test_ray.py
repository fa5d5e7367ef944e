"""`python -m hpo.run --backend ray`: the tiny preset on a 2-CPU Ray instance, pruning through Tune, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import optuna
import pytest
import ray
from optuna.trial import TrialState
from ray.tune.search import Searcher

from hpo.ray_backend import METRIC, RayOptions, StudySearcher, concurrency
from hpo.run import main
from hpo.sampler import PARENTS_KEY, LongRoPESampler

GENERATION_KEY = LongRoPESampler._get_generation_key()


@pytest.fixture(scope="module", autouse=True)
def two_cpu_ray():
    """What CI has: a local Ray with 2 CPUs, started here so that hpo.run joins it."""
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def load_study(out_dir, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out_dir / 'study.db'}")


def test_tiny_preset_on_ray_keeps_one_model_per_worker(tmp_path):
    assert main(["--study", "tiny", "--out", str(tmp_path), "--backend", "ray", "--quiet"]) == 0
    trials = load_study(tmp_path, "tiny").trials
    assert len(trials) == 16 and all(t.state == TrialState.COMPLETE for t in trials)  # the preset's budget
    seeds = sorted(t.user_attrs["seed"] for t in trials if "seed" in t.user_attrs)
    assert seeds == ["ntk", "pi", "yarn", "yarn-linear"]
    # Two trials at a time on 2 CPUs, each in an actor that Tune reuses. How many actors get a trial is
    # Tune's choice, not ours: it hands the next trial to whichever is free, and on a busy CPU the second
    # actor's start-up (importing torch) takes longer than this whole study, so one may run them all.
    assert concurrency(RayOptions()) == 2
    workers = {t.user_attrs["worker"] for t in trials}
    assert 1 <= len(workers) <= 2
    assert {t.user_attrs["model_loads"] for t in trials} == {1}  # each worker loaded the model once
    assert all(len(t.user_attrs["window_perplexities"]) == 2 for t in trials)
    assert all(sorted(t.intermediate_values) == [256, 512] for t in trials)
    generations = [t.system_attrs[GENERATION_KEY] for t in trials]
    assert generations == sorted(generations) and max(generations) >= 2
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["trials"]["complete"] == 16 and summary["comparison"][-1]["method"].startswith("longrope")

    # The same study continues on the local backend: resume works on what Ray left.
    assert main(["--study", "tiny", "--out", str(tmp_path), "--n-trials", "18", "--quiet"]) == 0
    assert len(load_study(tmp_path, "tiny").trials) == 18


def test_tpe_on_ray_runs_the_budget_and_resumes_locally(tmp_path):
    assert main(["--study", "tiny", "--out", str(tmp_path), "--backend", "ray", "--sampler", "tpe", "--n-trials", "10",
                 "--quiet"]) == 0
    study = load_study(tmp_path, "tiny")
    trials = study.trials
    assert len(trials) == 10 and all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.user_attrs["seed"] for t in trials if "seed" in t.user_attrs) == ["ntk", "pi", "yarn",
                                                                                      "yarn-linear"]
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 10
    assert {t.user_attrs["model_loads"] for t in trials} == {1}
    best = json.loads((tmp_path / "best_factors.json").read_text())
    assert best["metadata"]["trial"] == study.best_trial.number
    assert main(["--study", "tiny", "--out", str(tmp_path), "--sampler", "tpe", "--n-trials", "12", "--quiet"]) == 0
    assert len(load_study(tmp_path, "tiny").trials) == 12


def test_ray_prunes_with_the_study_pruner(tmp_path):
    preset = tmp_path / "tiny_ray_pruning.toml"
    preset.write_text(
        'target_length = 256\n[model]\nname = "tiny-random-llama"\ndtype = "float32"\n'
        "[data]\nsamples = 3\nheldout_samples = 1\n"
        "[search]\nn_trials = 16\npopulation = 6\nparents = 3\nmutants = 2\ncrossovers = 2\n"
        "start_tokens = [0, 2, 4]\nattention_scaling = [1.0, 1.3]\npruning = true\npruning_margin = 0.0\n"
    )
    assert main(["--study", str(preset), "--out", str(tmp_path), "--backend", "ray", "--quiet"]) == 0
    trials = load_study(tmp_path, "tiny_ray_pruning").trials
    assert len(trials) == 16 and all(t.state.is_finished() for t in trials)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "nothing was pruned"
    for trial in pruned:  # stopped by Tune after a window, recorded with what it measured
        steps = sorted(trial.intermediate_values)
        assert steps in ([256], [256, 512]) and trial.value == trial.intermediate_values[steps[-1]]
    parents = {n for t in trials for n in t.system_attrs.get(PARENTS_KEY, [])}
    assert parents and not parents & {t.number for t in pruned}
    assert {t.user_attrs["model_loads"] for t in trials} == {1}


def test_sigterm_on_ray_requeues_the_running_trials_and_a_rerun_keeps_the_budget(tmp_path, monkeypatch):
    from hpo import ray_backend

    told = {"n": 0}
    real_on_trial_complete = ray_backend.StudySearcher.on_trial_complete

    def then_sigterm(self, trial_id, result=None, error=False):
        real_on_trial_complete(self, trial_id, result, error)
        told["n"] += 1
        if told["n"] == 3:  # another trial is running: Tune keeps 2 at a time on 2 CPUs
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ray_backend.StudySearcher, "on_trial_complete", then_sigterm)
    assert main(["--study", "tiny", "--out", str(tmp_path), "--backend", "ray", "--quiet"]) == 130
    trials = load_study(tmp_path, "tiny").trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    interrupted = [t for t in trials if t.user_attrs.get("interrupted")]
    assert interrupted and all(t.state == TrialState.FAIL for t in interrupted)
    waiting = {t.system_attrs["failed_trial"]: t.params for t in trials if t.state == TrialState.WAITING}
    assert waiting == {t.number: t.params for t in interrupted}  # re-queued at once, not after the grace period

    monkeypatch.setattr(ray_backend.StudySearcher, "on_trial_complete", real_on_trial_complete)
    assert main(["--study", "tiny", "--out", str(tmp_path), "--backend", "ray", "--quiet"]) == 0
    trials = load_study(tmp_path, "tiny").trials
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 16
    for trial in interrupted:  # their parameters ran again, to the end
        retried = [t for t in trials if t.system_attrs.get("failed_trial") == trial.number]
        assert [t.state for t in retried] == [TrialState.COMPLETE] and retried[0].params == trial.params


class RecordedTrials:
    """A StudyTrials stand-in that hands out one trial and records how it was finished."""

    def __init__(self, trial):
        self.trial, self.finished = trial, []

    def claim(self):
        trial, self.trial = self.trial, None
        return trial

    def report(self, trial, value, step, last):
        return False

    def finish(self, trial, value=None, state=None, user_attrs=None):
        self.finished.append((trial.number, value, state))


def test_the_searcher_tells_a_trial_once_and_then_says_finished():
    study = optuna.create_study()
    trials = RecordedTrials(study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}))
    searcher = StudySearcher(trials)
    assert set(searcher.suggest("tune-1")) == {"x"}  # the study trial's parameters, handed to Tune
    assert searcher.suggest("tune-2") == Searcher.FINISHED
    result = {METRIC: 1.5, "fidelity_step": 0, "complete": True}
    searcher.on_trial_complete("tune-1", result)
    searcher.on_trial_complete("tune-1", result)  # Tune may report a completion twice: told once
    assert trials.finished == [(0, 1.5, None)]


def test_unreachable_ray_address_is_a_clear_error(tmp_path):
    # In a subprocess: this module's Ray instance would be joined instead.
    result = subprocess.run([sys.executable, "-m", "hpo.run", "--study", "tiny", "--out", str(tmp_path), "--quiet",
                             "--backend", "ray", "--ray-address", "127.0.0.1:1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "cannot reach a Ray cluster at '127.0.0.1:1'" in result.stderr


def test_too_few_resources_for_one_trial(tmp_path, capsys):
    assert main(["--study", "tiny", "--out", str(tmp_path), "--backend", "ray", "--gpus-per-trial", "1"]) == 2
    assert "the Ray cluster has 2 CPUs and 0 GPUs: not enough for one trial" in capsys.readouterr().err


def test_missing_ray_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.delitem(sys.modules, "hpo.ray_backend", raising=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` finds when Ray is not installed
    assert main(["--study", "tiny", "--out", str(tmp_path), "--backend", "ray", "--quiet"]) == 2
    assert "--backend ray needs Ray Tune: pip install 'ray[tune]'" in capsys.readouterr().err
