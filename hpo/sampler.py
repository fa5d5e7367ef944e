"""LongRoPE's evolutionary search as an Optuna sampler.

:class:`LongRoPESampler` proposes whole rescale-factor vectors (plus n_hat and the
attention scaling when searched) by mutation and crossover of the best trials so
far, the way the LongRoPE reference search does, with all of its state in the
study storage. :func:`enqueue_seeds` puts the baselines in front of the search.
:func:`mutate` and :func:`crossover` are the single-draw operators, kept pure so
they can be tested alone.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseGASampler, RandomSampler
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from hpo.records import SEEDS_KEY
from hpo.search_space import (
    ATTENTION_SCALING_PARAM,
    CRITICAL_DIM_PARAM,
    START_TOKENS_PARAM,
    LongRoPESearchSpace,
    RopeSearchSpace,
)
from models.rope import RopeFactors
from studies import START_TOKEN_SEARCHES

# Study and trial system attributes. The generation and parent-cache keys come from
# BaseGASampler, which derives them from the class name ("LongRoPESampler:..."); the seeds' and the
# generation's keys, which readers use too, are spelled in hpo.records.
PROPOSAL_KEY = "LongRoPESampler:proposal"
ROLE_KEY = "LongRoPESampler:role"
PARENTS_KEY = "LongRoPESampler:parents"
MUTANT = "mutant"
CROSSOVER = "crossover"
START_TOKENS = "start-tokens"  # a trial that re-evaluates another one with another n_hat (the sweep rule)
SLOT_KEY = "LongRoPESampler:slot"  # with the sweep rule: the place in its generation a trial was proposed for
PARENT_SWEEP = "parent-sweep"
MUTANT_SWEEP = "mutant-sweep"


@dataclass(frozen=True)
class Proposal:
    """What a sampler decided for one trial: its parameters, its role (:data:`MUTANT`, :data:`CROSSOVER`,
    :data:`START_TOKENS`...), the numbers of the trials it came from, and its sweep slot if any."""

    params: dict[str, Any]
    role: str
    parents: list[int]
    slot: str | None = None


def _grid_index(value: float, step: float) -> int:
    return int(round(value / step))


def _grid_value(index: int, step: float) -> float:
    # round() drops the float noise of the product: 1.03, not 1.0300000000000002
    return round(index * step, 10)


def _grid_points(low: float, high: float, step: float) -> list[float]:
    """Every multiple of ``step`` in ``[low, high]``, clipped so float noise cannot leave it."""
    first = math.ceil(low / step - 1e-9)
    last = math.floor(high / step + 1e-9)
    return [min(max(_grid_value(k, step), low), high) for k in range(first, last + 1)]


def mutate(
    params: Mapping[str, Any],
    search_space: LongRoPESearchSpace,
    rng: np.random.Generator,
    mutation_prob: float,
    mutate_start_tokens: bool = True,
) -> dict[str, Any]:
    """One mutation draw of ``params`` (a full, ordered parameter set of ``search_space``).

    Each searched factor is, with probability ``mutation_prob``, redrawn uniformly from the
    ``step`` grid points between its two neighbours in ``params`` (the first between
    ``min_factor`` and its right neighbour, the last between its left neighbour and
    ``max_factor``); it stays put when no grid point lies there. In LongRoPE2 mode the points
    lie strictly between the neighbours, and the last factor at most ``last_factor_step`` above
    its neighbour (the reference's ``dim_mono.py``). ``start_tokens`` moves to another
    candidate (unless ``mutate_start_tokens`` is false: the sweep rule searches it) and
    ``attention_scaling`` takes a Gaussian step (a tenth of its range, snapped to
    the grid, clipped to the range), each with the same probability.

    Two adjacent factors drawn in the same call may cross, so the result is not always ordered:
    callers reject and redraw, as the reference search does.
    """
    space = search_space
    names = space.searched_names(params)
    values = [float(params[name]) for name in names]
    child = dict(params)
    strict = space.longrope2
    for j, name in enumerate(names):
        if rng.random() >= mutation_prob:
            continue
        left = values[j - 1] if j > 0 else None
        right = values[j + 1] if j + 1 < len(values) else None
        high = right if right is not None else space.upper
        if right is None and left is not None and space.last_factor_step is not None:
            high = min(high, left + space.last_factor_step)
        points = [p for p in _grid_points(space.lower if left is None else left, high, space.step)
                  if not strict or ((left is None or p > left + 1e-9) and (right is None or p < right - 1e-9))]
        if points:
            child[name] = points[int(rng.integers(len(points)))]
    if mutate_start_tokens and space.searches_start_tokens and rng.random() < mutation_prob:
        others = [c for c in space.start_token_candidates if c != params[START_TOKENS_PARAM]]
        child[START_TOKENS_PARAM] = others[int(rng.integers(len(others)))]
    if space.attention_scaling_range is not None and rng.random() < mutation_prob:
        low, high = space.attention_scaling_range
        moved = float(params[ATTENTION_SCALING_PARAM]) + rng.normal(0.0, (high - low) / 10)
        child[ATTENTION_SCALING_PARAM] = min(max(_grid_value(_grid_index(moved, space.step), space.step), low), high)
    return space.with_derived(child) if space.sweeps_critical_dim else child


def crossover(
    first: Mapping[str, Any],
    second: Mapping[str, Any],
    rng: np.random.Generator,
    crossover_prob: float,
) -> dict[str, Any]:
    """One crossover draw: ``first`` with some genes taken from ``second``.

    Each parameter of ``first`` is visited with probability ``crossover_prob`` and, when
    visited, takes ``second``'s value with probability 0.5. Every gene of the child is
    therefore its parents' gene at the same position; the child may not be monotone.
    """
    child = dict(first)
    for name in first:
        if rng.random() < crossover_prob and rng.random() < 0.5:
            child[name] = second[name]
    return child


def enqueue_seeds(study: optuna.Study, search_space: RopeSearchSpace, seeds: Sequence[RopeFactors]) -> int:
    """Enqueue ``seeds`` (usually ``search_space.seeds(geometry)``) as the first trials, once per study.

    Works for any sampler. Each seed is projected into the space with its ``to_params`` and tagged
    with the user attr ``seed`` (its method name). The projected seeds are recorded in the study
    system attr :data:`SEEDS_KEY`; a study that has it is left alone, so calling this again on a
    resumed study enqueues nothing. A seed that projects onto the parameters of an earlier seed, or
    of a trial already pending (a call that died half-way), is recorded but not enqueued again.
    Like ``Study.enqueue_trial(skip_if_exists=True)``, two processes calling it at the same
    instant may both enqueue.

    Returns:
        How many trials this call enqueued.
    """
    storage, study_id = study._storage, study._study_id
    if SEEDS_KEY in storage.get_study_system_attrs(study_id):
        return 0
    pending = [t.system_attrs.get("fixed_params") for t in study.get_trials(deepcopy=False)]
    records: list[dict[str, Any]] = []
    enqueued = 0
    for seed in seeds:
        params = search_space.to_params(seed)
        records.append({"method": seed.method, "params": params})
        # Baselines can project onto the same point (LongRoPE2's start is PI above d_c): run it once.
        if params not in pending:
            study.enqueue_trial(params, user_attrs={"seed": seed.method})
            pending.append(params)
            enqueued += 1
    storage.set_study_system_attr(study_id, SEEDS_KEY, records)
    return enqueued


class LongRoPESampler(BaseGASampler):
    """LongRoPE's evolutionary search over monotone rescale-factor vectors.

    The sampler proposes every parameter of ``search_space`` at once (relative sampling), so
    objectives should ask for them with :meth:`LongRoPESearchSpace.suggest`. It minimizes the
    objective (maximizes it for a ``"maximize"`` study); multi-objective studies are refused.

    Generations:
        Generation 0 holds ``population_size`` evaluated trials: the seeds of :func:`enqueue_seeds`
        (if the study has them), then mutants of seeds drawn from ``mutants_of`` (default
        :attr:`LongRoPESearchSpace.mutation_roots`: PI, NTK and YaRN as the LongRoPE paper; the
        NTK-shaped starts in LongRoPE2 mode, as its reference). The reference mutates its linearly
        blended YaRN seed alone (``mutants_of=("yarn-linear",)``). A flat vector such as PI is a
        narrow base: mutation keeps each gene between its neighbours, so only its end genes move.

        Every later generation holds ``num_mutants + num_crossovers`` evaluated (complete or pruned)
        trials: the first ``num_mutants`` are mutants, the rest crossover children.
        :meth:`generation_size` gives these sizes; :meth:`get_trial_generation` is BaseGASampler's
        rule (a trial joins the newest generation until it has that many evaluated trials) with the
        size taken per generation, since the base class has one size for all. Pruned trials count:
        a pruner that stops trials that could not become parents (:class:`hpo.pruning.ParentPruner`)
        stops trials that would not have bred, so with or without pruning the generations advance at the
        same trials and, unless a pruned trial would have become a parent after all, the proposals
        are the same. Failed trials do not count: a generation runs until it has its evaluated
        trials, and a failed mutant is replaced by a mutant.

    Parents:
        The parents of generation ``g`` are the best ``num_parents`` complete trials of all
        generations before ``g`` (ties go to the earlier trial). Trials that are pruned, failed,
        running, violate a constraint (``trial.set_constraint`` with a value > 0) or lack one of
        the space's parameters are never parents. Nor is a complete trial that was worse, at the
        step where a pruned trial of those generations stopped, than that pruned trial: the search
        discarded a better trial, so this one is no parent either. A pruner that only stops trials
        behind the ``num_parents``-th best (:class:`hpo.pruning.ParentPruner` at its default rank)
        thereby excludes only trials behind ``num_parents`` others at that step; a stricter one
        leaves fewer than ``num_parents`` complete trials, and this keeps the worst of them (a poor
        seed) from breeding. Parents are projected with
        ``to_params(to_factors(...))`` so that trials added by hand are in bounds and monotone.

    Operators:
        A mutant is :func:`mutate` of a random parent, redrawn until it is monotone and unseen
        (no trial of the study, of any state, has the same parameters once snapped to the
        ``step`` grid). After ``max_tries`` draws it takes the first draw that becomes unseen
        once repaired to a running maximum, and failing that (a nearly exhausted grid) it
        returns a repeat with a warning rather than stall the study. A crossover child is
        :func:`crossover` of two distinct random parents, redrawn up to ``max_tries`` times,
        then replaced by a mutant of the first of the two; with fewer than two parents every
        trial is a mutant (and its role says so).

    Start tokens by the reference's rule (``start_token_search="sweep"``):
        n_hat is then not mutated; instead each generation re-evaluates trials with other
        n_hat values, as the reference's ``try_start_token`` does (microsoft/LongRoPE, longrope
        branch, ``evolution/GeneticAlgorithm.py``). A later generation opens with the sweep of its
        best ``sweep_parents`` parents not swept before (every other candidate on each), then its
        mutants, then ``min(sweep_tries, candidates - 1)`` random other candidates on each of those
        mutants, then its crossover children; generation 0 ends with the sweep of its best
        ``sweep_parents`` trials. Each of these trials has the role :data:`START_TOKENS` and its
        base trial as parent; a slot with nothing new to try (its parents were swept already) is
        a mutant instead. A sweep trial is a parent only when it beat its base trial and every
        other sweep of that base: the reference keeps an n_hat only if it lowered the perplexity.
        :meth:`generation_size` counts the sweep slots, so they are spent from the trial budget.

    State and resume:
        Everything lives in the storage: the generation of each trial (trial system attr
        ``LongRoPESampler:generation``, set in :meth:`before_trial`), the parents of each
        generation (study system attr ``LongRoPESampler:parent:<g>``), each trial's proposal,
        role and parent trial numbers (:data:`PROPOSAL_KEY`, :data:`ROLE_KEY`,
        :data:`PARENTS_KEY`) and the seeds (:data:`SEEDS_KEY`). The random stream of a trial is
        derived from ``seed`` and the trial number alone. So a new sampler on a resumed study
        continues the generation count, and with the same ``seed`` and the same objective values
        it proposes exactly what an uninterrupted run would have. Proposals are stored when
        made, so several workers sharing a storage do not repeat each other's pending vectors.

    Enqueued trials keep their fixed parameters; parameters they do not fix, and parameters
    outside ``search_space``, come from a :class:`~optuna.samplers.RandomSampler`.

    Args:
        search_space: what is searched.
        population_size: size of generation 0, seeds included.
        num_parents: how many of the best trials breed each later generation.
        num_mutants: mutants per later generation.
        num_crossovers: crossover children per later generation.
        mutation_prob: probability that a mutation redraws a given gene.
        crossover_prob: probability that a crossover visits a given gene.
        max_tries: draws per operator before its fallback.
        seed: seed of every random choice; ``None`` draws one at construction.
        start_token_search: ``"gene"`` (n_hat mutates and crosses over like the factors) or
            ``"sweep"`` (the reference's rule, above); ``"sweep"`` needs several n_hat candidates.
        sweep_parents: parents whose n_hat is swept per generation (the reference: 5).
        sweep_tries: other n_hat values tried on each mutant (the reference: 5).
        mutants_of: methods of the seeds whose mutants fill generation 0 (``None``: the space's
            :attr:`~LongRoPESearchSpace.mutation_roots`); ignored in LongRoPE2 mode.
    """

    def __init__(
        self,
        search_space: LongRoPESearchSpace,
        *,
        population_size: int = 64,
        num_parents: int = 32,
        num_mutants: int = 16,
        num_crossovers: int = 16,
        mutation_prob: float = 0.3,
        crossover_prob: float = 0.3,
        max_tries: int = 20,
        seed: int | None = None,
        start_token_search: str = "gene",
        sweep_parents: int = 5,
        sweep_tries: int = 5,
        mutants_of: Sequence[str] | None = None,
    ) -> None:
        if population_size < 1 or num_parents < 1 or max_tries < 1:
            raise ValueError("population_size, num_parents and max_tries must be >= 1")
        if num_mutants < 0 or num_crossovers < 0 or num_mutants + num_crossovers < 1:
            raise ValueError("num_mutants and num_crossovers must be >= 0 and not both 0")
        if not (0.0 <= mutation_prob <= 1.0 and 0.0 <= crossover_prob <= 1.0):
            raise ValueError("mutation_prob and crossover_prob must be probabilities")
        if start_token_search not in START_TOKEN_SEARCHES:
            raise ValueError(f"start_token_search must be one of {', '.join(START_TOKEN_SEARCHES)}, "
                             f"got {start_token_search!r}")
        if start_token_search == "sweep" and not search_space.searches_start_tokens:
            raise ValueError("start_token_search='sweep' needs several start token candidates to sweep")
        if sweep_parents < 1 or sweep_tries < 1:
            raise ValueError("sweep_parents and sweep_tries must be >= 1")
        super().__init__(population_size=population_size)
        self._space = search_space
        self._num_parents = num_parents
        self._num_mutants = num_mutants
        self._num_crossovers = num_crossovers
        self._mutation_prob = mutation_prob
        self._crossover_prob = crossover_prob
        self._max_tries = max_tries
        self._seed = int(np.random.SeedSequence().entropy if seed is None else seed)
        self._random_sampler = RandomSampler(seed=seed)
        self._mutation_roots = (search_space.mutation_roots if mutants_of is None or search_space.longrope2
                                else tuple(mutants_of))
        self._sweep = start_token_search == "sweep"
        others = len(search_space.start_token_candidates) - 1
        self._swept_parents = min(sweep_parents, num_parents) if self._sweep else 0
        self._parent_sweeps = self._swept_parents * others
        self._sweep_tries = min(sweep_tries, others) if self._sweep else 0

    @property
    def search_space(self) -> LongRoPESearchSpace:
        """What this sampler searches."""
        return self._space

    def reseed_rng(self) -> None:
        # Proposals are keyed by (seed, trial number), so parallel copies never draw alike;
        # only the fallback sampler keeps a stream that would repeat across threads.
        self._random_sampler.reseed_rng()

    def generation_size(self, generation: int) -> int:
        """Evaluated trials that make up ``generation``: ``population_size`` for 0, else mutants + crossovers;
        plus the sweep slots with ``start_token_search="sweep"``."""
        assert self.population_size is not None
        if generation == 0:
            return self.population_size + self._parent_sweeps
        return self._parent_sweeps + self._num_mutants * (1 + self._sweep_tries) + self._num_crossovers

    def get_trial_generation(self, study: optuna.Study, trial: FrozenTrial) -> int:
        """The generation of ``trial``, assigned (and stored) on first call.

        BaseGASampler's rule with a size per generation: the trial joins the newest generation
        that has evaluated (complete or pruned) trials unless that one already has
        :meth:`generation_size` of them.
        """
        key = self._get_generation_key()
        generation = trial.system_attrs.get(key)
        if generation is not None:
            return generation
        counts: dict[int, int] = {}
        evaluated = (TrialState.COMPLETE, TrialState.PRUNED)
        for t in study._get_trials(deepcopy=False, states=evaluated, use_cache=True):
            g = t.system_attrs.get(key, -1)
            counts[g] = counts.get(g, 0) + 1
        newest = max((g for g in counts if g >= 0), default=0)
        generation = newest if counts.get(newest, 0) < self.generation_size(newest) else newest + 1
        study._storage.set_trial_system_attr(trial._trial_id, key, generation)
        return generation

    def select_parent(self, study: optuna.Study, generation: int) -> list[FrozenTrial]:
        """The best ``num_parents`` feasible complete trials of generations before ``generation``
        that no pruned trial of those generations beat (see Parents)."""
        key = self._get_generation_key()
        sign = 1.0 if study.direction == StudyDirection.MINIMIZE else -1.0
        earlier = [
            t
            for t in study._get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            if t.system_attrs.get(key, -1) < generation
        ]
        stops = [(t.last_step, sign * t.intermediate_values[t.last_step])
                 for t in earlier if t.state == TrialState.PRUNED and t.last_step is not None]

        def beaten_by_a_pruned_trial(trial: FrozenTrial) -> bool:
            values = trial.intermediate_values
            return any(step in values and sign * values[step] > value for step, value in stops)

        candidates = [
            t
            for t in earlier
            if t.state == TrialState.COMPLETE
            and all(v <= 0.0 for v in t.constraints.values())
            and self._space.has_all_params(t.params)
            and not beaten_by_a_pruned_trial(t)
        ]
        candidates = [t for t in candidates if self._kept_by_the_sweep(t, earlier, sign)]
        candidates.sort(key=lambda t: (sign * t.value, t.number))
        return candidates[: self._num_parents]

    @staticmethod
    def _kept_by_the_sweep(trial: FrozenTrial, earlier: list[FrozenTrial], sign: float) -> bool:
        """Whether a complete trial may breed under the sweep rule: a trial that re-evaluated another with
        another n_hat only when it beat that base trial and the other sweeps of it (ties: the earlier)."""
        if trial.system_attrs.get(ROLE_KEY) != START_TOKENS:
            return True
        base_number = trial.system_attrs[PARENTS_KEY][0]
        family = [t for t in earlier if t.state == TrialState.COMPLETE and (
            t.number == base_number
            or (t.system_attrs.get(ROLE_KEY) == START_TOKENS and t.system_attrs[PARENTS_KEY][0] == base_number))]
        return min(family, key=lambda t: (sign * t.value, t.number != base_number, t.number)) is trial

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._raise_error_if_multi_objective(study)
        # Enqueued seeds never reach sample_relative, yet must count towards generation 0.
        self.get_trial_generation(study, trial)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return self._space.distributions()

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if "fixed_params" in trial.system_attrs:
            return {}
        # `trial` is a snapshot from before before_trial; the storage has its generation.
        current = study._storage.get_trial(trial._trial_id)
        params = current.system_attrs.get(PROPOSAL_KEY)
        if params is None:
            proposal = self._propose(study, current)
            self._record(study, current, proposal)
            params = proposal.params
        return {name: value for name, value in params.items() if name in search_space}

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._random_sampler.sample_independent(study, trial, param_name, param_distribution)

    @staticmethod
    def _record(study: optuna.Study, trial: FrozenTrial, proposal: Proposal) -> None:
        """Store ``proposal`` on ``trial`` when made, so other workers see it and a resumed study keeps it."""
        storage = study._storage
        storage.set_trial_system_attr(trial._trial_id, PROPOSAL_KEY, proposal.params)
        storage.set_trial_system_attr(trial._trial_id, ROLE_KEY, proposal.role)
        storage.set_trial_system_attr(trial._trial_id, PARENTS_KEY, proposal.parents)
        if proposal.slot:
            storage.set_trial_system_attr(trial._trial_id, SLOT_KEY, proposal.slot)

    def _propose(self, study: optuna.Study, trial: FrozenTrial) -> Proposal:
        """Decide ``trial``'s parameters, role and parents (the class docstring's rules); nothing is written."""
        generation = self.get_trial_generation(study, trial)
        trials = study._get_trials(deepcopy=False)
        seen = {self._grid_key(p) for t in trials for p in self._known_params(t)}
        parents = self.get_parent_population(study, generation)
        role, slot, index = self._role_and_slot(trials, trial, generation, len(parents))
        variant = self._start_token_variant(study, trials, generation, parents, slot, index, seen) if slot else None
        if variant is not None:
            parent_numbers, params = variant
            return Proposal(params, START_TOKENS, parent_numbers, slot)
        rng = np.random.default_rng([self._seed, trial.number])
        parent_numbers, params = self._offspring(study, role, parents, seen, rng)
        return Proposal(params, role, parent_numbers, slot)

    def _role_and_slot(self, trials: list[FrozenTrial], trial: FrozenTrial, generation: int,
                       n_parents: int) -> tuple[str, str | None, int]:
        """``(role, sweep slot or None, index among the slots of its kind)`` of a new trial."""
        slot, index = self._sweep_slot(trials, trial, generation) if self._sweep else (None, 0)
        if self._sweep:
            role = slot if slot == CROSSOVER else MUTANT  # a sweep slot with nothing new to try is a mutant
        else:
            role = self._role(trials, trial, generation)
        # A crossover needs two parents; strict pruning can leave one (see Parents).
        return (role if n_parents >= 2 else MUTANT), slot, index

    def _offspring(self, study: optuna.Study, role: str, parents: list[FrozenTrial], seen: set,
                   rng: np.random.Generator) -> tuple[list[int], dict[str, Any]]:
        """``(parent numbers, parameters)`` of a :data:`MUTANT` or :data:`CROSSOVER` child of ``parents``
        (a mutant of the initial curve when there are none); a crossover with nothing new to give is a mutant."""
        if not parents:
            return [], self._mutant(self._initial_params(study, rng), seen, rng)
        parent_params = [self._project(t.params) for t in parents]
        if role == CROSSOVER:
            i, j = (int(k) for k in rng.choice(len(parents), size=2, replace=False))
            if self._space.sweeps_critical_dim:  # only parents of one critical dim have genes in common
                mates = [k for k, p in enumerate(parent_params) if k != i
                         and p[CRITICAL_DIM_PARAM] == parent_params[i][CRITICAL_DIM_PARAM]]
                j = int(rng.choice(mates)) if mates else i
            child = self._crossover_child(parent_params[i], parent_params[j], seen, rng) if j != i else None
            if child is not None:
                return [parents[i].number, parents[j].number], child
            return [parents[i].number], self._mutant(parent_params[i], seen, rng)
        i = int(rng.integers(len(parents)))
        return [parents[i].number], self._mutant(parent_params[i], seen, rng)

    def _sweep_slot(self, trials: list[FrozenTrial], trial: FrozenTrial, generation: int) -> tuple[str, int]:
        """With the sweep rule, ``trial``'s slot in its generation (see the class docstring) and its index
        among the slots of that kind: the live (not failed) trials before it decide its position."""
        key = self._get_generation_key()
        position = sum(1 for t in trials if t.number != trial.number and t.state != TrialState.FAIL
                       and t.system_attrs.get(key) == generation)
        if generation == 0:
            assert self.population_size is not None
            blocks = [(MUTANT, self.population_size), (PARENT_SWEEP, self._parent_sweeps)]
        else:
            blocks = [(PARENT_SWEEP, self._parent_sweeps), (MUTANT, self._num_mutants),
                      (MUTANT_SWEEP, self._num_mutants * self._sweep_tries), (CROSSOVER, self._num_crossovers)]
        for slot, size in blocks:
            if position < size:
                return slot, position
            position -= size
        return blocks[-1][0], position  # past the generation's size: only while other workers' trials run

    def _start_token_variant(self, study: optuna.Study, trials: list[FrozenTrial], generation: int,
                             parents: list[FrozenTrial], slot: str, index: int,
                             seen: set[tuple[int, ...]]) -> tuple[list[int], dict[str, Any]] | None:
        """``([base number], base's parameters with another n_hat)`` for sweep slot ``index``, or ``None``
        when the slot has nothing new to try (it is then a mutant)."""
        key = self._get_generation_key()
        candidates = self._space.start_token_candidates
        if slot == PARENT_SWEEP:
            ranked = self.select_parent(study, 1) if generation == 0 else parents
            swept = {t.system_attrs[PARENTS_KEY][0] for t in trials if t.system_attrs.get(ROLE_KEY) == START_TOKENS
                     and t.system_attrs.get(key, generation) < generation}
            pairs = [(base, value) for base in ranked[: self._swept_parents]
                     if base.number not in swept
                     for value in candidates if value != base.params[START_TOKENS_PARAM]]
            if index >= len(pairs):
                return None
            base, value = pairs[index]
            base_params = base.params
        elif slot == MUTANT_SWEEP:
            mutants = sorted((t for t in trials if t.system_attrs.get(key) == generation
                              and t.system_attrs.get(SLOT_KEY) == MUTANT and t.state != TrialState.FAIL),
                             key=lambda t: t.number)
            if index // self._sweep_tries >= len(mutants):
                return None
            base = mutants[index // self._sweep_tries]
            base_params = base.params or base.system_attrs[PROPOSAL_KEY]  # a mutant still running has no params
            others = [value for value in candidates if value != base_params[START_TOKENS_PARAM]]
            # the same draw for every slot of this base, so its tries are distinct values
            value = np.random.default_rng([self._seed, base.number, 1]).permutation(others)[index % self._sweep_tries]
        else:
            return None
        params = {**self._project(base_params), START_TOKENS_PARAM: int(value)}
        return None if self._grid_key(params) in seen else ([base.number], params)

    def _role(self, trials: list[FrozenTrial], trial: FrozenTrial, generation: int) -> str:
        """Mutant until the generation has ``num_mutants`` live (not failed) mutants, crossover child after."""
        key = self._get_generation_key()
        live_mutants = sum(
            1
            for t in trials
            if t.number != trial.number
            and t.state != TrialState.FAIL
            and t.system_attrs.get(key) == generation
            and t.system_attrs.get(ROLE_KEY) == MUTANT
        )
        return MUTANT if live_mutants < self._num_mutants or self._num_crossovers == 0 else CROSSOVER

    def _mutant(self, parent: dict[str, Any], seen: set[tuple[int, ...]], rng: np.random.Generator) -> dict[str, Any]:
        draws = []
        for _ in range(self._max_tries):
            child = mutate(parent, self._space, rng, self._mutation_prob, mutate_start_tokens=not self._sweep)
            if self._is_new_and_monotone(child, seen):
                return child
            draws.append(self._project(child))
        for child in draws:
            if self._grid_key(child) not in seen:
                return child
        warnings.warn(
            f"LongRoPESampler: no unseen mutant in {self._max_tries} draws (the grid near this parent is "
            "exhausted); proposing a repeat",
            stacklevel=2,
        )
        return draws[-1]

    def _crossover_child(
        self, first: dict[str, Any], second: dict[str, Any], seen: set[tuple[int, ...]], rng: np.random.Generator
    ) -> dict[str, Any] | None:
        for _ in range(self._max_tries):
            child = crossover(first, second, rng, self._crossover_prob)
            if self._space.sweeps_critical_dim:
                child = self._space.with_derived(child)
            if self._is_new_and_monotone(child, seen):
                return child
        return None

    def _is_new_and_monotone(self, params: dict[str, Any], seen: set[tuple[int, ...]]) -> bool:
        factors = [params[name] for name in self._space.factor_names]
        return self._space.is_increasing(factors) and self._grid_key(params) not in seen

    def _project(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` clamped into bounds and made monotone (:meth:`LongRoPESearchSpace.to_params`)."""
        return self._space.to_params(self._space.to_factors(params))

    def _grid_key(self, params: Mapping[str, Any]) -> tuple[int, ...]:
        step = self._space.step
        key = [_grid_index(params[name], step) for name in self._space.factor_names]
        if self._space.searches_start_tokens:
            key.append(int(params[START_TOKENS_PARAM]))
        if self._space.searches_attention_scaling:
            key.append(_grid_index(params[ATTENTION_SCALING_PARAM], step))
        if self._space.sweeps_critical_dim:
            key.append(int(params[CRITICAL_DIM_PARAM]))
        return tuple(key)

    def _known_params(self, trial: FrozenTrial) -> list[Mapping[str, Any]]:
        """Every full parameter set ``trial`` stands for: evaluated, enqueued or proposed."""
        candidates = (trial.params, trial.system_attrs.get("fixed_params"), trial.system_attrs.get(PROPOSAL_KEY))
        return [p for p in candidates if p and self._space.has_all_params(p)]

    def _initial_params(self, study: optuna.Study, rng: np.random.Generator) -> dict[str, Any]:
        """The vector whose mutant fills a place of generation 0 (and of any generation left without
        parents): a seed of ``mutants_of`` drawn at random, else the first seed, else a linear ramp
        from ``min_factor`` to ``s`` when there are no seeds."""
        seeds = study._storage.get_study_system_attrs(study._study_id).get(SEEDS_KEY, [])
        roots = [record for record in seeds if record["method"] in self._mutation_roots] or seeds[:1]
        if roots:
            # one root draws nothing, so plain LongRoPE studies keep the random stream they always had
            root = roots[int(rng.integers(len(roots)))] if len(roots) > 1 else roots[0]
            return self._project(root["params"])
        space = self._space
        top = min(space.scale, space.upper)
        count = len(space.factor_names)
        params: dict[str, Any] = {
            name: space.lower + (top - space.lower) * (j + 1) / count
            for j, name in enumerate(space.factor_names)
        }
        params[START_TOKENS_PARAM] = space.start_token_candidates[0]
        params[ATTENTION_SCALING_PARAM] = space.default_attention_scaling
        return self._project(params)
