"""Run a LongRoPE search as an Optuna study, resumably, and report it against the baselines.

The flow is linear: load the model once, cut the searched and held-out windows,
open (or create) the study in its storage, enqueue the baseline seeds once, run
trials until the study holds ``n_trials`` finished ones, then compare the best
factors with none / PI / NTK / YaRN on both window sets; :mod:`hpo.outputs` writes the outputs.
The Ray backend (:mod:`hpo.ray_backend`) replaces only the middle step.

Every trial is claimed under a study-wide lock (:class:`TrialClaims`), so several
processes may share one study, and committed to the storage when it ends, so a stop
at any moment loses at most the running trial. A run killed hard (SIGKILL) leaves
that trial RUNNING; its heartbeat goes stale and the next claim fails it and
re-queues the same parameters. Trials are measured window by window and may be
pruned (:mod:`hpo.pruning`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import logging
import math
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import torch
from optuna.distributions import BaseDistribution
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages._heartbeat import get_heartbeat_thread, is_heartbeat_enabled
from optuna.storages._rdb.models import TrialHeartbeatModel
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from hpo.early_stopping import StopRule, forget_stale_stop, record_stop, stopper
from hpo.pruning import FidelityStep, ParentPruner, fidelity_schedule
from hpo.sampler import LongRoPESampler, enqueue_seeds
from hpo.search_space import LongRoPESearchSpace
from models.baselines import baseline, critical_dimension, yarn
from models.loading import load_model, model_revision
from models.patch import patched
from models.rope import FactorError, RopeFactors, RopeGeometry, chain_factors
from objectives.data import default_window_mode, load_windows
from objectives.needle import needle_windows
from objectives.perplexity import PerplexityResult, perplexity
from studies import SearchSpec, StudyPreset

logger = logging.getLogger(__name__)

REFERENCE_METHODS = ("none", "pi", "ntk", "yarn")
HEARTBEAT_INTERVAL_S = 10
GRACE_PERIOD_S = 30
SCHEMA_ATTEMPTS = 3
STALE_RETRIES = 2  # a trial whose worker died this often is probably what kills it: it is not re-queued again
SCHEMA_RACE_ERRORS = (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError)
SQLITE_RACE_MARKERS = ("already exists", "database is locked")
EVALUATED = (TrialState.COMPLETE, TrialState.PRUNED)
BUDGET = (TrialState.RUNNING, *EVALUATED)  # what --n-trials counts: a failed trial is re-run, not spent
INTERRUPTED_ATTR = "interrupted"  # user attr of a trial that Ctrl-C or SIGTERM stopped
ERROR_ATTR = "error"  # user attr of a trial that raised or gave a non-finite value


class StorageError(RuntimeError):
    """The study storage URL cannot be opened."""


class BackendError(RuntimeError):
    """The asked execution backend cannot run: not installed, or its cluster cannot be reached or used."""


def default_storage_url(out_dir: Path) -> str:
    return f"sqlite:///{(out_dir / 'study.db').resolve()}"


def open_storage(url: str) -> RDBStorage:
    """An RDB storage with heartbeats, so trials of a killed process are failed and retried."""
    attempt = 1
    while True:
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5 but are what resume needs
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    url,
                    heartbeat_interval=HEARTBEAT_INTERVAL_S,
                    grace_period=GRACE_PERIOD_S,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=STALE_RETRIES),
                    engine_kwargs={"pool_pre_ping": True},
                )
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
        except Exception as error:  # sqlalchemy raises many types for bad URLs and unreachable servers
            raise StorageError(_storage_message(url, error)) from None


def _storage_message(url: str, error: Exception) -> str:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"cannot open study storage {url!r}: {type(error).__name__}: {first_line}"


def worker_name() -> str:
    """``host:pid`` of this process, recorded on every trial it evaluates."""
    return f"{socket.gethostname()}:{os.getpid()}"


def study_dir(name: str, out: str | Path | None = None) -> Path:
    """A study's output directory: ``out``, else ``runs/<name>`` as ``python -m hpo.run`` uses."""
    return Path(out) if out is not None else Path("runs") / name


