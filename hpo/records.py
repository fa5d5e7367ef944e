"""A study's records: where it lives, what it was run on, what it found, and how its trials are handed out.

This module sits below both the runner (:mod:`hpo.study`, :mod:`hpo.ray_backend`, :mod:`hpo.run`) and
the readers (:mod:`hpo.evaluate`, :mod:`hpo.export`, :mod:`hpo.finetune`, :mod:`dashboards`): every
reader depends on it alone, never on the runner.

- **Layout.** ``python -m hpo.run --study NAME`` writes ``runs/NAME/`` (or ``--out DIR``, :func:`study_dir`):
  :data:`STUDY_DB` (unless ``--storage`` points elsewhere), :data:`BEST_FACTORS_FILE`,
  :data:`ROPE_PARAMETERS_FILE` and :data:`RESULTS_FILE`.
- **Storage.** :func:`open_storage` opens an Optuna RDB storage with heartbeats; :func:`load_study` opens
  an existing study without ever creating one.
- **What a study was run on.** :func:`record_study` stores the search space, the workload's settings
  (model, revision, dtype, data, windows, lengths, fitness) and the earlier stage of a chained study in
  the study's user attrs when it is created, and refuses to continue it under other ones.
  :func:`recorded_search_space`, :func:`study_stage` and :func:`study_model` read them back.
- **What it found.** :func:`best_factors`, :func:`exported_factors` and :func:`study_factors`.
- **Trial hand-out.** :class:`TrialClaims` claims trials under a study-wide lock so several processes
  run exactly the asked budget; :func:`interrupt_trial` ends a trial that a signal stopped.
- **Evaluation tables.** :class:`EvaluationRow`, :func:`write_results` and :func:`read_results`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import pandas as pd
import sqlalchemy
from optuna.distributions import BaseDistribution
from optuna.storages import RDBStorage
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.storages._rdb.models import TrialHeartbeatModel
from optuna.trial import TrialState

from hpo.curve_space import MonotoneCurveSpace
from hpo.search_space import LongRoPESearchSpace, RopeSearchSpace
from hpo.stages import STAGE_KINDS, Stage, stage_from_record
from models.rope import RopeFactors

if TYPE_CHECKING:  # presets sit above the records: only their shape is used here
    from studies import StudyPreset

logger = logging.getLogger("hpo.study")

# ---------------------------------------------------------------------------------------------------------------
# Layout

STUDY_DB = "study.db"
BEST_FACTORS_FILE = "best_factors.json"
ROPE_PARAMETERS_FILE = "rope_parameters.json"
RESULTS_FILE = "results.json"
OUTPUT_FILES = (BEST_FACTORS_FILE, ROPE_PARAMETERS_FILE, RESULTS_FILE)
EVALUATION_FILE = "evaluation.csv"  # python -m hpo.evaluate --study, with its .json twin
FINETUNE_DIR = "finetune"  # python -m hpo.finetune's checkpoints and summary
FINETUNE_SUMMARY_FILE = "summary.json"  # in FINETUNE_DIR
FINETUNED_DIR = "finetuned"  # the fine-tuned model, with the factors it was trained with
FINETUNED_FACTORS_FILE = "rope_factors.json"  # in FINETUNED_DIR and in each checkpoint

# ---------------------------------------------------------------------------------------------------------------
# Record keys: the study's user attrs, the sampler's system attrs that readers use, the trials' attrs

SEARCH_SPACE_ATTR = "search_space"
PRESET_ATTR = "preset"
WORKLOAD_ATTR = "workload"
STAGE_ATTR = "stage"
STOPPED_ATTR = "early_stopped"  # the reason, once early stopping has fired
SEEDS_KEY = "LongRoPESampler:seeds"  # study system attr: the baselines that opened the search
GENERATION_KEY = "LongRoPESampler:generation"  # trial system attr: Optuna's BaseGASampler key for our sampler
INTERRUPTED_ATTR = "interrupted"  # trial user attr: Ctrl-C or SIGTERM stopped it
ERROR_ATTR = "error"  # trial user attr: it raised, or gave a non-finite value

EVALUATED = (TrialState.COMPLETE, TrialState.PRUNED)
BUDGET = (TrialState.RUNNING, *EVALUATED)  # what --n-trials counts: a failed trial is re-run, not spent

# Search space classes by the ``kind`` of their record; a record without one is from before there were several.
SEARCH_SPACE_KINDS: dict[str, type[RopeSearchSpace]] = {
    space.kind: space for space in (LongRoPESearchSpace, MonotoneCurveSpace)}
DEFAULT_SEARCH_SPACE_KIND = LongRoPESearchSpace.kind

HEARTBEAT_INTERVAL_S = 10
GRACE_PERIOD_S = 30
SCHEMA_ATTEMPTS = 3
STALE_RETRIES = 2  # parameters whose workers died more often than this probably kill them: not re-queued again
SCHEMA_RACE_ERRORS = (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError)
SQLITE_RACE_MARKERS = ("already exists", "database is locked")


class StorageError(RuntimeError):
    """The study storage cannot be opened or read."""


class StudyError(ValueError):
    """A study that cannot be found, that holds nothing to read yet, or whose records forbid the asked step."""


class ResultsError(ValueError):
    """A results file that does not exist or is not an evaluation table."""


def study_dir(name: str, out: str | Path | None = None) -> Path:
    """A study's output directory: ``out``, else ``runs/<name>`` as ``python -m hpo.run`` uses."""
    return Path(out) if out is not None else Path("runs") / name


