"""Run a LongRoPE search as an Optuna study, resumably, and report it against the baselines.

The flow is linear: load the model once, cut the searched and held-out windows,
open (or create) the study in its storage, enqueue the baseline seeds once, run
trials until the study holds ``n_trials`` finished ones, then compare the best
factors with none / PI / NTK / YaRN on both window sets; :mod:`hpo.outputs` writes the outputs.
The Ray backend (:mod:`hpo.ray_backend`) replaces only the middle step.

Every trial is claimed under a study-wide lock (:class:`~hpo.trials.TrialClaims`), so several
processes may share one study, and committed to the storage when it ends, so a stop
at any moment loses at most the running trial. A run killed hard (SIGKILL) leaves
that trial RUNNING; its heartbeat goes stale and the next claim fails it and
re-queues the same parameters. Trials are measured window by window and may be
pruned (:mod:`hpo.pruning`).
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
import torch
from optuna.distributions import BaseDistribution
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from hpo.curve_space import MonotoneCurveSpace
from hpo.hybrid_sampler import HybridSampler
from hpo.pruning import FidelityStep, ParentPruner, fidelity_schedule
from hpo.records import (
    ERROR_ATTR,
    record_study,
    seed_records,
    stage_for,
    worker_name,
)
from hpo.sampler import LongRoPESampler
from hpo.search_space import LongRoPESearchSpace, RopeSearchSpace
from hpo.stages import Stage
from hpo.trials import StopSignals, StudyTrials
from models.baselines import (
    baseline,
    critical_dimension,
    hand_made_curves,
    length_scale,
    longrope_attention_scaling,
    yarn,
)
from models.loading import load_model, model_revision
from models.patch import patched
from models.rope import FactorError, RopeFactors, RopeGeometry
from objectives.data import default_window_mode, load_windows
from objectives.needle import needle_windows
from objectives.perplexity import PerplexityResult, perplexity
from studies import SearchSpec, StudyPreset

logger = logging.getLogger(__name__)

REFERENCE_METHODS = ("none", "pi", "ntk", "ntk+attn", "yarn", "yarn+attn", "longrope2-init")


def _quietly(make: Callable[..., optuna.samplers.BaseSampler], **options: Any) -> optuna.samplers.BaseSampler:
    """``make(**options)`` without Optuna's note that it is experimental (multivariate TPE, the GP sampler)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return make(**options)


