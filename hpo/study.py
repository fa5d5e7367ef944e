"""Run a LongRoPE search as an Optuna study, resumably, and report it against the baselines.

The flow is linear: load the model once, cut the searched and held-out windows,
open (or create) the study in its storage, enqueue the baseline seeds once, run
trials until the study holds ``n_trials`` finished ones, then compare the best
factors with none / PI / NTK / YaRN on both window sets and write the outputs.

Every trial is committed to the storage when it ends, so a stop at any moment
loses at most the running trial. A run killed hard (SIGKILL) leaves that trial
RUNNING; its heartbeat goes stale and the next run fails it and re-queues the
same parameters.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from tqdm.auto import tqdm

from hpo.sampler import LongRoPESampler, enqueue_seeds
from hpo.search_space import LongRoPESearchSpace
from models.baselines import baseline, critical_dimension
from models.export import write_rope_parameters
from models.loading import load_model
from models.patch import patched
from models.rope import RopeFactors, RopeGeometry
from objectives.data import load_windows
from objectives.needle import needle_windows
from objectives.perplexity import perplexity
from studies import StudyPreset

logger = logging.getLogger(__name__)

REFERENCE_METHODS = ("none", "pi", "ntk", "yarn")
HEARTBEAT_INTERVAL_S = 10
GRACE_PERIOD_S = 30
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


class StorageError(RuntimeError):
    """The study storage URL cannot be opened."""


def default_storage_url(out_dir: Path) -> str:
    return f"sqlite:///{(out_dir / 'study.db').resolve()}"


def open_storage(url: str) -> RDBStorage:
    """An RDB storage with heartbeats, so trials of a killed process are failed and retried."""
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5 but are what resume needs
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                heartbeat_interval=HEARTBEAT_INTERVAL_S,
                grace_period=GRACE_PERIOD_S,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
                engine_kwargs={"pool_pre_ping": True},
            )
    except Exception as error:  # sqlalchemy raises many types for bad URLs and unreachable servers
        raise StorageError(f"cannot open study storage {url!r}: {type(error).__name__}: "
                           f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}") from None


@dataclass
class Workload:
    """What every trial evaluates on: the loaded model and its windows."""

    model: Any
    geometry: RopeGeometry
    windows: list[torch.Tensor]
    score_masks: list[torch.Tensor] | None
    heldout_windows: list[torch.Tensor]
    heldout_masks: list[torch.Tensor] | None

    def fitness(self, factors: RopeFactors, heldout: bool = False, desc: str = "trial") -> tuple[float, list[float]]:
        windows, masks = (self.heldout_windows, self.heldout_masks) if heldout else (self.windows, self.score_masks)
        with patched(self.model, factors):
            result = perplexity(self.model, windows, score_masks=masks, desc=desc,
                                progress=logger.isEnabledFor(logging.INFO))
        return result.perplexity, result.window_perplexities


def load_workload(preset: StudyPreset) -> Workload:
    """Load the preset's model once and cut its searched and held-out windows."""
    model, tokenizer = load_model(preset.model.name, dtype=preset.model.dtype, device=preset.model.device,
                                  attn_implementation=preset.model.attn)
    geometry = RopeGeometry.from_config(model.config)
    if preset.model.original_length:
        geometry = RopeGeometry(geometry.rotary_dim, geometry.base, preset.model.original_length)
    if preset.target_length <= geometry.original_length:
        raise ValueError(f"target_length {preset.target_length} must be longer than the model's original "
                         f"window {geometry.original_length}")
    data = preset.data

    def cut(first: int, samples: int) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        if samples == 0:
            return [], None
        windows = load_windows(data.source, tokenizer, preset.target_length, samples, first_window=first,
                               mode=data.window_mode)
        if preset.fitness.kind == "needle-perplexity":
            return needle_windows(windows, tokenizer, preset.fitness.needles, seed=preset.search.seed + first)
        return windows, None

    windows, masks = cut(data.first_window, data.samples)
    heldout, heldout_masks = cut(data.heldout_start, data.heldout_samples)
    return Workload(model, geometry, windows, masks, heldout, heldout_masks)


def search_space_for(preset: StudyPreset, geometry: RopeGeometry) -> LongRoPESearchSpace:
    search = preset.search
    critical_dim = critical_dimension(geometry) if search.critical_dim == "auto" else search.critical_dim
    return LongRoPESearchSpace(
        num_factors=geometry.num_factors,
        original_length=geometry.original_length,
        target_length=preset.target_length,
        max_factor=search.max_factor,
        start_token_candidates=search.start_tokens,
        attention_scaling_range=search.attention_scaling,
        critical_dim=critical_dim,
    )


def sampler_for(preset: StudyPreset, space: LongRoPESearchSpace) -> LongRoPESampler:
    search = preset.search
    return LongRoPESampler(space, population_size=search.population, num_parents=search.parents,
                           num_mutants=search.mutants, num_crossovers=search.crossovers,
                           mutation_prob=search.mutation_prob, crossover_prob=search.crossover_prob,
                           seed=search.seed)


