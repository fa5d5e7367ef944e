"""A study's records: where it lives, what it was run on, what it found, and what it was evaluated on.

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
- **Dead workers' trials.** :func:`requeue_stale_trial`, the storage's heartbeat-stale callback, runs a
  killed worker's parameters again. Handing trials out and ending interrupted ones is the runner's
  (:mod:`hpo.trials`).
- **Evaluation tables.** :class:`EvaluationRow`, :func:`write_results` and :func:`read_results`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import pandas as pd
import sqlalchemy
from optuna.storages import RDBStorage
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
            storage.engine.pool.logger.addFilter(_cut_short_query_noise)
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


def _cut_short_query_noise(record: logging.LogRecord) -> bool:
    """False for the pool's log of a failure while cleaning up a query that Ctrl-C or SIGTERM cut short.

    sqlalchemy closes the connection of a query interrupted by a ``KeyboardInterrupt`` and then fails to
    close its cursor ("Error closing cursor", with two tracebacks): noise beside the one line the run
    prints for the interruption. Any other error of the pool is kept.
    """
    error = record.exc_info[1] if record.exc_info else None
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return False
        error = error.__context__
    return True


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
# Dead workers' trials (the storage's heartbeat-stale callback)


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
    a RULER task ``ruler:NAME``; the others are None. A ``ppl`` row with a ``depth`` is one range of positions
    (centred there) of the ``ppl`` row without one: readers pool only the latter. ``windows`` counts the
    windows, prompts or samples measured, ``dtype`` the precision.
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