# Optuna's own samplers, by their [search] sampler name; they search a MonotoneCurveSpace.
CURVE_SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed: _quietly(optuna.samplers.TPESampler, seed=seed, multivariate=True),
    # n_hat is categorical, which CMA-ES leaves to its independent (random) sampler: said in the README, not per trial
    "cmaes": lambda seed: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
    "gp": lambda seed: _quietly(optuna.samplers.GPSampler, seed=seed),
}
HYBRID_MODEL = "tpe"  # the sampler of the hybrid's generation 0


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """An Optuna sampler made afresh for every trial, seeded with ``seed + trial.number``.

    Optuna's samplers draw from one random stream per process, so several processes sharing a study
    with one seed (:class:`~hpo.trials.TrialClaims`, the Ray driver beside a local worker) would propose
    the same parameters: the random start trials of TPE and GP coincide draw for draw. Seeding from the
    trial number gives each trial of a shared study its own stream, as :class:`~hpo.sampler.LongRoPESampler`
    does, and keeps a one-process run reproducible. The samplers read their state from the study's trials
    (CMA-ES its optimizer, from the trials' system attrs), so a fresh one per trial loses only caches.

    Args:
        make: the sampler for a seed (a :data:`CURVE_SAMPLERS` value).
        seed: the study's seed (``[search] seed``).
    """

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int) -> None:
        self._make = make
        self._seed = seed
        self._sampler = make(seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._sampler = self._make(self._seed + trial.number)
        self._sampler.before_trial(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        return self._sampler.sample_relative(study, trial, search_space)

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self._sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self._sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._sampler.reseed_rng()


class BackendError(RuntimeError):
    """The asked execution backend cannot run: not installed, or its cluster cannot be reached or used."""


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
    # the second held-out set ([data] heldout_text), by source: only the comparison reads it
    heldout_text: tuple[str, list[torch.Tensor], list[torch.Tensor] | None] | None = None

    @property
    def dtype(self) -> str:
        """The precision the model runs in (``float32``, ``bfloat16``...)."""
        return str(self.model.dtype).removeprefix("torch.")

    def applied(self, factors: RopeFactors) -> RopeFactors:
        """The factors the model runs with for searched ``factors`` (:meth:`Stage.final_factors`)."""
        return self.stage.final_factors(factors) if self.stage else factors

    def seeds(self, space: RopeSearchSpace, hand_made: bool = False) -> list[RopeFactors]:
        """The trials that open the search: the space's baselines, after a chained study's stage's own
        (:meth:`~hpo.stages.Stage.first_seeds`); with ``hand_made``, then the other references of the
        comparison (:func:`reference_candidates`) and the members of :func:`~models.baselines.hand_made_curves`
        (never in LongRoPE2's space, whose factors start at ``s`` from the critical dim)."""
        seeds = space.seeds(self.geometry)
        if self.stage:
            seeds = [*self.stage.first_seeds(self.model_geometry, space.target_length), *seeds]
        hand_made = hand_made and (not self.stage or self.stage.takes_hand_made_seeds)
        if hand_made and not getattr(space, "longrope2", False):
            families = hand_made_curves(self.geometry, space.target_length, space.yarn_beta_fast,
                                        space.yarn_beta_slow)
            references = [factors for name, factors in reference_candidates(self, space) if name != "none"]
            for curve in [*references, *(curve for family in families.values() for curve in family.values())]:
                if curve not in seeds:
                    seeds.append(curve)
        return seeds

    def _perplexity(self, factors: RopeFactors, windows: list[torch.Tensor], masks: list[torch.Tensor] | None,
                    desc: str) -> PerplexityResult:
        with patched(self.model, self.applied(factors)):
            return perplexity(self.model, windows, score_masks=masks, desc=desc,
                              progress=logger.isEnabledFor(logging.INFO))

    @property
    def splits(self) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor] | None]]:
        """The window sets a comparison reports, by name: ``searched``, ``heldout`` (when there are held-out
        windows) and ``heldout:SOURCE`` for the second held-out set of another text."""
        splits = {"searched": (self.windows, self.score_masks)}
        if self.heldout_windows:
            splits["heldout"] = (self.heldout_windows, self.heldout_masks)
        if self.heldout_text:
            source, windows, masks = self.heldout_text
            splits[f"heldout:{source}"] = (windows, masks)
        return splits

    def split_perplexity(self, factors: RopeFactors, split: str = "searched",
                         desc: str = "trial") -> tuple[float, list[float]]:
        """Perplexity of ``factors`` on one of :attr:`splits` (by default the searched windows: a trial's
        value), and each window's own."""
        windows, masks = self.splits[split]
        result = self._perplexity(factors, windows, masks, desc)
        return result.perplexity, result.window_perplexities

    def schedule(self, search: SearchSpec) -> list[FidelityStep]:
        """A trial's fidelity steps (:func:`~hpo.pruning.fidelity_schedule`) for the preset's search settings.

        Prefix rungs only when pruning (they would be wasted otherwise), and never with needle masks
        (a prefix may hold no scored token).
        """
        prefixes = search.pruning_prefixes if search.pruning and self.score_masks is None else ()
        return fidelity_schedule([window.numel() for window in self.windows], prefixes)

    def step_perplexity(self, factors: RopeFactors, step: FidelityStep, desc: str = "trial") -> PerplexityResult:
        """Perplexity of one fidelity step: searched window ``step.window`` cut to ``step.tokens`` tokens."""
        masks = None if self.score_masks is None else [self.score_masks[step.window][: step.tokens]]
        return self._perplexity(factors, [self.windows[step.window][: step.tokens]], masks, desc)

    def trial_steps(self, factors: RopeFactors, schedule: list[FidelityStep],
                    desc: str = "trial") -> Iterator[Measurement]:
        """Measure ``factors`` step by step; after the last step the value equals :meth:`split_perplexity`.

        A prefix step's value is its own perplexity; a full window's is the token-weighted
        perplexity of the full windows so far, summed in the same order as :meth:`split_perplexity`.
        """
        nll, tokens = 0.0, 0
        for step in schedule:
            result = self.step_perplexity(factors, step, desc)
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
        geometry = stage.search_geometry(model_geometry, preset.target_length)
    elif preset.target_length <= geometry.original_length:
        raise ValueError(f"target_length {preset.target_length} must be longer than the model's original window "
                         f"{geometry.original_length}")
    data = preset.data

    def cut(first: int, samples: int,
            source: str = data.source) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        if samples == 0:
            return [], None
        windows = load_windows(source, tokenizer, preset.target_length, samples, first_window=first,
                               mode=data.window_mode if source == data.source else None,
                               min_tokens=data.min_tokens if source == data.source else None)
        if preset.fitness.kind == "needle-perplexity":
            return needle_windows(windows, tokenizer, preset.fitness.needles, seed=preset.search.seed + first)
        return windows, None

    windows, masks = cut(data.first_window, data.samples)
    heldout, heldout_masks = cut(data.heldout_start, data.heldout_samples)
    heldout_text = (data.heldout_text, *cut(0, data.heldout_text_samples, data.heldout_text)) if data.heldout_text \
        else None
    return Workload(model, geometry, windows, masks, heldout, heldout_masks, model_geometry, stage, heldout_text)


