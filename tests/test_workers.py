"""Several `hpo.run` processes on one PostgreSQL study: the exact budget, no repeats, consistent generations."""

from __future__ import annotations

import multiprocessing
import shutil
import subprocess
import sys
import warnings

import optuna
from optuna.trial import TrialState

from hpo import records
from hpo.records import StorageError, open_storage
from hpo.sampler import PARENTS_KEY, LongRoPESampler
from hpo.study import load_workload, open_study, search_space_for
from hpo.trials import TrialClaims
from studies import PRESET_DIR, load_preset
from tests.conftest import deadline

GENERATION_KEY = LongRoPESampler._get_generation_key()


def grid_key(params: dict) -> tuple:
    return tuple(round(value / 0.01) if isinstance(value, float) else value for _, value in sorted(params.items()))


def test_two_processes_finish_exactly_the_asked_trials(tmp_path, postgres_url):
    # Its own study name: the PostgreSQL server is shared with tests/test_run.py's "tiny" study.
    preset = tmp_path / "tiny_workers.toml"
    shutil.copy(PRESET_DIR / "tiny.toml", preset)
    n_trials = 20
    workers = [
        subprocess.Popen([sys.executable, "-m", "hpo.run", "--study", str(preset), "--storage", postgres_url,
                          "--out", str(tmp_path / name), "--n-trials", str(n_trials), "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in ("a", "b")
    ]
    for worker in workers:
        _, stderr = worker.communicate(timeout=600)
        assert worker.returncode == 0, stderr

    trials = optuna.load_study(study_name="tiny_workers", storage=postgres_url).trials
    assert len(trials) == n_trials and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both processes evaluated trials
    assert len({grid_key(t.params) for t in trials}) == n_trials  # no parameter vector evaluated twice
    seeds = sorted(t.user_attrs["seed"] for t in trials if "seed" in t.user_attrs)
    assert seeds == ["ntk", "pi", "yarn", "yarn-linear"]

    generations = [t.system_attrs[GENERATION_KEY] for t in trials]
    assert generations == sorted(generations)  # claimed in turn: a generation never reopens
    sizes = {g: generations.count(g) for g in set(generations)}
    *full, last = sorted(sizes)
    assert full == list(range(last)) and last >= 2
    for g in full:  # each may take one trial too many: the other worker's trial still running when it filled
        assert (6 if g == 0 else 4) <= sizes[g] <= (6 if g == 0 else 4) + 1
    for trial in trials:
        for parent in trial.system_attrs.get(PARENTS_KEY, []):
            assert trials[parent].system_attrs[GENERATION_KEY] < trial.system_attrs[GENERATION_KEY]


def test_a_claim_counts_running_trials(tmp_path):
    preset = load_preset("tiny")
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    workload = load_workload(preset)
    space = search_space_for(preset, workload)
    study = open_study(preset, storage, space, workload)
    claims = TrialClaims(storage, study.study_name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # claims run without Optuna's heartbeat and experimental warnings
        first = claims.claim(study, space.distributions(), n_trials=1)
        assert first is not None and claims.claim(study, space.distributions(), n_trials=1) is None
        study.tell(first, 1.0)
        assert claims.claim(study, space.distributions(), n_trials=1) is None
        assert claims.claim(study, space.distributions(), n_trials=2).number == 1
    assert (tmp_path / "study.db.claims.lock").exists()


def test_a_trial_killed_before_its_first_heartbeat_is_failed_and_requeued(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "HEARTBEAT_INTERVAL_S", 1)
    monkeypatch.setattr(records, "GRACE_PERIOD_S", 1)
    preset = load_preset("tiny")
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    workload = load_workload(preset)
    space = search_space_for(preset, workload)
    study = open_study(preset, storage, space, workload)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Optuna: heartbeats outside study.optimize
        orphan = study.ask(space.distributions())  # RUNNING, and its worker died before any heartbeat
    claims = TrialClaims(storage, study.study_name)
    assert claims.claim(study, space.distributions(), n_trials=1) is None  # the orphan holds the budget...
    with deadline(60, "the orphan to go stale"):
        claims.wait(study, poll_s=0.1)  # ...until it goes stale: wait() returns instead of waiting for it forever
    trials = study.trials
    assert trials[orphan.number].state == TrialState.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING and retry[0].params == orphan.params


def _open_together(barrier, url: str, outcomes) -> None:
    barrier.wait()
    try:
        open_storage(url)
        outcomes.put("ok")
    except StorageError as error:
        outcomes.put(str(error))


def test_workers_opening_a_fresh_sqlite_study_together_all_succeed(tmp_path):
    """Optuna creates its tables on first open; workers started together race to do it (SQLite said
    "table studies already exists" to the losers)."""
    context = multiprocessing.get_context("fork")  # the race needs opens within milliseconds of each other
    for attempt in range(4):
        url = f"sqlite:///{tmp_path / f'fresh{attempt}.db'}"
        barrier, outcomes = context.Barrier(4), context.Queue()
        workers = [context.Process(target=_open_together, args=(barrier, url, outcomes)) for _ in range(4)]
        for worker in workers:
            worker.start()
        results = [outcomes.get(timeout=120) for _ in workers]
        for worker in workers:
            worker.join(timeout=60)
        assert results == ["ok"] * 4, results