@dataclass(frozen=True)
class Stage:
    """What an earlier study hands to a chained one (a preset's ``[extend]``).

    ``factors`` are the earlier study's (the ones its fine-tuned model was trained with, when
    ``model`` is that model's directory); ``mode`` is ``"longer"`` or ``"short"``.
    """

    from_study: str
    mode: str
    factors: RopeFactors
    model: str

    def to_record(self) -> dict[str, Any]:
        return {"from_study": self.from_study, "mode": self.mode, "factors": self.factors.to_dict(),
                "model": self.model}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Stage:
        return cls(record["from_study"], record["mode"], RopeFactors.from_dict(record["factors"]), record["model"])

    def final_factors(self, found: RopeFactors) -> RopeFactors:
        """The factors the model runs with for searched ``found``: chained after the earlier ones when longer;
        when short, with the long factors' attention scaling, since an exported ``longrope`` config has one
        attention factor for both sets."""
        if self.mode == "longer":
            return chain_factors(self.factors, found)
        return dataclasses.replace(found, attention_scaling=self.factors.attention_scaling)


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
        model_dir = directory / "finetuned"
        factor_file = model_dir / "rope_factors.json"
        missing = f"run `python -m hpo.finetune --study {extend.from_study}` first (or set extend.finetuned = false)"
        model = str(model_dir)
    else:
        factor_file = directory / "best_factors.json"
        missing = f"run `python -m hpo.run --study {extend.from_study}` first"
        model = preset.model.name
    if not factor_file.is_file():
        raise FactorError(f"study {preset.name!r} builds on {extend.from_study!r}, but {factor_file} does not "
                          f"exist: {missing}")
    return Stage(extend.from_study, extend.mode, RopeFactors.load(factor_file), model)


@dataclass(frozen=True)
class Measurement:
    """A trial's running value after one fidelity step, and the step's own perplexity."""

    step: FidelityStep
    value: float
    perplexity: float


@dataclass
class Workload:
    """What every trial evaluates on: the loaded model and its windows."""

    model: Any
    geometry: RopeGeometry  # the window the search extends: the model's, or a longer stage's target
    windows: list[torch.Tensor]
    score_masks: list[torch.Tensor] | None
    heldout_windows: list[torch.Tensor]
    heldout_masks: list[torch.Tensor] | None
    model_geometry: RopeGeometry  # the model's own RoPE, which exported factors refer to
    stage: Stage | None = None

    def applied(self, factors: RopeFactors) -> RopeFactors:
        """The factors the model runs with for searched ``factors`` (:meth:`Stage.final_factors`)."""
        return self.stage.final_factors(factors) if self.stage else factors

    def seeds(self, space: LongRoPESearchSpace) -> list[RopeFactors]:
        """The trials that open the search: the baselines, after the long factors and no scaling when short."""
        if self.stage and self.stage.mode == "short":
            identity = baseline("none", self.model_geometry, space.target_length)
            return [dataclasses.replace(self.stage.factors, method="long"), identity, *space.seeds(self.geometry)]
        return space.seeds(self.geometry)

    def _perplexity(self, factors: RopeFactors, windows: list[torch.Tensor], masks: list[torch.Tensor] | None,
                    desc: str) -> PerplexityResult:
        with patched(self.model, self.applied(factors)):
            return perplexity(self.model, windows, score_masks=masks, desc=desc,
                              progress=logger.isEnabledFor(logging.INFO))

    def fitness(self, factors: RopeFactors, heldout: bool = False, desc: str = "trial") -> tuple[float, list[float]]:
        windows, masks = (self.heldout_windows, self.heldout_masks) if heldout else (self.windows, self.score_masks)
        result = self._perplexity(factors, windows, masks, desc)
        return result.perplexity, result.window_perplexities

    def schedule(self, search: SearchSpec) -> list[FidelityStep]:
        """A trial's fidelity steps (:func:`~hpo.pruning.fidelity_schedule`) for the preset's search settings.

        Prefix rungs only when pruning (they would be wasted otherwise), and never with needle masks
        (a prefix may hold no scored token).
        """
        prefixes = search.pruning_prefixes if search.pruning and self.score_masks is None else ()
        return fidelity_schedule([window.numel() for window in self.windows], prefixes)

    def measure(self, factors: RopeFactors, step: FidelityStep, desc: str = "trial") -> PerplexityResult:
        """Perplexity of one fidelity step: searched window ``step.window`` cut to ``step.tokens`` tokens."""
        masks = None if self.score_masks is None else [self.score_masks[step.window][: step.tokens]]
        return self._perplexity(factors, [self.windows[step.window][: step.tokens]], masks, desc)

    def evaluate(self, factors: RopeFactors, schedule: list[FidelityStep],
                 desc: str = "trial") -> Iterator[Measurement]:
        """Measure ``factors`` step by step; after the last step the value equals :meth:`fitness`.

        A prefix step's value is its own perplexity; a full window's is the token-weighted
        perplexity of the full windows so far, summed in the same order as :meth:`fitness`.
        """
        nll, tokens = 0.0, 0
        for step in schedule:
            result = self.measure(factors, step, desc)
            if step.prefix:
                yield Measurement(step, result.perplexity, result.perplexity)
                continue
            nll += result.nll_sum
            tokens += result.tokens
            yield Measurement(step, math.exp(nll / tokens), result.perplexity)