def writable_dir(path: Path, option: str) -> Path:
    """``path`` as a directory this process can write into, created if missing; else a one-line
    :class:`StudyError` naming ``option`` (a file in the way, or no permission). Checked before any work:
    with an external storage a run writes its outputs only after the whole search."""
    blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise StudyError(f"{option} {path}: {blocking} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as error:
        raise StudyError(f"{option} {path}: cannot write there ({error.strerror or error})") from None
    return path


def default_storage_url(out_dir: Path) -> str:
    """The SQLite file a study in ``out_dir`` lives in unless ``--storage`` says otherwise."""
    return f"sqlite:///{(out_dir / STUDY_DB).resolve()}"


def worker_name() -> str:
    """``host:pid`` of this process, recorded on every trial it evaluates."""
    return f"{socket.gethostname()}:{os.getpid()}"


# ---------------------------------------------------------------------------------------------------------------
# Storage


def open_storage(url: str) -> RDBStorage:
    """An RDB storage with heartbeats, so trials of a killed process are failed and retried.

    Any failure to open it, or to read an SQLite file that is not a (whole) database, is a
    :class:`StorageError` of one line that names the URL.
    """
    attempt = 1
    while True:
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5 but are what resume needs
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = RDBStorage(
                    url,
                    heartbeat_interval=HEARTBEAT_INTERVAL_S,
                    grace_period=GRACE_PERIOD_S,
                    heartbeat_stale_trial_callback=requeue_stale_trial,
                    engine_kwargs={"pool_pre_ping": True},
                )
            _check_integrity(storage, url)
            return storage
        except SCHEMA_RACE_ERRORS as error:
            # Workers started together on a fresh database race to create Optuna's tables; the losers get a
            # duplicate-key error (PostgreSQL), or "table ... already exists" or "database is locked" (SQLite),
            # and find the schema made on the next try. Any other operational error (a server that is down, a
            # bad path) is no race.
            if isinstance(error, sqlalchemy.exc.OperationalError) and not any(
                    marker in str(error) for marker in SQLITE_RACE_MARKERS):
                raise StorageError(_storage_message(url, error)) from None
            if attempt == SCHEMA_ATTEMPTS:
                raise StorageError(_storage_message(url, error)) from None
            attempt += 1
            time.sleep(1.0)
        except StorageError:
            raise
        except Exception as error:  # sqlalchemy raises many types for bad URLs and unreachable servers
            raise StorageError(_storage_message(url, error)) from None


def _check_integrity(storage: RDBStorage, url: str) -> None:
    """Refuse an SQLite file that is damaged: Optuna opens one whose schema pages survived and fails later,
    in the middle of a run, on the first page that did not."""
    if storage.engine.url.get_backend_name() != "sqlite":
        return
    try:
        with storage.engine.connect() as connection:
            found = connection.exec_driver_sql("PRAGMA quick_check").scalars().all()
    except sqlalchemy.exc.DatabaseError as error:
        if isinstance(error, sqlalchemy.exc.OperationalError):  # "database is locked" and the like: not damage
            raise
        found = [str(error.orig)]  # "database disk image is malformed": too damaged to check
    if found != ["ok"]:
        raise StorageError(f"cannot open study storage {url!r}: the SQLite file is damaged "
                           f"({' '.join(found[0].split())}); restore it from a copy, or use another --out/--storage")


def _storage_message(url: str, error: Exception) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"cannot open study storage {url!r}: {type(error).__name__}: {first_line}"


def load_study(name: str, storage: str | None = None, out: str | Path | None = None) -> optuna.Study:
    """Open the existing study ``name`` in ``storage`` (default: :data:`STUDY_DB` in :func:`study_dir`).

    Raises :class:`StudyError` when the storage file or the study does not exist;
    an SQLite file is never created by looking.
    """
    url = storage or default_storage_url(study_dir(name, out))
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise StudyError(f"no study storage at {url.removeprefix('sqlite:///')}: pass the study's --out DIR "
                         f"(where `python -m hpo.run --study {name}` wrote {STUDY_DB}) or --storage URL")
    opened = open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=opened)
    except KeyError:
        names = optuna.get_all_study_names(opened)
        raise StudyError(f"no study {name!r} in {url}; it holds: {', '.join(names) or 'no studies'}") from None