def curve_space_for(search: SearchSpec, num_factors: int, original_length: int, target_length: int,
                    max_factor: float | None = None) -> MonotoneCurveSpace:
    """The :class:`MonotoneCurveSpace` of ``search``'s settings (its ``max_factor`` unless one is given)."""
    return MonotoneCurveSpace(
        num_factors=num_factors, original_length=original_length, target_length=target_length,
        knots=search.curve_knots, max_factor=search.max_factor if max_factor is None else max_factor,
        start_token_candidates=search.start_tokens, attention_scaling_range=search.attention_scaling,
        yarn_beta_fast=search.yarn_beta_fast, yarn_beta_slow=search.yarn_beta_slow,
    )


def search_space_for(preset: StudyPreset, workload: Workload) -> RopeSearchSpace:
    """The preset's space over ``workload``'s window; a short stage searches in the long factors' bounds.

    The per-pair :class:`LongRoPESearchSpace` for the evolutionary sampler (``[search] sampler = "longrope"``),
    a :class:`MonotoneCurveSpace` of ``curve_knots`` knots for Optuna's own samplers (:data:`CURVE_SAMPLERS`).
    """
    search = preset.search
    geometry = workload.geometry
    stage = workload.stage
    target_length = stage.search_target_length(preset.target_length) if stage else preset.target_length
    if search.sampler in CURVE_SAMPLERS:
        return curve_space_for(search, geometry.num_factors, geometry.original_length, target_length)
    swept = search.critical_dim if isinstance(search.critical_dim, tuple) else ()
    if search.critical_dim == "auto":
        critical_dim = critical_dimension(geometry)
    else:
        critical_dim = min(swept or [search.critical_dim])
    return LongRoPESearchSpace(
        num_factors=geometry.num_factors,
        original_length=geometry.original_length,
        target_length=target_length,
        max_factor=search.length_scale if critical_dim else search.max_factor,
        start_token_candidates=search.start_tokens,
        attention_scaling_range=search.attention_scaling,
        critical_dim=critical_dim,
        yarn_beta_fast=search.yarn_beta_fast,
        yarn_beta_slow=search.yarn_beta_slow,
        critical_dims=swept,
    )


def sampler_for(preset: StudyPreset, space: RopeSearchSpace, seeds: int = 0) -> optuna.samplers.BaseSampler:
    """The preset's ``[search] sampler`` over ``space`` (:func:`search_space_for` made for that sampler).

    The evolutionary sampler's generation 0 grows to hold all ``seeds`` (distinct enqueued trials) when
    they outnumber ``[search] population``, so that it breeds from all of them; the hybrid's is the seeds
    and then ``population`` model proposals.
    """
    search = preset.search
    if search.sampler in CURVE_SAMPLERS:
        if search.start_token_search == "sweep":
            logger.warning("sampler %r draws n_hat as a parameter: start_token_search = 'sweep' (the longrope "
                           "sampler's rule) is ignored", search.sampler)
        return TrialSeededSampler(CURVE_SAMPLERS[search.sampler], search.seed)
    assert isinstance(space, LongRoPESearchSpace)
    options = dict(population_size=max(search.population, seeds), num_parents=search.parents,
                   num_mutants=search.mutants, num_crossovers=search.crossovers,
                   mutation_prob=search.mutation_prob, crossover_prob=search.crossover_prob,
                   seed=search.seed, start_token_search=search.start_token_search, mutants_of=search.mutants_of)
    if search.sampler == "hybrid":  # the model phase is `population` trials after the seeds
        curves = curve_space_for(search, space.num_factors, space.original_length, space.target_length, space.upper)
        return HybridSampler(space, curves, CURVE_SAMPLERS[HYBRID_MODEL],
                             **{**options, "population_size": seeds + search.population})
    return LongRoPESampler(space, **options)