def load_workload(preset: StudyPreset) -> Workload:
    """Load the preset's model once and cut its searched and held-out windows.

    A chained preset (``[extend]``) loads the earlier study's model; a longer stage searches from
    the earlier target length, a short stage at ``target_length`` within the model's window.
    """
    stage = stage_for(preset)
    model, tokenizer = load_model(stage.model if stage else preset.model.name, dtype=preset.model.dtype,
                                  device=preset.model.device, attn_implementation=preset.model.attn)
    model_geometry = RopeGeometry.from_config(model.config)
    if preset.model.original_length:
        model_geometry = RopeGeometry(model_geometry.rotary_dim, model_geometry.base, preset.model.original_length)
    geometry = model_geometry
    if stage:
        stage.factors.validate(model_geometry)
        if stage.factors.original_length != model_geometry.original_length:
            raise FactorError(f"{stage.from_study}'s factors extend a {stage.factors.original_length}-token window; "
                              f"the model's is {model_geometry.original_length}")
    if stage and stage.mode == "short":
        if preset.target_length > model_geometry.original_length:
            raise ValueError(f"a short stage searches within the model's window: target_length "
                             f"{preset.target_length} must be at most {model_geometry.original_length}")
    else:
        if stage:
            geometry = RopeGeometry(model_geometry.rotary_dim, model_geometry.base, stage.factors.target_length)
        if preset.target_length <= geometry.original_length:
            raise ValueError(f"target_length {preset.target_length} must be longer than the "
                             f"{'earlier stage' if stage else 'model'}'s original window {geometry.original_length}")
    data = preset.data

    def cut(first: int, samples: int) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        if samples == 0:
            return [], None
        windows = load_windows(data.source, tokenizer, preset.target_length, samples, first_window=first,
                               mode=data.window_mode, min_tokens=data.min_tokens)
        if preset.fitness.kind == "needle-perplexity":
            return needle_windows(windows, tokenizer, preset.fitness.needles, seed=preset.search.seed + first)
        return windows, None

    windows, masks = cut(data.first_window, data.samples)
    heldout, heldout_masks = cut(data.heldout_start, data.heldout_samples)
    return Workload(model, geometry, windows, masks, heldout, heldout_masks, model_geometry, stage)


def search_space_for(preset: StudyPreset, workload: Workload) -> LongRoPESearchSpace:
    """The preset's space over ``workload``'s window; a short stage searches in the long factors' bounds."""
    search = preset.search
    geometry = workload.geometry
    short = workload.stage is not None and workload.stage.mode == "short"
    swept = search.critical_dim if isinstance(search.critical_dim, tuple) else ()
    if search.critical_dim == "auto":
        critical_dim = critical_dimension(geometry)
    else:
        critical_dim = min(swept or [search.critical_dim])
    return LongRoPESearchSpace(
        num_factors=geometry.num_factors,
        original_length=geometry.original_length,
        target_length=workload.stage.factors.target_length if short else preset.target_length,
        max_factor=search.length_scale if critical_dim else search.max_factor,
        start_token_candidates=search.start_tokens,
        attention_scaling_range=search.attention_scaling,
        critical_dim=critical_dim,
        yarn_beta_fast=search.yarn_beta_fast,
        yarn_beta_slow=search.yarn_beta_slow,
        critical_dims=swept,
    )


def sampler_for(preset: StudyPreset, space: LongRoPESearchSpace) -> LongRoPESampler:
    search = preset.search
    return LongRoPESampler(space, population_size=search.population, num_parents=search.parents,
                           num_mutants=search.mutants, num_crossovers=search.crossovers,
                           mutation_prob=search.mutation_prob, crossover_prob=search.crossover_prob,
                           seed=search.seed, start_token_search=search.start_token_search,
                           mutants_of=search.mutants_of)