# ---------------------------------------------------------------------------------------------------------------
# What a study was run on


def stage_for(preset: StudyPreset) -> Stage | None:
    """The earlier study a chained preset builds on, read from that study's output directory.

    With ``extend.finetuned`` the model is the fine-tuned directory ``DIR/finetuned`` that
    ``python -m hpo.finetune`` wrote, with the factors it was trained with; otherwise the preset's
    model with the earlier study's ``best_factors.json``. A missing output is an error that names
    the command that makes it.
    """
    extend = preset.extend
    if extend.from_study is None:
        return None
    directory = study_dir(extend.from_study, extend.from_dir)
    if extend.finetuned:
        model_dir = directory / FINETUNED_DIR
        factor_file = model_dir / FINETUNED_FACTORS_FILE
        missing = f"run `python -m hpo.finetune --study {extend.from_study}` first (or set extend.finetuned = false)"
        model = str(model_dir)
    else:
        factor_file = directory / BEST_FACTORS_FILE
        missing = f"run `python -m hpo.run --study {extend.from_study}` first"
        model = preset.model.name
    if not factor_file.is_file():
        raise StudyError(f"study {preset.name!r} builds on {extend.from_study!r}, but {factor_file} does not "
                          f"exist: {missing}")
    return STAGE_KINDS[extend.mode](extend.from_study, RopeFactors.load(factor_file), model)


def _refuse_other_settings(name: str, what: str, recorded: dict[str, Any], current: dict[str, Any]) -> None:
    """A one-line :class:`StudyError` naming the first key whose value differs between the two records."""
    for key, now in current.items():
        if recorded.get(key) != now:
            raise StudyError(f"study {name!r} in this storage was run with {what}{key} = {recorded.get(key)!r}, "
                             f"not {now!r}: its values would not compare with new ones; use the same settings to "
                             f"continue, or another --out/--storage for a new study")