def pruner_for(preset: StudyPreset) -> optuna.pruners.BasePruner:
    """The study's pruner: :class:`~hpo.pruning.ParentPruner` with the preset's rank and margin, or none."""
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
        "dtype": workload.dtype,
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


def open_study(preset: StudyPreset, storage: RDBStorage, space: RopeSearchSpace,
               workload: Workload) -> optuna.Study:
    """Create the study or load it to continue; the preset's space, the workload's settings
    (:func:`workload_record`) and its stage are recorded and must not change: a resume under other
    settings is a :class:`~hpo.records.StudyError` that names the first setting that differs.

    The sampler is sized for the seeds the study opened with (:func:`~hpo.records.seed_records`), or for
    those it will open with, so a resumed study keeps its generations whatever the seeds are now.
    """
    study = optuna.create_study(study_name=preset.name, storage=storage, direction="minimize",
                                sampler=optuna.samplers.RandomSampler(), pruner=pruner_for(preset),
                                load_if_exists=True)
    record_study(study, preset.name, space, workload_record(preset, workload), workload.stage)
    params = [record["params"] for record in seed_records(study)] or [
        space.to_params(seed) for seed in workload.seeds(space, preset.search.hand_made_seeds)]
    study.sampler = sampler_for(preset, space, len({json.dumps(p, sort_keys=True) for p in params}))
    return study


def measure_trial(trials: StudyTrials, trial: optuna.Trial, workload: Workload, space: RopeSearchSpace,
                  schedule: list[FidelityStep]) -> FrozenTrial:
    """Measure a claimed trial's factors step by step in this process and record how it ended.

    After every step but the last the study's pruner may stop it; an error fails it (recorded in the
    ``error`` user attr) and the run goes on, as ``study.optimize`` does. Ctrl-C propagates.
    """
    started = time.perf_counter()
    attrs: dict[str, Any] = {"worker": worker_name(), "window_perplexities": []}
    value, state = None, None
    try:
        for measured in workload.trial_steps(space.to_factors(trial.params), schedule, desc=f"trial {trial.number}"):
            if not measured.step.prefix:
                attrs["window_perplexities"].append(measured.perplexity)
            if trials.report(trial, measured.value, measured.step.step, last=measured.step == schedule[-1]):
                state = TrialState.PRUNED
                break
        else:
            value = measured.value
    except Exception as error:
        attrs[ERROR_ATTR] = f"{type(error).__name__}: {error}"
        state = TrialState.FAIL
    attrs["seconds"] = round(time.perf_counter() - started, 2)
    return trials.finish(trial, value, state, attrs)


def run_search(study: optuna.Study, storage: RDBStorage, workload: Workload, space: RopeSearchSpace,
               preset: StudyPreset, progress: bool = True, stop_signals: StopSignals | None = None) -> None:
    """Run trials until the study holds ``preset.search.n_trials`` complete or pruned ones.

    Trials are claimed through :class:`~hpo.trials.StudyTrials`, so any number of processes may run this
    on one storage at the same time: together they finish exactly that many trials, and each returns once
    the study has them all (it waits for the others' last trials, then claims the places that failed trials
    freed). Ctrl-C ends the running trial with :func:`~hpo.trials.interrupt_trial`; ``stop_signals``
    (:class:`~hpo.trials.StopSignals`) is checked before each claim, so a signal that Python dropped
    still stops the run. With ``[search] early_stop_generations`` they stop claiming sooner, once the
    best value has stalled, and with ``[search] max_full_evaluations`` once the finished trials read that many
    searched windows in full (:mod:`hpo.early_stopping`; recorded in the study's ``early_stopped`` user attr).
    """
    schedule = workload.schedule(preset.search)
    trials = StudyTrials(study, storage, space, workload.seeds(space, preset.search.hand_made_seeds),
                         preset.search, schedule, progress)
    try:
        while True:
            if stop_signals is not None:
                stop_signals.check()
            trial = trials.claim()
            if trial is None:
                trials.wait_for_others()
                trial = trials.claim()
                if trial is None:
                    return
            measure_trial(trials, trial, workload, space, schedule)
    finally:
        trials.close()