def pruner_for(preset: StudyPreset) -> optuna.pruners.BasePruner:
    search = preset.search
    if not search.pruning:
        return optuna.pruners.NopPruner()
    rank = search.parents if search.pruning_rank is None else search.pruning_rank
    return ParentPruner(rank, search.pruning_margin)


def workload_record(preset: StudyPreset, workload: Workload) -> dict[str, Any]:
    """Everything a trial's value depends on besides its factors: the model (and its revision), the
    precision it ran in, the lengths, the text and windows, and the fitness. :func:`open_study` records
    it when the study is created and refuses to continue a study under other settings, whose values
    would be ranked together with values of another measurement."""
    data, fitness = preset.data, preset.fitness
    record: dict[str, Any] = {
        "model": workload.stage.model if workload.stage else preset.model.name,
        "model_revision": model_revision(workload.model),
        "dtype": str(workload.model.dtype).removeprefix("torch."),
        "original_length": workload.geometry.original_length,
        "target_length": preset.target_length,
        "data.source": data.source,
        "data.window_mode": data.window_mode or default_window_mode(data.source),
        "data.first_window": data.first_window,
        "data.samples": data.samples,
        "data.heldout_first_window": data.heldout_start,
        "data.heldout_samples": data.heldout_samples,
        "data.min_tokens": data.min_tokens,
        "fitness.kind": fitness.kind,
    }
    if fitness.kind == "needle-perplexity":  # the needles and their depths are drawn from the seed
        record.update({"fitness.needles": fitness.needles, "search.seed": preset.search.seed})
    return record


def _refuse_other_settings(name: str, what: str, recorded: dict[str, Any], current: dict[str, Any]) -> None:
    """A one-line ``ValueError`` naming the first key whose value differs between the two records."""
    for key, now in current.items():
        if recorded.get(key) != now:
            raise ValueError(f"study {name!r} in this storage was run with {what}{key} = {recorded.get(key)!r}, "
                             f"not {now!r}: its values would not compare with new ones; use the same settings to "
                             f"continue, or another --out/--storage for a new study")


def open_study(preset: StudyPreset, storage: RDBStorage, space: LongRoPESearchSpace,
               workload: Workload) -> optuna.Study:
    """Create the study or load it to continue; the preset's space, the workload's settings
    (:func:`workload_record`) and its stage are recorded and must not change: a resume under other
    settings is a ``ValueError`` that names the first setting that differs."""
    sampler = sampler_for(preset, space)
    study = optuna.create_study(study_name=preset.name, storage=storage, direction="minimize", sampler=sampler,
                                pruner=pruner_for(preset), load_if_exists=True)
    stage, settings = workload.stage, workload_record(preset, workload)
    if study.user_attrs.get("search_space") is None:
        study.set_user_attr("search_space", space.to_record())
        study.set_user_attr("preset", preset.name)
        study.set_user_attr("workload", settings)
        if stage:
            study.set_user_attr("stage", stage.to_record())
    if study.user_attrs.get("workload") is None:  # a study from before settings were recorded: take today's
        logger.info("study %r has no recorded settings: recording the current ones", preset.name)
        study.set_user_attr("workload", settings)
    _refuse_other_settings(preset.name, "", study.user_attrs["workload"], settings)
    recorded_space = LongRoPESearchSpace.from_record(study.user_attrs["search_space"]).to_record()
    _refuse_other_settings(preset.name, "search space ", recorded_space, space.to_record())
    if study.user_attrs.get("stage") != (stage.to_record() if stage else None):
        raise ValueError(f"study {preset.name!r} in this storage was built on other earlier factors than "
                         f"{preset.extend.from_study!r} has now; use another --out/--storage to start a new study")
    return study


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

    def claim(self, study: optuna.Study, distributions: dict[str, BaseDistribution],
              n_trials: int, stop: StopRule | None = None) -> optuna.Trial | None:
        """The next trial of ``study``, asked with ``distributions``; ``None`` once ``n_trials`` are claimed.

        Also ``None`` once ``stop`` (:func:`hpo.early_stopping.stopper`) gives a reason to stop early:
        the reason is then recorded in the study's ``early_stopped`` user attr and logged.
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


def open_claims(study: optuna.Study, storage: RDBStorage, space: LongRoPESearchSpace,
                seeds: list[RopeFactors]) -> TrialClaims:
    """The study's :class:`TrialClaims`, with ``seeds`` (:meth:`Workload.seeds`) enqueued once per study.

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
        self._bar.update(int(trial.state in EVALUATED))
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if completed:
            self._bar.set_postfix(best=f"{min(t.value for t in completed):.3f}", last=trial.state.name.lower())

    def close(self) -> None:
        self._bar.close()