def record_study(study: optuna.Study, preset_name: str, space: RopeSearchSpace, workload: dict[str, Any],
                 stage: Stage | None) -> None:
    """Record what a new study is run on, or check that a resumed one is run on the same.

    ``workload`` holds everything a trial's value depends on besides its factors (model and revision,
    dtype, lengths, data and windows, fitness). Continuing under another space, workload or earlier
    stage is a :class:`StudyError` that names the first setting that differs: the new trials' values
    would be ranked with values of another measurement. Another kind of space (the evolutionary sampler's
    per-pair factors, or the monotone curves of Optuna's samplers) differs first in ``kind``.
    """
    if study.user_attrs.get(SEARCH_SPACE_ATTR) is None:
        study.set_user_attr(SEARCH_SPACE_ATTR, space.to_record())
        study.set_user_attr(PRESET_ATTR, preset_name)
        study.set_user_attr(WORKLOAD_ATTR, workload)
        if stage:
            study.set_user_attr(STAGE_ATTR, stage.to_record())
    if study.user_attrs.get(WORKLOAD_ATTR) is None:  # a study from before settings were recorded: take today's
        logger.info("study %r has no recorded settings: recording the current ones", study.study_name)
        study.set_user_attr(WORKLOAD_ATTR, workload)
    _refuse_other_settings(study.study_name, "", study.user_attrs[WORKLOAD_ATTR], workload)
    recorded_space = search_space_from_record(study.user_attrs[SEARCH_SPACE_ATTR]).to_record()
    _refuse_other_settings(study.study_name, "search space ", recorded_space, space.to_record())
    if study.user_attrs.get(STAGE_ATTR) != (stage.to_record() if stage else None):
        raise StudyError(f"study {study.study_name!r} in this storage was built on other earlier factors than "
                         f"{stage.from_study if stage else 'none'!r} has now; use another --out/--storage to start "
                         f"a new study")


def search_space_from_record(record: dict[str, Any]) -> RopeSearchSpace:
    """The space a record describes, read by the class its ``kind`` names (:data:`SEARCH_SPACE_KINDS`;
    :data:`DEFAULT_SEARCH_SPACE_KIND` without one); an unknown kind is a :class:`StudyError`."""
    kind = record.get("kind", DEFAULT_SEARCH_SPACE_KIND)
    if kind not in SEARCH_SPACE_KINDS:
        raise StudyError(f"search space of kind {kind!r} is unknown to this version; known: "
                         f"{', '.join(SEARCH_SPACE_KINDS)}")
    return SEARCH_SPACE_KINDS[kind].from_record(record)


def recorded_search_space(study: optuna.Study) -> RopeSearchSpace:
    """The search space :func:`record_study` recorded, of whichever kind."""
    record = study.user_attrs.get(SEARCH_SPACE_ATTR)
    if record is None:
        raise StudyError(f"study {study.study_name!r} has no recorded search space: not made by python -m hpo.run?")
    return search_space_from_record(record)


def study_stage(study: optuna.Study) -> Stage | None:
    """The earlier study a chained study was built on, as :func:`record_study` recorded it."""
    record = study.user_attrs.get(STAGE_ATTR)
    return stage_from_record(record) if record else None


def study_model(study: optuna.Study) -> str | None:
    """The model the study searched: a chained study's stage's, else the one its settings record; None for a
    study made before studies recorded their settings (``python -m hpo.run`` on it once records them)."""
    stage = study_stage(study)
    if stage:
        return stage.model
    recorded = study.user_attrs.get(WORKLOAD_ATTR)
    return recorded["model"] if recorded else None


def seed_records(study: optuna.Study) -> list[dict[str, Any]]:
    """The baselines that opened the search, as ``{"method", "params"}`` records (:data:`SEEDS_KEY`)."""
    return study._storage.get_study_system_attrs(study._study_id).get(SEEDS_KEY, [])