def _matching_trial_value(study: optuna.Study, space: RopeSearchSpace, factors: RopeFactors) -> float | None:
    """The value of a completed trial that evaluated exactly ``factors`` (a seed), if any."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        tried = space.to_factors(trial.params)
        if (tried.rescale_factors == factors.rescale_factors and tried.start_tokens == factors.start_tokens
                and tried.attention_scaling == factors.attention_scaling):
            return trial.value
    return None


def reference_candidates(workload: Workload, space: RopeSearchSpace) -> list[tuple[str, RopeFactors]]:
    """What the best trial is compared with: the baselines of :data:`REFERENCE_METHODS` (YaRN with the
    preset's betas), or what a chained study's stage makes of them (:meth:`~hpo.stages.Stage.references`)."""
    stage, geometry, target_length = workload.stage, workload.geometry, space.target_length
    betas = (space.yarn_beta_fast, space.yarn_beta_slow)
    scaling = longrope_attention_scaling(length_scale(geometry, target_length), geometry.original_length)
    candidates = []
    for name in REFERENCE_METHODS:
        if name in ("yarn", "yarn+attn"):
            factors = yarn(geometry, target_length, *betas, attention_scaling=None if name == "yarn" else scaling)
        else:
            factors = baseline(name, geometry, target_length)
        candidates.append((name, factors))
    return stage.references(candidates, workload.model_geometry, target_length) if stage else candidates


def compare_with_baselines(study: optuna.Study, workload: Workload, space: RopeSearchSpace) -> list[dict]:
    """Perplexity of the best trial and each reference (:func:`reference_candidates`) on the searched
    and held-out windows, and of each hand-made family's tuned curve (the member of
    :func:`~models.baselines.hand_made_curves` with the lowest searched perplexity, every member measured
    on the searched windows); with a sweep of LongRoPE2 critical dims, also of the best trial of each
    (before the overall best, which stays the last row). Every row says the precision it was measured in.

    Each figure is stored in the study's user attrs once computed (a seed's searched value is its
    trial's), so a resumed run does not pay for it again.
    """
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = study.best_trial
    found = []
    if isinstance(space, LongRoPESearchSpace) and space.sweeps_critical_dim:
        for critical_dim in space.critical_dims:
            trials = [t for t in complete if space.critical_dim_of(t.params) == critical_dim]
            if trials:
                top = min(trials, key=lambda t: (t.value, t.number))
                found.append((f"critical dim {critical_dim} (trial {top.number})", top))
    found.append((f"longrope (trial {best.number})", best))
    searched_values = {name: trial.value for name, trial in found}

    def measured(name: str, factors: RopeFactors, split: str) -> float:
        key = f"{split}:{name}"
        value = study.user_attrs.get(key)
        if value is None and split == "searched":
            value = searched_values.get(name) or _matching_trial_value(study, space, factors)
        if value is None:
            value, _ = workload.split_perplexity(factors, split=split, desc=f"{name} ({split})")
        study.set_user_attr(key, value)
        return value

    # (row name, the name its figures are stored under, factors)
    candidates = [(name, name, factors) for name, factors in reference_candidates(workload, space)]
    if not workload.stage:
        families = hand_made_curves(workload.geometry, space.target_length, space.yarn_beta_fast,
                                    space.yarn_beta_slow)
        for family, curves in families.items():
            member = min(curves, key=lambda name: measured(name, curves[name], "searched"))
            candidates.append((f"{family} tuned: {member}", member, curves[member]))
    candidates += [(name, name, space.to_factors(trial.params)) for name, trial in found]
    rows = []
    for row_name, name, factors in candidates:
        row: dict[str, Any] = {"method": row_name}
        for split in workload.splits:
            row[split] = measured(name, factors, split)
        row["dtype"] = workload.dtype
        rows.append(row)
    return rows


def format_comparison(rows: list[dict], preset: StudyPreset) -> str:
    """The comparison as a table, then how the searched factors compare with the best baseline."""
    splits = [key for key in rows[-1] if key not in ("method", "dtype")]
    width = max(len(row["method"]) for row in rows)
    dtype = rows[-1].get("dtype", "")
    lines = [f"perplexity at {preset.target_length:,} tokens ({preset.data.source}, {dtype})",
             f"{'method':<{width}} | " + " | ".join(f"{s:>{max(9, len(s))}}" for s in splits)]
    lines.append("-" * len(lines[-1]))
    for row in rows:
        values = (f"{row.get(s, math.nan):>{max(9, len(s))}.3f}" for s in splits)
        lines.append(f"{row['method']:<{width}} | " + " | ".join(values))
    found = rows[-1]
    references = [row for row in rows if not row["method"].startswith(("longrope (", "critical dim"))]
    for split in splits:
        rival = min(references, key=lambda row: row[split])
        lines.append(f"{split}: {found['method']} is {100 * (found[split] / rival[split] - 1):+.1f}% against the "
                     f"best baseline, {rival['method']}")
    return "\n".join(lines)