def make_objective(workload: Workload, space: LongRoPESearchSpace,
                   schedule: list[FidelityStep]) -> Callable[[optuna.Trial], float]:
    """The trial objective: measure the trial's factors step by step, reporting each running value.

    After every step but the last the study's pruner may stop the trial (``optuna.TrialPruned``);
    pruning after the last step would save nothing. Errors are recorded in the ``error`` user attr.
    """
    def objective(trial: optuna.Trial) -> float:
        factors = space.to_factors(trial.params)
        started = time.perf_counter()
        trial.set_user_attr("worker", worker_name())
        per_window = []
        try:
            for position, measured in enumerate(workload.evaluate(factors, schedule, desc=f"trial {trial.number}")):
                trial.report(measured.value, measured.step.step)
                if not measured.step.prefix:
                    per_window.append(measured.perplexity)
                if position < len(schedule) - 1 and trial.should_prune():
                    raise optuna.TrialPruned(f"{measured.value:.4f} at step {measured.step.step} could not "
                                             f"make a parent")
        except optuna.TrialPruned:
            raise
        except Exception as error:
            trial.set_user_attr(ERROR_ATTR, f"{type(error).__name__}: {error}")
            raise
        finally:
            trial.set_user_attr("window_perplexities", per_window)
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
        if not math.isfinite(measured.value):
            trial.set_user_attr(ERROR_ATTR, f"non-finite perplexity {measured.value}")
        return measured.value

    return objective


def run_trial(study: optuna.Study, trial: optuna.Trial, objective: Callable[[optuna.Trial], float]) -> FrozenTrial:
    """Evaluate a claimed trial with a heartbeat running and tell the study how it ended.

    Like ``study.optimize``'s own step: pruned and failed trials are recorded as such and the run
    goes on; a non-finite value fails the trial. Ctrl-C propagates (:func:`run_search` ends the
    trial with :func:`interrupt_trial`).
    """
    with get_heartbeat_thread(trial._trial_id, study._storage):
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            return study.tell(trial, state=TrialState.PRUNED)
        except Exception as error:
            logger.warning("trial %d failed: %s: %s", trial.number, type(error).__name__, error)
            return study.tell(trial, state=TrialState.FAIL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Optuna's own note on a non-finite value: logged below
        told = study.tell(trial, value)
    if told.state == TrialState.FAIL:
        logger.warning("trial %d failed: %s", trial.number, told.user_attrs.get("error"))
    return told


@contextmanager
def _interrupts_held() -> Iterator[None]:
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
    """End a claimed trial that Ctrl-C or SIGTERM stopped: failed, marked ``interrupted``, and its
    parameters re-queued at once (a killed worker's are re-queued only once its heartbeat is stale).
    A trial that is no longer running is left as it is."""
    if study._storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
        return
    study._storage.set_trial_user_attr(trial._trial_id, INTERRUPTED_ATTR, True)
    failed = study.tell(trial, state=TrialState.FAIL)
    # Optuna's retry record (failed_trial, retry_history), with the sampler's attrs (generation, proposal);
    # of the user attrs only the seed label: the others describe the interrupted run
    history = [*failed.system_attrs.get("retry_history", []), failed.number]
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=failed.params, distributions=failed.distributions,
        user_attrs={key: value for key, value in failed.user_attrs.items() if key == "seed"},
        system_attrs={**failed.system_attrs, "failed_trial": history[0], "retry_history": history}))
    logger.info("trial %d interrupted: its parameters are queued to run first next time", trial.number)


def run_search(study: optuna.Study, storage: RDBStorage, workload: Workload, space: LongRoPESearchSpace,
               preset: StudyPreset, progress: bool = True) -> None:
    """Run trials until the study holds ``preset.search.n_trials`` complete or pruned ones.

    Trials are claimed through :class:`TrialClaims`, so any number of processes may run this on one
    storage at the same time: together they finish exactly that many trials, and each returns once
    the study has them all (it waits for the others' last trials, then claims the places that
    failed trials freed). Ctrl-C ends the running trial with :func:`interrupt_trial`. With ``[search]
    early_stop_generations`` they stop claiming sooner, once the best value has stalled
    (:mod:`hpo.early_stopping`; recorded in the study's ``early_stopped`` user attr).
    """
    n_trials = preset.search.n_trials
    claims = open_claims(study, storage, space, workload.seeds(space))
    stop = stopper(preset.search, study.sampler)
    with claims.locked():
        forget_stale_stop(study, stop)
    objective = make_objective(workload, space, workload.schedule(preset.search))
    bar = TrialProgress(study, n_trials, progress)
    distributions = space.distributions()
    trial = None
    try:
        while True:
            with _interrupts_held():
                trial = claims.claim(study, distributions, n_trials, stop)
            if trial is None:
                claims.wait(study)  # the others' last trials; a dead worker's fail and are re-queued
                with _interrupts_held():
                    trial = claims.claim(study, distributions, n_trials, stop)
                if trial is None:
                    return
            bar.update(study, run_trial(study, trial, objective))
    except KeyboardInterrupt:
        if trial is not None:
            interrupt_trial(study, trial)
        raise
    finally:
        bar.close()


