"""A study's trial bookkeeping, the same for every backend: claim, heartbeat, report, prune, tell.

The local loop (:func:`hpo.study.run_search`, one trial after another) and the Ray searcher
(:class:`hpo.ray_backend.StudySearcher`, trials placed by Ray Tune) differ only in where a trial is
measured. Both hand trials out, report their steps, prune and record them through one
:class:`StudyTrials`, so a trial ends the same way whichever backend ran it.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.storages._heartbeat import BaseHeartbeatThread, get_heartbeat_thread
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from hpo.early_stopping import forget_stale_stop, stopper
from hpo.records import ERROR_ATTR, EVALUATED, TrialClaims, interrupt_trial, interrupts_held
from hpo.sampler import enqueue_seeds
from hpo.search_space import RopeSearchSpace
from models.rope import RopeFactors
from studies import SearchSpec

logger = logging.getLogger("hpo.study")


def open_claims(study: optuna.Study, storage: RDBStorage, space: RopeSearchSpace,
                seeds: list[RopeFactors]) -> TrialClaims:
    """The study's :class:`~hpo.records.TrialClaims`, with ``seeds`` enqueued once per study.

    The seeds are enqueued under the claims lock: the first worker enqueues them, the others find
    them recorded (unlocked, two workers starting together would both enqueue them).
    """
    claims = TrialClaims(storage, study.study_name)
    with claims.locked():
        enqueue_seeds(study, space, seeds)
    return claims


class TrialProgress:
    """A progress bar over the study's complete and pruned trials (the budget), with the best value so far."""

    def __init__(self, study: optuna.Study, n_trials: int, enabled: bool = True) -> None:
        done = len(study.get_trials(deepcopy=False, states=EVALUATED))
        self._bar = tqdm(total=n_trials, initial=min(done, n_trials), desc="trials", unit="trial",
                         disable=not enabled)

    def update(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Advance for a finished trial and show the best value so far."""
        self._bar.update(int(trial.state in EVALUATED))
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if completed:
            self._bar.set_postfix(best=f"{min(t.value for t in completed):.3f}", last=trial.state.name.lower())

    def close(self) -> None:
        """End the bar."""
        self._bar.close()


class StudyTrials:
    """The trials one process runs on a study, from claim to record.

    - :meth:`claim` takes the next trial through :class:`~hpo.records.TrialClaims` (``None`` once the
      study holds ``n_trials`` running, complete or pruned trials, or once early stopping fires) and
      starts its heartbeat in this process;
    - :meth:`report` records a step's running value and asks the study's pruner, never after the last
      step, where pruning would save nothing;
    - :meth:`finish` stops the heartbeat, stores the trial's user attrs and tells the study how it ended:
      COMPLETE with its value (FAIL when the value is not finite), PRUNED with its last running value, or
      FAIL with the error; the result is committed with signals held, so Ctrl-C cannot lose it;
    - :meth:`interrupt` ends a trial that Ctrl-C or SIGTERM stopped (:func:`~hpo.records.interrupt_trial`:
      its parameters run first next time), and :meth:`close` does so for every trial still held.

    Args:
        study: the study, with its sampler and pruner.
        storage: its storage.
        space: the search space every trial is asked for.
        seeds: the trials that open the search (:meth:`hpo.study.Workload.seeds`), enqueued once per study.
        search: the preset's search settings (``n_trials``, early stopping).
        progress: show a progress bar over the budget.
    """

    def __init__(self, study: optuna.Study, storage: RDBStorage, space: RopeSearchSpace, seeds: list[RopeFactors],
                 search: SearchSpec, progress: bool = True) -> None:
        self.study = study
        self.n_trials = search.n_trials
        self._claims = open_claims(study, storage, space, seeds)
        self._stop = stopper(search, study.sampler)
        with self._claims.locked():
            forget_stale_stop(study, self._stop)
        self._distributions = space.distributions()
        self._bar = TrialProgress(study, search.n_trials, progress)
        self._held: dict[int, tuple[optuna.Trial, BaseHeartbeatThread]] = {}  # by trial number
        self.claimed = 0  # trials claimed: a run that claims none has nothing left to do

    def claim(self) -> optuna.Trial | None:
        """The next trial to measure, its heartbeat running; ``None`` when the study needs no more."""
        # held: a signal in Thread.start would orphan the heartbeat, and a process that never exits (seen under load)
        with interrupts_held():
            trial = self._claims.claim(self.study, self._distributions, self.n_trials, self._stop)
            if trial is None:
                return None
            heartbeat = get_heartbeat_thread(trial._trial_id, self.study._storage)
            heartbeat.start()
            self._held[trial.number] = trial, heartbeat
        self.claimed += 1
        return trial

    def wait_for_others(self) -> None:
        """Wait for the other processes' running trials (a dead worker's fail and are re-queued), so that
        a claim after this one sees the places that failed trials freed."""
        self._claims.wait(self.study)

    def report(self, trial: optuna.Trial, value: float, step: int, last: bool) -> bool:
        """Record ``value`` at fidelity ``step``; whether the study's pruner stops the trial there."""
        trial.report(value, step)
        return not last and trial.should_prune()

    def finish(self, trial: optuna.Trial, value: float | None = None, state: TrialState | None = None,
               user_attrs: dict[str, Any] | None = None) -> FrozenTrial:
        """Tell the study that ``trial`` ended: with ``value`` (complete) or in ``state`` (PRUNED, FAIL)."""
        # held from the moment the trial leaves the held ones: a signal before tell would leave it RUNNING
        # (close would no longer see it), one inside tell would cut its transaction short and lose the result
        with warnings.catch_warnings(), interrupts_held():
            _, heartbeat = self._held.pop(trial.number)
            heartbeat.join()
            for key, attr in (user_attrs or {}).items():
                trial.set_user_attr(key, attr)
            if state is None and not math.isfinite(value):
                trial.set_user_attr(ERROR_ATTR, f"non-finite perplexity {value}")
            warnings.simplefilter("ignore", UserWarning)  # Optuna's own note on a non-finite value: logged below
            told = self.study.tell(trial, value) if state is None else self.study.tell(trial, state=state)
        if told.state == TrialState.FAIL:
            logger.warning("trial %d failed: %s", told.number, told.user_attrs.get(ERROR_ATTR))
        self._bar.update(self.study, told)
        return told

    def interrupt(self, trial: optuna.Trial) -> None:
        """End ``trial``, which a signal or the backend stopped before its last step; it runs again first."""
        with interrupts_held():  # a second Ctrl-C here would leave the trial RUNNING, out of the held ones
            _, heartbeat = self._held.pop(trial.number)
            heartbeat.join()
            interrupt_trial(self.study, trial)

    def close(self) -> None:
        """Interrupt every trial still held (a run broken off) and end the progress bar."""
        for trial, _ in list(self._held.values()):
            self.interrupt(trial)
        self._bar.close()
