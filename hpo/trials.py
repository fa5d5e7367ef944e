"""A study's trial bookkeeping, the same for every backend: claim, heartbeat, report, prune, tell, interrupt.

The local loop (:func:`hpo.study.run_search`, one trial after another) and the Ray searcher
(:class:`hpo.ray_backend.StudySearcher`, trials placed by Ray Tune) differ only in where a trial is
measured. Both hand trials out, report their steps, prune and record them through one
:class:`StudyTrials`, so a trial ends the same way whichever backend ran it.

- **Hand-out.** :class:`TrialClaims` claims trials under a study-wide lock so several processes run
  exactly the asked budget.
- **Signals.** :class:`StopSignals` turns Ctrl-C and SIGTERM into a stop that cannot be lost,
  :func:`interrupts_held` holds them over a storage write, and :func:`interrupt_trial` ends a trial
  that a signal stopped.

The readers of a study (:mod:`hpo.records` and what sits on it) never need any of this.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.distributions import BaseDistribution
from optuna.storages import RDBStorage
from optuna.storages._heartbeat import BaseHeartbeatThread, get_heartbeat_thread, is_heartbeat_enabled
from optuna.storages._rdb.models import TrialHeartbeatModel
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from hpo.early_stopping import forget_stale_stop, stopper
from hpo.pruning import FidelityStep
from hpo.records import BUDGET, ERROR_ATTR, EVALUATED, INTERRUPTED_ATTR, STOPPED_ATTR, requeue
from hpo.sampler import enqueue_seeds
from hpo.search_space import RopeSearchSpace
from models.rope import RopeFactors
from studies import SearchSpec

logger = logging.getLogger("hpo.study")

# ---------------------------------------------------------------------------------------------------------------
# Hand-out and signals


@contextmanager
def _advisory_lock(engine: sqlalchemy.Engine, key: int) -> Iterator[None]:
    # AUTOCOMMIT: a session-level advisory lock needs no transaction, and an open one would idle on the server.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
        try:
            yield
        finally:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def _process_lock(lock: threading.Lock) -> Iterator[None]:
    with lock:
        yield


def record_stop(study: optuna.Study, reason: str) -> None:
    """Record ``reason`` as the study's :data:`STOPPED_ATTR` and log it (one INFO line)."""
    if study.user_attrs.get(STOPPED_ATTR) != reason:
        study.set_user_attr(STOPPED_ATTR, reason)
    logger.info("early stop: %s; no new trials", reason)