def _matching_trial_value(study: optuna.Study, space: LongRoPESearchSpace, factors: RopeFactors) -> float | None:
    """The value of a completed trial that evaluated exactly ``factors`` (a seed), if any."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        tried = space.to_factors(trial.params)
        if (tried.rescale_factors == factors.rescale_factors and tried.start_tokens == factors.start_tokens
                and tried.attention_scaling == factors.attention_scaling):
            return trial.value
    return None


def reference_candidates(workload: Workload, space: LongRoPESearchSpace) -> list[tuple[str, RopeFactors]]:
    """What the best trial is compared with: the baselines (YaRN with the preset's betas), on top of a
    longer stage's factors; for a short stage, no rescaling (factors 1: what the export uses within the
    window without a short search) and the long factors."""
    stage = workload.stage
    if stage and stage.mode == "short":
        return [("none", baseline("none", workload.model_geometry, space.target_length)),
                (f"{stage.from_study} long factors", stage.factors)]
    candidates = [(name, yarn(workload.geometry, space.target_length, space.yarn_beta_fast, space.yarn_beta_slow)
                   if name == "yarn" else baseline(name, workload.geometry, space.target_length))
                  for name in REFERENCE_METHODS]
    if stage:
        return [(f"{stage.from_study} only" if name == "none" else f"{stage.from_study} + {name}", factors)
                for name, factors in candidates]
    return candidates


def compare_with_baselines(study: optuna.Study, workload: Workload, space: LongRoPESearchSpace) -> list[dict]:
    """Perplexity of the best trial and each reference (:func:`reference_candidates`) on the searched
    and held-out windows; with a sweep of LongRoPE2 critical dims, also of the best trial of each
    (before the overall best, which stays the last row).

    Each figure is stored in the study's user attrs once computed, so a resumed
    run does not pay for it again.
    """
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = study.best_trial
    found = []
    for critical_dim in space.critical_dims if space.sweeps_critical_dim else ():
        trials = [t for t in complete if space.critical_dim_of(t.params) == critical_dim]
        if trials:
            top = min(trials, key=lambda t: (t.value, t.number))
            found.append((f"critical dim {critical_dim} (trial {top.number})", top))
    found.append((f"longrope (trial {best.number})", best))
    candidates = reference_candidates(workload, space)
    candidates += [(name, space.to_factors(trial.params)) for name, trial in found]
    searched_values = {name: trial.value for name, trial in found}
    rows = []
    for name, factors in candidates:
        row = {"method": name}
        for split, heldout in (("searched", False), ("heldout", True)):
            if heldout and not workload.heldout_windows:
                continue
            key = f"{split}:{name}"
            value = study.user_attrs.get(key)
            if value is None and not heldout:
                value = searched_values.get(name) or _matching_trial_value(study, space, factors)
            if value is None:
                value, _ = workload.fitness(factors, heldout=heldout, desc=f"{name} ({split})")
            study.set_user_attr(key, value)
            row[split] = value
        rows.append(row)
    return rows


def format_comparison(rows: list[dict], preset: StudyPreset) -> str:
    splits = [s for s in ("searched", "heldout") if any(s in row for row in rows)]
    width = max(len(row["method"]) for row in rows)
    lines = [f"perplexity at {preset.target_length:,} tokens ({preset.data.source})",
             f"{'method':<{width}} | " + " | ".join(f"{s:>9}" for s in splits)]
    lines.append("-" * len(lines[-1]))
    for row in rows:
        lines.append(f"{row['method']:<{width}} | " + " | ".join(f"{row.get(s, math.nan):9.3f}" for s in splits))
    return "\n".join(lines)