def open_study(preset: StudyPreset, storage: RDBStorage, space: LongRoPESearchSpace) -> optuna.Study:
    """Create the study or load it to continue; the preset's space is recorded and must not change."""
    study = optuna.create_study(study_name=preset.name, storage=storage, direction="minimize",
                                sampler=sampler_for(preset, space), load_if_exists=True)
    recorded = study.user_attrs.get("search_space")
    current = {"num_factors": space.num_factors, "original_length": space.original_length,
               "target_length": space.target_length, "critical_dim": space.critical_dim,
               "max_factor": space.upper, "start_tokens": list(space.start_token_candidates),
               "attention_scaling": list(space.attention_scaling_range or []) or None}
    if recorded is None:
        study.set_user_attr("search_space", current)
        study.set_user_attr("preset", preset.name)
    elif recorded != current:
        raise ValueError(f"study {preset.name!r} in this storage was searched with {recorded}, "
                         f"not {current}; use another --out/--storage to start a new study")
    return study


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def make_objective(workload: Workload, space: LongRoPESearchSpace):
    def objective(trial: optuna.Trial) -> float:
        factors = space.suggest(trial)
        started = time.perf_counter()
        try:
            value, per_window = workload.fitness(factors, desc=f"trial {trial.number}")
        except Exception as error:
            trial.set_user_attr("error", f"{type(error).__name__}: {error}")
            raise
        trial.set_user_attr("window_perplexities", per_window)
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 2))
        if not math.isfinite(value):
            trial.set_user_attr("error", f"non-finite perplexity {value}")
        return value

    return objective


def run_search(study: optuna.Study, workload: Workload, space: LongRoPESearchSpace, n_trials: int,
               progress: bool = True) -> None:
    """Run trials until the study holds ``n_trials`` finished ones (failed trials count)."""
    enqueue_seeds(study, space, workload.geometry)
    remaining = n_trials - finished_trials(study)
    if remaining <= 0:
        logger.info("study %r already holds %d finished trials", study.study_name, n_trials)
        return
    bar = tqdm(total=n_trials, initial=n_trials - remaining, desc="trials", unit="trial", disable=not progress)

    def update(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        bar.update(1)
        completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if completed:
            bar.set_postfix(best=f"{min(t.value for t in completed):.3f}", last=trial.state.name.lower())

    try:
        study.optimize(make_objective(workload, space), n_trials=remaining, catch=(Exception,),
                       callbacks=[update, optuna.study.MaxTrialsCallback(n_trials, states=FINISHED)])
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


def compare_with_baselines(study: optuna.Study, workload: Workload, space: LongRoPESearchSpace) -> list[dict]:
    """Perplexity of the best trial and each baseline on the searched and held-out windows.

    Each figure is stored in the study's user attrs once computed, so a resumed
    run does not pay for it again.
    """
    best = study.best_trial
    candidates = [(name, baseline(name, workload.geometry, space.target_length)) for name in REFERENCE_METHODS]
    candidates.append((f"longrope (trial {best.number})", space.to_factors(best.params)))
    rows = []
    for name, factors in candidates:
        row = {"method": name}
        for split, heldout in (("searched", False), ("heldout", True)):
            if heldout and not workload.heldout_windows:
                continue
            key = f"{split}:{name}"
            value = study.user_attrs.get(key)
            if value is None and not heldout:
                value = best.value if name.startswith("longrope") else _matching_trial_value(study, space, factors)
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


def write_outputs(out_dir: Path, study: optuna.Study, workload: Workload, space: LongRoPESearchSpace,
                  preset: StudyPreset, rows: list[dict]) -> dict[str, Path]:
    """``best_factors.json``, ``rope_parameters.json`` and ``results.json`` in ``out_dir``."""
    best = study.best_trial
    heldout = next((row.get("heldout") for row in rows if row["method"].startswith("longrope")), None)
    factors = space.to_factors(best.params)
    factors = RopeFactors(
        factors.rescale_factors, factors.original_length, factors.target_length, factors.start_tokens,
        factors.attention_scaling, method="longrope",
        metadata={"study": study.study_name, "model": preset.model.name, "trial": best.number,
                  "searched_perplexity": best.value, "heldout_perplexity": heldout, "data": preset.data.source},
    )
    trials = study.get_trials(deepcopy=False)
    summary = {
        "study": study.study_name, "model": preset.model.name, "target_length": preset.target_length,
        "trials": {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState},
        "trial_time_s": sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials
                           if t.datetime_complete and t.datetime_start),
        "comparison": rows,
    }
    paths = {
        "factors": factors.save(out_dir / "best_factors.json"),
        "rope_parameters": write_rope_parameters(out_dir / "rope_parameters.json", factors, workload.geometry),
        "results": out_dir / "results.json",
    }
    paths["results"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return paths