def trial_generation(trial: optuna.trial.FrozenTrial) -> int | None:
    """The generation the LongRoPE sampler put ``trial`` in (None for trials it never saw)."""
    return trial.system_attrs.get(GENERATION_KEY)


# ---------------------------------------------------------------------------------------------------------------
# What it found


def best_factors(study: optuna.Study, **metadata: Any) -> RopeFactors:
    """The factors of the study's best complete trial, with provenance (and ``metadata``) in ``metadata``.

    For a chained study (a preset's ``[extend]``) these are its final factors: chained after the
    earlier study's for a longer stage, the short factors for a short stage.
    """
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise StudyError(f"study {study.study_name!r} has no complete trial yet")
    best = study.best_trial
    found = recorded_search_space(study).to_factors(best.params)  # method is "longrope"
    recorded = study.user_attrs.get(WORKLOAD_ATTR) or {}
    provenance = {"study": study.study_name, "trial": best.number, "searched_perplexity": best.value}
    if recorded.get("dtype"):  # the precision the perplexity was measured in, which evaluation defaults to
        provenance["dtype"] = recorded["dtype"]
    found = dataclasses.replace(found, metadata={**provenance, **metadata})
    stage = study_stage(study)
    return stage.final_factors(found) if stage else found


def exported_factors(study: optuna.Study, **metadata: Any) -> tuple[RopeFactors, RopeFactors | None]:
    """``(long factors, short factors or None)`` that the study's export carries: a short stage's are the
    earlier study's long factors and its own best; any other study's are its best alone (:func:`best_factors`)."""
    found = best_factors(study, **metadata)
    stage = study_stage(study)
    return stage.exported(found) if stage else (found, None)


def study_factors(name: str, storage: str | None = None,
                  out: str | Path | None = None) -> tuple[RopeFactors, str | None]:
    """``(best factors, model name or None)`` of study ``name``.

    Read from the storage when ``storage`` is given or :data:`STUDY_DB` exists in the
    study directory, else from :data:`BEST_FACTORS_FILE` there.
    """
    directory = study_dir(name, out)
    factor_file = directory / BEST_FACTORS_FILE
    if storage is None and not (directory / STUDY_DB).is_file() and factor_file.is_file():
        factors = RopeFactors.load(factor_file)
        return factors, factors.metadata.get("model")
    study = load_study(name, storage, out)
    return best_factors(study), study_model(study)


def check_outputs_are_its_own(out_dir: Path, study_name: str, storage: optuna.storages.BaseStorage) -> None:
    """Refuse to start study ``study_name`` in ``storage`` where ``out_dir`` holds outputs it did not write.

    A study not yet in the storage would overwrite them, and they may be the only record left of an
    earlier run (its database lost, emptied to 0 bytes, or elsewhere): a :class:`StudyError`
    names them. A study already in the storage continues and rewrites its own outputs.
    """
    if study_name in optuna.get_all_study_names(storage):
        return
    found = [name for name in OUTPUT_FILES if (out_dir / name).exists()]
    if found:
        raise StudyError(f"{out_dir} already holds {', '.join(found)} of a study that is not in this storage: a new "
                         f"study {study_name!r} would overwrite them; pass the --storage they came from, or move "
                         f"them away, or use another --out")


# ---------------------------------------------------------------------------------------------------------------
# Trial hand-out


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


def requeue(study: optuna.Study, failed: optuna.trial.FrozenTrial) -> None:
    """Queue the parameters of ``failed`` to run again before any new proposal.

    With Optuna's retry record (``failed_trial``, ``retry_history``) and the sampler's attrs (generation,
    proposal); of the user attrs only the seed label, since the others describe the run that failed.
    """
    history = [*failed.system_attrs.get("retry_history", []), failed.number]
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=failed.params, distributions=failed.distributions,
        user_attrs={key: value for key, value in failed.user_attrs.items() if key == "seed"},
        system_attrs={**failed.system_attrs, "failed_trial": history[0], "retry_history": history}))