class TrialClaims:
    """Hands a study's trials out to workers so that together they run exactly ``n_trials``.

    Any number of processes (local workers, Ray drivers) may run one study in one storage. Each
    takes its next trial with :meth:`claim`, which, under a lock that every process of the study
    shares:

    1. fails the trials whose heartbeat went stale (a killed worker's) and re-queues their
       parameters, as Optuna's own optimize loop does;
    2. counts the trials that use up the budget: running, complete or pruned. A failed trial (it
       raised, or its worker was killed or interrupted) does not: its re-queued parameters run
       first, since ``study.ask`` takes waiting trials before new proposals;
    3. asks the study for a trial only while that count is below ``n_trials``, and while fewer than
       ``n_trials`` trials failed with an error (a study whose every trial fails would never end).

    ``study.ask`` marks the trial RUNNING, and the sampler stores its generation and proposal,
    before the lock is released, so the next claimant counts it and never gets the same proposal.
    Counting without a lock cannot be exact: two workers that both see ``n_trials - 1`` claimed
    trials both ask; asking first and checking the storage-assigned count after either overshoots
    or, when each also sees the other's new trial, makes both back off.

    Once the budget is claimed, each worker calls :meth:`wait`: it returns when no trial of the
    study runs any more, and claims again, since a trial that failed meanwhile freed its place; so
    whichever worker ends last, the study then holds exactly ``n_trials`` complete or pruned trials.
    A worker killed mid-trial leaves a RUNNING trial whose heartbeat goes stale after the grace
    period; the next claim or wait fails it and re-queues its parameters. The first heartbeat is
    recorded before the lock is released, so a RUNNING trial seen without one under the lock lost
    its worker between ``ask`` and that heartbeat (a SIGKILL at that instant): it is given a
    heartbeat then, and goes stale the same way.

    The lock is a PostgreSQL session advisory lock (the server drops it if the process dies), an
    ``flock`` on ``<database>.claims.lock`` for an SQLite file, and a lock inside this process for
    anything else (only one process per study there: a warning says so). :meth:`locked` takes the
    same lock for other once-per-study steps, such as enqueueing the seeds.
    """

    def __init__(self, storage: RDBStorage, study_name: str) -> None:
        self._storage = storage
        url = storage.engine.url
        backend = url.get_backend_name()
        if backend == "postgresql":
            key = int.from_bytes(hashlib.sha256(f"longrope-hpo:{study_name}".encode()).digest()[:8], "big",
                                 signed=True)
            self._lock = partial(_advisory_lock, storage.engine, key)
        elif backend == "sqlite" and url.database not in (None, "", ":memory:"):
            self._lock = partial(_file_lock, Path(f"{url.database}.claims.lock"))
        else:
            if backend != "sqlite":
                logger.warning("no cross-process lock for %s storages: run one process per study", backend)
            self._lock = partial(_process_lock, threading.Lock())

    def locked(self) -> AbstractContextManager[None]:
        """The study-wide lock, as a context manager."""
        return self._lock()

    def claim(self, study: optuna.Study, distributions: dict[str, BaseDistribution], n_trials: int,
              stop: Callable[[optuna.Study], str | None] | None = None) -> optuna.Trial | None:
        """The next trial of ``study``, asked with ``distributions``; ``None`` once ``n_trials`` are claimed.

        Also ``None`` once ``stop`` (:func:`hpo.early_stopping.stopper`) gives a reason to stop early:
        the reason is then recorded in the study's :data:`STOPPED_ATTR` and logged.
        """
        with self.locked(), warnings.catch_warnings():
            # Optuna warns when heartbeats are used outside study.optimize; callers keep the heartbeat.
            warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)
            self._fail_dead_trials(study)
            if len(study.get_trials(deepcopy=False, states=BUDGET)) >= n_trials:
                return None
            failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
            errors = sum(ERROR_ATTR in t.user_attrs for t in failed)
            if errors >= n_trials:
                logger.error("%d trials of study %r failed with an error (see their 'error' attrs): no more trials",
                             errors, study.study_name)
                return None
            if stop is not None and (reason := stop(study)) is not None:
                record_stop(study, reason)
                return None
            trial = study.ask(distributions)
            if is_heartbeat_enabled(self._storage):
                self._storage.record_heartbeat(trial._trial_id)
            return trial

    def wait(self, study: optuna.Study, poll_s: float = 1.0) -> None:
        """Return once no trial of ``study`` is running: other workers' have ended, dead workers' are failed."""
        while True:
            with self.locked():
                self._fail_dead_trials(study)
            if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                return
            time.sleep(poll_s)

    def _fail_dead_trials(self, study: optuna.Study) -> None:
        """Under the lock: heartbeat the RUNNING trials that have none, then fail (and re-queue) the stale ones."""
        if not is_heartbeat_enabled(self._storage):
            return
        running = [t._trial_id for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        if running:
            beating = sqlalchemy.select(TrialHeartbeatModel.trial_id).where(TrialHeartbeatModel.trial_id.in_(running))
            with self._storage.engine.connect() as connection:
                orphans = set(running) - set(connection.execute(beating).scalars())
            for trial_id in orphans:
                self._storage.record_heartbeat(trial_id)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


class StopSignals:
    """Ctrl-C and SIGTERM as a request to stop that cannot be lost.

    While installed (a context manager, in the main thread), each of these signals raises
    ``KeyboardInterrupt`` and is remembered. Python drops an exception raised inside a finalizer or a
    weakref callback ("Exception ignored in: ..."), and a signal that lands there would be lost (seen
    once in the soak test, where the run went on to the end); :meth:`check`, called between trials,
    raises it again.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received.append(signum)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` when a stop signal has come."""
        if self.received:
            raise KeyboardInterrupt(signal.Signals(self.received[0]).name)

    def __enter__(self) -> StopSignals:
        self.received = []
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {signum: signal.signal(signum, self._handle) for signum in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block has ended, then deliver them to the handlers of the moment.

    A claim asks the study for a trial (RUNNING from then on) and returns it; a signal in between would
    leave a RUNNING trial that no one knows of, until its heartbeat goes stale. Held, it arrives once the
    caller holds the trial and can end it as interrupted. Only the main thread receives signals.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    signals = (signal.SIGINT, signal.SIGTERM)
    handlers = {signum: signal.signal(signum, lambda signum, frame: held.append(signum)) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        for signum in held:
            signal.raise_signal(signum)


def interrupt_trial(study: optuna.Study, trial: optuna.Trial) -> None:
    """End a claimed trial that Ctrl-C or SIGTERM stopped: failed, marked :data:`INTERRUPTED_ATTR`, and its
    parameters re-queued at once (a killed worker's are re-queued only once its heartbeat is stale).
    A trial that is no longer running is left as it is."""
    # The signal may have cut a storage call short: its session is mid-transaction (Optuna rolls back on
    # errors, not on KeyboardInterrupt) and may hold SQLite's lock. Start from a fresh one.
    study._storage.remove_session()
    if study._storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
        return
    study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED_ATTR, True)
    requeue(study, study.tell(trial, state=TrialState.FAIL))
    logger.info("trial %d interrupted: its parameters are queued to run first next time", trial.number)


# ---------------------------------------------------------------------------------------------------------------
# One process's trials


def open_claims(study: optuna.Study, storage: RDBStorage, space: RopeSearchSpace,
                seeds: list[RopeFactors]) -> TrialClaims:
    """The study's :class:`~hpo.trials.TrialClaims`, with ``seeds`` enqueued once per study.

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

    - :meth:`claim` takes the next trial through :class:`~hpo.trials.TrialClaims` (``None`` once the
      study holds ``n_trials`` running, complete or pruned trials, or once early stopping or the budget of
      full-length evaluations says stop) and
      starts its heartbeat in this process;
    - :meth:`report` records a step's running value and asks the study's pruner, never after the last
      step, where pruning would save nothing;
    - :meth:`finish` stops the heartbeat, stores the trial's user attrs and tells the study how it ended:
      COMPLETE with its value (FAIL when the value is not finite), PRUNED with its last running value, or
      FAIL with the error; the result is committed with signals held, so Ctrl-C cannot lose it;
    - :meth:`interrupt` ends a trial that Ctrl-C or SIGTERM stopped (:func:`~hpo.trials.interrupt_trial`:
      its parameters run first next time), and :meth:`close` does so for every trial still held.

    Args:
        study: the study, with its sampler and pruner.
        storage: its storage.
        space: the search space every trial is asked for.
        seeds: the trials that open the search (:meth:`hpo.study.Workload.seeds`), enqueued once per study.
        search: the preset's search settings (``n_trials``, early stopping, ``max_full_evaluations``).
        schedule: the steps a trial is measured in (:meth:`hpo.study.Workload.schedule`): what the budget of
            full-length evaluations counts.
        progress: show a progress bar over the budget.
    """

    def __init__(self, study: optuna.Study, storage: RDBStorage, space: RopeSearchSpace, seeds: list[RopeFactors],
                 search: SearchSpec, schedule: Sequence[FidelityStep], progress: bool = True) -> None:
        self.study = study
        self.n_trials = search.n_trials
        self._claims = open_claims(study, storage, space, seeds)
        self._stop = stopper(search, study.sampler, schedule)
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
