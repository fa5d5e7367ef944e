"""Run a study's trials on Ray Tune: ``python -m hpo.run --study NAME --backend ray``.

Only the middle step of :mod:`hpo.study`'s flow changes: the study, its storage, sampler, seeds,
pruner, claims and reports are the local backend's, and Ray Tune decides where each trial runs.

- :class:`StudySearcher` implements Tune's public ``Searcher`` contract over the study: it claims,
  reports and records every trial through :class:`~hpo.trials.StudyTrials`, the bookkeeping the local
  loop uses (the study's sampler proposes, the claims keep the budget exact with other processes on the
  same study, the heartbeats run in the driver).
- :class:`StudyScheduler` reports each fidelity step to the study and stops the Tune trial when
  the study's :class:`~hpo.pruning.ParentPruner` prunes it: the local backend's decisions, in
  place of ASHA, whose rungs compare the trials of one Tune run only and forget them on resume.
- :class:`StudyTrainable` is one study trial per Tune trial and one fidelity step per Tune
  iteration. Tune reuses its actors (``reuse_actors=True``) and the workload lives in a cache of
  the worker process (:func:`worker_workload`), so each worker loads the model once and keeps it
  for every trial it runs.

Only the driver touches the storage, so workers on other machines need the package and the
model/data, not the database.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from hpo.records import ERROR_ATTR, worker_name
from hpo.search_space import RopeSearchSpace
from hpo.study import BackendError, Workload, load_workload, search_space_for
from hpo.trials import StopSignals, StudyTrials
from models.loading import connection_error
from studies import StudyPreset

METRIC = "perplexity"
# Result keys copied onto the study trial's user attrs (the local objective records the same ones).
RESULT_ATTRS = ("worker", "model_loads", "seconds", "window_perplexities", ERROR_ATTR)


@dataclass(frozen=True)
class RayOptions:
    """Where trials run and how much of the cluster each one takes.

    ``address`` joins a running cluster (``host:port``, ``ray://host:port`` or ``auto``); ``None``
    starts a local Ray instance. ``max_concurrent`` ``None`` runs as many trials at once as the
    cluster's CPUs and GPUs hold.
    """

    address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None


def _check_reachable(address: str) -> None:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    error = connection_error(host, int(port), timeout_s=5) if port.isdigit() else f"no port in {address!r}"
    if error:
        raise BackendError(f"cannot reach a Ray cluster at {address!r} ({error}); "
                           "--ray-address takes the head node's host:port")


def connect(options: RayOptions) -> None:
    """Join the cluster at ``options.address`` or start a local Ray; keep one already initialised.

    A test or a notebook may call ``ray.init(num_cpus=2)`` first; that instance is used as is.
    Raises :class:`~hpo.study.BackendError` when the cluster cannot be reached or started, or has
    too few CPUs or GPUs for one trial.
    """
    if not ray.is_initialized():
        if options.address not in (None, "auto", "local"):
            _check_reachable(options.address)
        try:
            ray.init(address=options.address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise BackendError(f"cannot start or join Ray ({options.address or 'local'}): {error}") from None
    concurrency(options)


def concurrency(options: RayOptions) -> int:
    """How many trials run at once: ``max_concurrent``, or as many as the cluster's resources hold.

    Raises :class:`~hpo.study.BackendError` when not even one trial fits: Tune would wait forever.
    """
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    slots = cpus // options.cpus_per_trial
    if options.gpus_per_trial > 0:
        slots = min(slots, gpus // options.gpus_per_trial)
    if slots < 1:
        raise BackendError(f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs: not enough for one trial "
                           f"with {options.cpus_per_trial:g} CPUs and {options.gpus_per_trial:g} GPUs")
    return int(slots) if options.max_concurrent is None else options.max_concurrent


@functools.lru_cache(maxsize=1)
def worker_workload(preset: StudyPreset) -> Workload:
    """This process's workload for ``preset``: loaded on first use, then kept for every later trial."""
    return load_workload(preset)


def model_loads() -> int:
    """How many times this process has loaded a model (1 in a worker that Tune reuses)."""
    return worker_workload.cache_info().misses


class StudyTrainable(tune.Trainable):
    """One Tune trial is one study trial; each Tune iteration measures one fidelity step.

    The config is the study trial's parameters (from :class:`StudySearcher`). :meth:`setup` runs
    once per actor and :meth:`reset_config` for every further trial Tune hands the same actor, so
    the model is loaded once per worker process and a trial only changes the RoPE patch.

    Each result has the running ``perplexity`` at Optuna step ``fidelity_step``, ``complete`` (and
    ``done``) on the last step, the worker's name and model load count, the seconds and per-window
    perplexities so far, and ``error`` (with ``done``) when measuring raised.
    """

    def setup(self, config: dict[str, Any], preset: StudyPreset) -> None:
        self._workload = worker_workload(preset)
        self._space = search_space_for(preset, self._workload)
        self._schedule = self._workload.schedule(preset.search)
        self.reset_config(config)

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        self._measurements = self._workload.trial_steps(self._space.to_factors(new_config), self._schedule)
        self._window_perplexities: list[float] = []
        self._started = time.perf_counter()
        return True

    def step(self) -> dict[str, Any]:
        result: dict[str, Any] = {"worker": worker_name(), "model_loads": model_loads()}
        try:
            measured = next(self._measurements)
        except Exception as error:  # recorded on the study trial, as the local objective does
            return {**result, METRIC: math.nan, ERROR_ATTR: f"{type(error).__name__}: {error}", "done": True}
        if not measured.step.prefix:
            self._window_perplexities.append(measured.perplexity)
        complete = measured.step == self._schedule[-1]
        return {**result, METRIC: measured.value, "fidelity_step": measured.step.step, "complete": complete,
                "done": complete, "seconds": round(time.perf_counter() - self._started, 2),
                "window_perplexities": list(self._window_perplexities)}


class StudySearcher(Searcher):
    """Ray Tune's search algorithm over the study: Tune's public :class:`~ray.tune.search.Searcher` contract,
    with every trial claimed, reported and recorded by :class:`~hpo.trials.StudyTrials` as a local run does.

    - :meth:`suggest` claims the next study trial (:data:`Searcher.FINISHED` once the study needs no more:
      its budget is held or early stopping fired) and hands its parameters to Tune as the trial's config;
      the study's sampler proposed them, so every sampler runs on Ray alike.
    - :meth:`report` (called by :class:`StudyScheduler` for every result but the last) records the
      running value at its step and asks the study's pruner.
    - :meth:`on_trial_complete` tells the study: COMPLETE after the last step, PRUNED when the pruner
      stopped it, FAIL when measuring raised or the worker died, with the result's user attrs
      (:data:`RESULT_ATTRS`); a trial Tune stopped before its last step (an interrupted run) is
      interrupted (its parameters run first next time), as :meth:`close` does for those Tune never
      completed. A second completion of the same trial is ignored.

    The study is the only checkpoint: :meth:`save` writes nothing, and a run is resumed by running the
    same command again.
    """

    def __init__(self, trials: StudyTrials) -> None:
        super().__init__(metric=METRIC, mode="min")
        self._trials = trials
        self._running: dict[str, optuna.Trial] = {}  # by Tune's trial id
        self._pruned: set[str] = set()

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        trial = self._trials.claim()
        if trial is None:
            return Searcher.FINISHED
        self._running[trial_id] = trial
        return dict(trial.params)

    def report(self, trial_id: str, result: dict[str, Any]) -> bool:
        """Record ``result``'s running value on the study trial; whether the study's pruner prunes it."""
        if self._trials.report(self._running[trial_id], result[METRIC], result["fidelity_step"],
                               last=result["complete"]):
            self._pruned.add(trial_id)
        return trial_id in self._pruned

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Nothing: :class:`StudyScheduler` reports every result before Tune calls this."""

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        trial = self._running.pop(trial_id, None)
        if trial is None:  # already told
            return
        result = result or {}
        attrs = {key: result[key] for key in RESULT_ATTRS if key in result}
        if trial_id in self._pruned:
            self._trials.finish(trial, state=TrialState.PRUNED, user_attrs=attrs)
        elif result.get("complete") and not error:
            # the last result never reaches the scheduler, so its step is recorded here
            self._trials.report(trial, result[METRIC], result["fidelity_step"], last=True)
            self._trials.finish(trial, result[METRIC], user_attrs=attrs)
        elif error or ERROR_ATTR in result:
            attrs.setdefault(ERROR_ATTR, "the Ray worker died")
            self._trials.finish(trial, state=TrialState.FAIL, user_attrs=attrs)
        else:  # stopped by Tune before its last step
            self._trials.interrupt(trial)

    def save(self, checkpoint_path: str) -> None:
        """Nothing to save: the study storage is the checkpoint."""

    def restore(self, checkpoint_path: str) -> None:
        """Nothing to restore: a resumed run reads the study storage."""

    def close(self) -> None:
        """Interrupt the trials Tune never completed (a run that Ctrl-C or SIGTERM broke off), so their
        parameters run first next time."""
        for trial in self._running.values():
            self._trials.interrupt(trial)
        self._running.clear()


class StudyScheduler(FIFOScheduler):
    """First-in-first-out scheduling that stops a Tune trial when the study's pruner prunes it."""

    def __init__(self, searcher: StudySearcher) -> None:
        super().__init__()
        self._searcher = searcher

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        return TrialScheduler.STOP if self._searcher.report(trial.trial_id, result) else TrialScheduler.CONTINUE


def run_search_ray(study: optuna.Study, storage: RDBStorage, workload: Workload, space: RopeSearchSpace,
                   preset: StudyPreset, options: RayOptions, out_dir: Path, progress: bool = True,
                   stop_signals: StopSignals | None = None) -> None:
    """:func:`hpo.study.run_search` with Ray Tune placing the trials; call :func:`connect` first.

    Runs trials until the study holds ``preset.search.n_trials`` complete or pruned ones, or until
    early stopping or the budget of full-length evaluations stops it as it does locally, and none runs.
    Ctrl-C or SIGTERM raises ``KeyboardInterrupt`` once the running trials are ended with
    :func:`~hpo.trials.interrupt_trial` and Ray is shut down (its trial actors with it).
    ``workload`` is the driver's (for the seeds' geometry); the workers load their own.
    Tune's own files go to ``out_dir/ray_results``.
    """
    trials = StudyTrials(study, storage, space, workload.seeds(space, preset.search.hand_made_seeds),
                         preset.search, workload.schedule(preset.search), progress)
    # Tune passes this on to its trainables: they stay in the driver's directory, so relative
    # model and data paths in a preset work as they do locally.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    # Tune's own Ctrl-C handler ends the run as if it had finished; without it Ctrl-C (and SIGTERM, which
    # hpo.run turns into Ctrl-C) leaves fit with KeyboardInterrupt, and the held trials are re-queued below.
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    trainable = tune.with_resources(tune.with_parameters(StudyTrainable, preset=preset),
                                    {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial})
    try:
        while True:
            searcher = StudySearcher(trials)
            claimed = trials.claimed
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=searcher, scheduler=StudyScheduler(searcher), num_samples=-1,
                                            max_concurrent_trials=concurrency(options), reuse_actors=True),
                run_config=tune.RunConfig(name=f"{study.study_name}-{time.strftime('%Y%m%d-%H%M%S')}",
                                          storage_path=str((out_dir / "ray_results").resolve()), verbose=0,
                                          # Tune checkpoints class trainables at the end by default; the study is
                                          # the record.
                                          checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False)),
            )
            try:
                tuner.fit()
                if stop_signals is not None:  # a signal Python dropped inside Tune
                    stop_signals.check()
            finally:
                searcher.close()
            # As the local loop: wait for the other processes' last trials, then claim again, since a trial
            # that failed meanwhile (here or there) freed its place; done once a run claims nothing.
            trials.wait_for_others()
            if trials.claimed == claimed:
                return
    except KeyboardInterrupt:
        # Tune's cleanup did not run: the interrupted fit's trial actors would hold their CPUs and GPUs in a
        # Ray that outlives this call (a notebook's, or a test's), so later runs could not place a trial.
        ray.shutdown()
        raise
    finally:
        trials.close()