def requeue_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """The storage's heartbeat-stale callback: re-queue a dead worker's trial (:func:`requeue`), unless
    workers running these parameters died more than :data:`STALE_RETRIES` times. Unlike Optuna's
    ``RetryHeartbeatStaleTrialCallback``, interruptions (Ctrl-C, SIGTERM) in the retry history do not
    count: they say nothing about the parameters, and two of them must not cost the next kill its retry."""
    history = {*trial.system_attrs.get("retry_history", []), trial.number}
    interrupted = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                   if t.number in history and t.user_attrs.get(INTERRUPTED_ATTR)}
    deaths = len(history - interrupted)
    if deaths > STALE_RETRIES:
        logger.warning("trial %d: workers running its parameters died %d times; they are not run again",
                       trial.number, deaths)
        return
    requeue(study, trial)


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
# Evaluation tables (python -m hpo.evaluate writes them, the dashboards read them)

RESULT_COLUMNS = ("method", "task", "length", "depth", "perplexity", "accuracy", "seconds", "tokens", "windows",
                  "dtype")


RULER_PREFIX = "ruler:"  # an evaluation task "ruler:niah_single_1" is lm-eval's RULER task niah_single_1


@dataclass
class EvaluationRow:
    """One measurement: a method on a task at a length (and, for passkey, a depth bin).

    ``perplexity`` is set for ``ppl`` and ``needle-ppl``, ``accuracy`` and ``depth``
    (the centre of the depth bin, 0 = top of the context) for ``passkey``, ``accuracy`` (RULER's score) for
    a RULER task ``ruler:NAME``; the others are None. ``windows`` counts the windows, prompts or samples
    measured, ``dtype`` the precision.
    """

    method: str
    length: int
    seconds: float
    tokens: int
    windows: int
    task: str = "ppl"
    perplexity: float | None = None
    accuracy: float | None = None
    depth: float | None = None
    dtype: str | None = None  # the precision the model ran in ("float32", "bfloat16"...)


def results_frame(rows: list[EvaluationRow]) -> pd.DataFrame:
    """The rows as a tidy DataFrame with columns :data:`RESULT_COLUMNS`."""
    return pd.DataFrame([asdict(row) for row in rows], columns=list(RESULT_COLUMNS))


def write_results(rows: list[EvaluationRow], *, csv: Path | None = None, json_path: Path | None = None,
                  meta: dict | None = None) -> list[Path]:
    """Write the table as CSV and/or JSON (``{**meta, "results": [row, ...]}``); returns the paths written."""
    written = []
    if csv is not None:
        csv.parent.mkdir(parents=True, exist_ok=True)
        results_frame(rows).to_csv(csv, index=False)
        written.append(csv)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({**(meta or {}), "results": [asdict(r) for r in rows]}, indent=2) + "\n")
        written.append(json_path)
    return written


def read_results(path: str | Path) -> pd.DataFrame:
    """An evaluation table written by :func:`write_results` (``.csv`` or ``.json``) as a DataFrame.

    Columns missing from older files (``task``, ``accuracy``, ``depth``) are filled:
    a row without a task was a perplexity row.
    """
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"results file {path} does not exist")
    try:
        if path.suffix == ".csv":
            frame = pd.read_csv(path)
        elif path.suffix == ".json":
            frame = pd.DataFrame(json.loads(path.read_text())["results"])
        else:
            raise ResultsError(f"results file {path} must be .csv or .json")
    except (ValueError, KeyError, TypeError, pd.errors.ParserError) as error:
        raise ResultsError(f"results file {path} is not an evaluation table: {error}") from None
    missing = [c for c in ("method", "length") if c not in frame.columns]
    if missing:
        raise ResultsError(f"results file {path} lacks the column(s) {', '.join(missing)}")
    if "task" not in frame.columns:
        frame["task"] = "ppl"
    return frame.reindex(columns=list(RESULT_COLUMNS))
