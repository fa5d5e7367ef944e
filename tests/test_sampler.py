"""LongRoPESampler and LongRoPESearchSpace on a cheap synthetic objective (no model).

The objective is the squared distance of the full factor vector to a hidden monotone
target plus small penalties on start tokens and attention scaling, so the search
has something to find and every evaluation takes microseconds.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any

import numpy as np
import optuna
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hpo.records import GENERATION_KEY, SEEDS_KEY
from hpo.sampler import PARENTS_KEY, ROLE_KEY, LongRoPESampler, crossover, enqueue_seeds, mutate
from hpo.search_space import ATTENTION_SCALING_PARAM, START_TOKENS_PARAM, LongRoPESearchSpace
from models.baselines import longrope_attention_scaling
from models.rope import RopeFactors, RopeGeometry
from studies import SEED_METHODS

optuna.logging.set_verbosity(optuna.logging.WARNING)

GEOMETRY = RopeGeometry(rotary_dim=16, base=10000.0, original_length=1000)
SPACE = LongRoPESearchSpace(
    num_factors=8,
    original_length=1000,
    target_length=4000,
    start_token_candidates=(0, 2, 4),
    attention_scaling_range=(1.0, 1.3),
)
TARGET = np.array([1.0, 1.2, 1.5, 2.2, 3.0, 3.5, 4.2, 4.6])


def objective(trial: optuna.Trial, space: LongRoPESearchSpace = SPACE) -> float:
    factors = space.suggest(trial)
    distance = float(np.sum((np.array(factors.rescale_factors) - TARGET) ** 2))
    return distance + abs(factors.attention_scaling - 1.15) + 0.01 * factors.start_tokens


def make_sampler(space: LongRoPESearchSpace = SPACE, seed: int = 0) -> LongRoPESampler:
    return LongRoPESampler(space, population_size=8, num_parents=4, num_mutants=2, num_crossovers=2, seed=seed)


def run(n_trials: int, seed: int = 0, storage: str | None = None) -> optuna.Study:
    study = optuna.create_study(study_name="s", storage=storage, sampler=make_sampler(seed=seed), load_if_exists=True)
    enqueue_seeds(study, SPACE, SPACE.seeds(GEOMETRY))
    study.optimize(objective, n_trials=n_trials)
    return study


def generation(trial: optuna.trial.FrozenTrial) -> int:
    return trial.system_attrs[GENERATION_KEY]


def study_attrs(study: optuna.Study) -> dict[str, Any]:
    return study._storage.get_study_system_attrs(study._study_id)


def grid_key(params: dict[str, Any], space: LongRoPESearchSpace = SPACE) -> tuple[int, ...]:
    key = [round(params[name] / space.step) for name in space.factor_names]
    return (*key, params[START_TOKENS_PARAM], round(params[ATTENTION_SCALING_PARAM] / space.step))


@pytest.fixture(scope="module")
def study() -> optuna.Study:
    return run(150)


@st.composite
def monotone_params(draw: st.DrawFn, space: LongRoPESearchSpace = SPACE) -> dict[str, Any]:
    bounds = st.floats(space.min_factor, space.upper, allow_nan=False)
    values = sorted(draw(st.lists(bounds, min_size=len(space.factor_names), max_size=len(space.factor_names))))
    params: dict[str, Any] = dict(zip(space.factor_names, values, strict=True))
    params[START_TOKENS_PARAM] = draw(st.sampled_from(space.start_token_candidates))
    assert space.attention_scaling_range is not None
    params[ATTENTION_SCALING_PARAM] = draw(st.floats(*space.attention_scaling_range))
    return params


# --- search space -----------------------------------------------------------------------


def test_distributions_and_defaults() -> None:
    space = LongRoPESearchSpace(num_factors=32, original_length=8192, target_length=16384)
    assert space.max_factor == 3.0
    names = list(space.distributions())
    assert names == [f"factor_{i:02d}" for i in range(32)] + [START_TOKENS_PARAM]
    fixed = LongRoPESearchSpace(num_factors=4, original_length=8192, target_length=16384, start_token_candidates=(0,))
    assert list(fixed.distributions()) == ["factor_00", "factor_01", "factor_02", "factor_03"]
    factors = fixed.to_factors({f"factor_{i:02d}": 1.5 for i in range(4)})
    assert factors.start_tokens == 0
    assert factors.attention_scaling == pytest.approx(longrope_attention_scaling(2.0, 8192))


@given(st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=8, max_size=8), st.integers(0, 100))
def test_to_params_clamps_and_keeps_monotone(values: list[float], start_tokens: int) -> None:
    factors = RopeFactors(
        rescale_factors=tuple(max(v, 1.0) for v in values),
        original_length=1000,
        target_length=4000,
        start_tokens=start_tokens,
        attention_scaling=2.0,
    )
    params = SPACE.to_params(factors)
    vector = [params[name] for name in SPACE.factor_names]
    assert SPACE.is_increasing(vector)
    assert all(SPACE.min_factor <= v <= SPACE.upper for v in vector)
    assert params[START_TOKENS_PARAM] in SPACE.start_token_candidates
    assert params[ATTENTION_SCALING_PARAM] == 1.3


@given(monotone_params())
def test_params_round_trip(params: dict[str, Any]) -> None:
    assert SPACE.to_params(SPACE.to_factors(params)) == params


def test_seeds_are_the_baselines() -> None:
    # studies.SEED_METHODS is what a preset's mutants_of may name: the same methods, in the same order
    assert tuple(seed.method for seed in SPACE.seeds(GEOMETRY)) == SEED_METHODS == ("pi", "ntk", "yarn", "yarn-linear")
    with pytest.raises(ValueError, match="geometry"):
        SPACE.seeds(RopeGeometry(rotary_dim=32, base=10000.0, original_length=1000))


# --- operators --------------------------------------------------------------------------


@given(monotone_params(), monotone_params(), st.integers(0, 2**32 - 1), st.floats(0.0, 1.0))
def test_crossover_takes_genes_only_from_its_parents(
    first: dict[str, Any], second: dict[str, Any], seed: int, prob: float
) -> None:
    child = crossover(first, second, np.random.default_rng(seed), prob)
    assert child.keys() == first.keys()
    assert all(child[name] in (first[name], second[name]) for name in child)


@given(monotone_params(), st.integers(0, 2**32 - 1))
def test_mutation_stays_between_the_parent_neighbours_on_the_grid(parent: dict[str, Any], seed: int) -> None:
    child = mutate(parent, SPACE, np.random.default_rng(seed), 0.5)
    old = [parent[name] for name in SPACE.factor_names]
    for j, name in enumerate(SPACE.factor_names):
        if child[name] == parent[name]:
            continue
        low = old[j - 1] if j > 0 else SPACE.min_factor
        high = old[j + 1] if j + 1 < len(old) else SPACE.upper
        assert low <= child[name] <= high
        assert math.isclose(child[name] / SPACE.step, round(child[name] / SPACE.step), abs_tol=1e-6)
    assert child[START_TOKENS_PARAM] in SPACE.start_token_candidates
    assert 1.0 <= child[ATTENTION_SCALING_PARAM] <= 1.3


# --- the search -------------------------------------------------------------------------


def test_every_proposal_is_monotone_in_bounds_and_new(study: optuna.Study) -> None:
    keys = set()
    for trial in study.trials:
        factors = SPACE.to_factors(trial.params)
        assert factors.num_factors == SPACE.num_factors
        assert SPACE.is_increasing(factors.rescale_factors)
        assert all(SPACE.min_factor <= f <= SPACE.upper for f in factors.rescale_factors)
        keys.add(grid_key(trial.params))
    assert len(keys) == len(study.trials)


def test_generations_have_the_configured_sizes_and_roles(study: optuna.Study) -> None:
    by_generation: dict[int, list[optuna.trial.FrozenTrial]] = {}
    for trial in study.trials:
        by_generation.setdefault(generation(trial), []).append(trial)
    assert len(by_generation[0]) == 8
    assert [t.user_attrs.get("seed") for t in by_generation[0][:3]] == ["pi", "ntk", "yarn"]
    last = max(by_generation)
    assert last > 20
    for g in range(1, last):  # the last generation may be incomplete
        assert [t.system_attrs[ROLE_KEY] for t in by_generation[g]] == ["mutant"] * 2 + ["crossover"] * 2
    assert [generation(t) for t in study.trials] == sorted(generation(t) for t in study.trials)


def test_search_beats_the_best_seed(study: optuna.Study) -> None:
    best_seed = min(t.value for t in study.trials if "seed" in t.user_attrs)
    assert study.best_value < 0.25 * best_seed


def test_same_seed_same_trials() -> None:
    first, second, other = run(60, seed=3), run(60, seed=3), run(60, seed=4)
    assert [t.params for t in first.trials] == [t.params for t in second.trials]
    assert [t.params for t in first.trials] != [t.params for t in other.trials]


def test_resume_continues_generations_and_matches_an_uninterrupted_run(tmp_path: Any) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    # 18 trials stop half-way through generation 3 (8 + 4 + 4 + 2 complete trials).
    before = run(18, storage=storage).trials
    after = run(18, storage=storage).trials  # a new sampler instance on the same storage
    assert [generation(t) for t in before][-2:] == [3, 3]
    assert [generation(t) for t in after][18:] == [3, 3] + [4] * 4 + [5] * 4 + [6] * 4 + [7] * 4
    assert sum(1 for t in after if "seed" in t.user_attrs) == 4
    uninterrupted = run(36).trials
    assert [t.params for t in after] == [t.params for t in uninterrupted]


def test_pruned_failed_and_infeasible_trials_are_never_parents() -> None:
    def flaky(trial: optuna.Trial) -> float:
        value = objective(trial)
        if trial.number % 5 == 3:
            raise optuna.TrialPruned
        if trial.number % 7 == 2:
            raise ValueError("synthetic failure")
        trial.set_constraint("budget", 1.0 if trial.number % 6 == 1 else 0.0)
        # Violating trials get the best values, so they would be picked if not excluded.
        return -1.0 if trial.number % 6 == 1 else value

    study = optuna.create_study(sampler=make_sampler())
    enqueue_seeds(study, SPACE, SPACE.seeds(GEOMETRY))
    study.optimize(flaky, n_trials=80, catch=(ValueError,))
    trials = study.trials
    allowed = {
        t.number
        for t in trials
        if t.state == optuna.trial.TrialState.COMPLETE and all(v <= 0 for v in t.constraints.values())
    }
    assert {t.state for t in trials} >= {optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL}
    parents = [n for t in trials for n in t.system_attrs.get(PARENTS_KEY, [])]
    assert parents and set(parents) <= allowed
    id_to_number = {t._trial_id: t.number for t in trials}
    cached = [
        id_to_number[i]
        for key, ids in study_attrs(study).items()
        if key.startswith("LongRoPESampler:parent:")
        for i in ids
    ]
    assert cached and set(cached) <= allowed


def test_seeds_are_enqueued_once() -> None:
    study = optuna.create_study(sampler=make_sampler())
    assert enqueue_seeds(study, SPACE, SPACE.seeds(GEOMETRY)) == 4
    assert enqueue_seeds(study, SPACE, SPACE.seeds(GEOMETRY)) == 0
    assert len(study.trials) == 4
    assert [record["method"] for record in study_attrs(study)[SEEDS_KEY]] == ["pi", "ntk", "yarn", "yarn-linear"]


LLAMA3 = RopeGeometry(rotary_dim=128, base=500000.0, original_length=8192)


def longrope2_study(space: LongRoPESearchSpace, geometry: RopeGeometry, n_trials: int) -> optuna.Study:
    sampler = LongRoPESampler(space, population_size=12, num_parents=4, num_mutants=2, num_crossovers=2, seed=0)
    study = optuna.create_study(sampler=sampler)
    enqueue_seeds(study, space, space.seeds(geometry))
    # a synthetic fitness with a minimum inside LongRoPE2's space: factors near 1.3 s from the critical dim on
    target = 1.3 * space.scale

    def fitness(trial: optuna.Trial) -> float:
        factors = space.suggest(trial)
        return float(sum((f - target) ** 2 for f in factors.rescale_factors[space.critical_dim:]))

    study.optimize(fitness, n_trials=n_trials)
    return study


def test_longrope2_mode_derives_the_dims_below_the_critical_dim() -> None:
    space = LongRoPESearchSpace(num_factors=8, original_length=1000, target_length=4000, critical_dim=3)
    assert space.factor_names == tuple(f"factor_{i:02d}" for i in range(3, 8))
    study = longrope2_study(space, GEOMETRY, 40)
    for trial in study.trials:
        assert set(trial.params) == {*space.factor_names, START_TOKENS_PARAM}
        factors = space.to_factors(trial.params).rescale_factors
        assert factors[:3] == pytest.approx([factors[3] ** (i / 3) for i in range(3)])
        assert space.is_increasing(factors)


def test_longrope2_space_is_strictly_increasing_within_s_and_length_scale() -> None:
    """LongRoPE2's space (reference dim_mono.py): from d_c on, factors in [s, length_scale], strictly
    increasing, the last at most 4 above its neighbour; generation 0 = NTK-shaped starts >= s + mutants."""
    space = LongRoPESearchSpace(num_factors=64, original_length=8192, target_length=131072, critical_dim=34,
                                max_factor=64.0, start_token_candidates=(0,))
    assert (space.lower, space.upper, space.scale) == (16.0, 64.0, 16.0)
    seeds = space.seeds(LLAMA3)
    assert [seed.method for seed in seeds] == ["longrope2-init"] * 8
    critical_factors = [seed.rescale_factors[34] for seed in seeds]
    assert critical_factors[0] == 16.0 and critical_factors == sorted(critical_factors)
    study = longrope2_study(space, LLAMA3, 60)
    seeded = [t for t in study.trials if "seed" in t.user_attrs]
    assert len(seeded) == 8
    for trial in study.trials:
        vector = [trial.params[name] for name in space.factor_names]
        assert all(16.0 <= v <= 64.0 for v in vector), trial.number
        assert all(a < b for a, b in itertools.pairwise(vector)), trial.number
        assert vector[-1] - vector[-2] <= 4.0 + 1e-9, trial.number
        assert space.is_increasing(space.to_factors(trial.params).rescale_factors)
    # generation 0's other trials are mutants of the NTK-shaped starts (no YaRN in this space)
    roots = [record["params"] for record in study_attrs(study)[SEEDS_KEY]]
    first_mutant = study.trials[8].params
    assert any(sum(first_mutant[n] == root[n] for n in space.factor_names) >= len(space.factor_names) // 2
               for root in roots)
    # the plain LongRoPE bound s + 1 = 17 could not have reached the optimum near 1.3 s = 20.8
    assert min(t.value for t in study.trials) < min(t.value for t in seeded)


def test_to_params_repairs_vectors_into_longrope2_space() -> None:
    space = LongRoPESearchSpace(num_factors=8, original_length=1000, target_length=4000, critical_dim=3,
                                max_factor=6.0, start_token_candidates=(0,))
    wild = RopeFactors((1.0, 1.0, 2.0, 3.0, 3.0, 9.0, 9.0, 9.0), 1000, 4000)
    vector = list(space.to_params(wild).values())
    assert vector == pytest.approx([4.0, 4.01, 5.98, 5.99, 6.0])
    with pytest.raises(ValueError, match="do not fit"):
        LongRoPESearchSpace(num_factors=8, original_length=1000, target_length=4000, critical_dim=3,
                            max_factor=4.02, start_token_candidates=(0,))


def test_exhausted_grid_proposes_a_repeat_with_a_warning() -> None:
    # 2 factors on {1, 1.5, 2}: only 6 monotone vectors exist.
    space = LongRoPESearchSpace(
        num_factors=2, original_length=100, target_length=100, step=0.5, start_token_candidates=(0,)
    )
    sampler = LongRoPESampler(space, population_size=4, num_parents=2, num_mutants=1, num_crossovers=1, max_tries=5)
    study = optuna.create_study(sampler=sampler)
    with pytest.warns(UserWarning, match="exhausted"):
        study.optimize(lambda trial: sum(space.suggest(trial).rescale_factors), n_trials=10)
    assert len({tuple(t.params.values()) for t in study.trials}) <= 6


def test_other_params_come_from_the_random_fallback() -> None:
    def with_extra(trial: optuna.Trial) -> float:
        return objective(trial) + trial.suggest_float("extra", 0.0, 1.0)

    study = optuna.create_study(sampler=make_sampler())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning about params sampled outside the relative space
        study.optimize(with_extra, n_trials=12)
    assert len({t.params["extra"] for t in study.trials}) == 12


def test_multi_objective_studies_are_refused() -> None:
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=make_sampler())
    with pytest.raises(ValueError, match="multi-objective"):
        study.ask()


def test_a_complete_trial_that_a_pruned_trial_beat_is_not_a_parent() -> None:
    """Strict pruning leaves few complete trials; one worse than a discarded trial must not breed."""
    study = optuna.create_study(sampler=make_sampler())
    params = SPACE.to_params(SPACE.seeds(GEOMETRY)[0])
    distributions = SPACE.distributions()

    def add(state: optuna.trial.TrialState, values: dict[int, float], value: float | None) -> None:
        study.add_trial(optuna.trial.create_trial(
            state=state, value=value, params=params, distributions=distributions, intermediate_values=values,
            system_attrs={GENERATION_KEY: 0}))

    add(optuna.trial.TrialState.COMPLETE, {1: 50.0, 2: 52.0}, 52.0)  # a poor seed
    add(optuna.trial.TrialState.COMPLETE, {1: 20.0, 2: 21.0}, 21.0)
    add(optuna.trial.TrialState.COMPLETE, {1: 30.0, 2: 31.0}, 31.0)
    add(optuna.trial.TrialState.PRUNED, {1: 25.0}, 25.0)  # stopped at step 1, ahead of trials 0 and 2 there
    parents = study.sampler.select_parent(study, generation=1)
    assert [t.number for t in parents] == [1]


# --- start tokens by the reference's sweep rule ---------------------------------------------


def test_the_sweep_rule_keeps_an_n_hat_only_when_it_lowered_the_value() -> None:
    """start_token_search="sweep": generations hold the sweeps of their best parents and of their mutants
    (spent from the budget); a sweep trial breeds only when it beat its base trial and its other sweeps."""
    space = LongRoPESearchSpace(num_factors=8, original_length=1000, target_length=4000,
                                start_token_candidates=(0, 2, 4, 8))
    sampler = LongRoPESampler(space, population_size=8, num_parents=4, num_mutants=2, num_crossovers=2, seed=0,
                              start_token_search="sweep", sweep_parents=2, sweep_tries=2)
    assert [sampler.generation_size(g) for g in (0, 1)] == [8 + 2 * 3, 2 * 3 + 2 * (1 + 2) + 2]
    study = optuna.create_study(sampler=sampler)
    enqueue_seeds(study, space, space.seeds(GEOMETRY))

    def fitness(trial: optuna.Trial) -> float:  # n_hat = 4 is best, 0 worst
        factors = space.suggest(trial)
        distance = float(np.sum((np.array(factors.rescale_factors) - TARGET) ** 2))
        return distance + 0.5 * abs(factors.start_tokens - 4) / 4

    study.optimize(fitness, n_trials=14 + 3 * 14)
    by_number = {t.number: t for t in study.trials}
    sweeps = [t for t in study.trials if t.system_attrs.get(ROLE_KEY) == "start-tokens"]
    assert sweeps
    for trial in sweeps:  # same factors as the base trial, another n_hat
        base = by_number[trial.system_attrs[PARENTS_KEY][0]]
        assert trial.params[START_TOKENS_PARAM] != base.params[START_TOKENS_PARAM]
        assert all(trial.params[n] == pytest.approx(base.params[n]) for n in space.factor_names)
    for trial in study.trials:  # mutation leaves n_hat alone: only the sweep changes it
        if trial.system_attrs.get(ROLE_KEY) == "mutant" and trial.system_attrs.get(PARENTS_KEY):
            parent = by_number[trial.system_attrs[PARENTS_KEY][0]]
            assert trial.params[START_TOKENS_PARAM] == parent.params[START_TOKENS_PARAM]
    id_to_trial = {t._trial_id: t for t in study.trials}
    parents = [id_to_trial[i] for key, ids in study_attrs(study).items()
               if key.startswith("LongRoPESampler:parent:") for i in ids]
    kept = [t for t in parents if t.system_attrs.get(ROLE_KEY) == "start-tokens"]
    assert kept, "some sweep lowered the value and bred"
    for trial in kept:
        base_number = trial.system_attrs[PARENTS_KEY][0]
        siblings = [t for t in sweeps if t.system_attrs[PARENTS_KEY][0] == base_number and t.value is not None]
        assert trial.value < by_number[base_number].value
        assert trial.value <= min(t.value for t in siblings)
    discarded = [t for t in sweeps
                 if t.value is not None and t.value >= by_number[t.system_attrs[PARENTS_KEY][0]].value]
    assert discarded and not any(t in parents for t in discarded)


def test_the_sweep_rule_needs_start_token_candidates() -> None:
    with pytest.raises(ValueError, match="several start token candidates"):
        LongRoPESampler(LongRoPESearchSpace(num_factors=8, original_length=1000, target_length=4000,
                                            start_token_candidates=(0,)), start_token_search="sweep")


def test_the_generation_key_readers_use_is_the_samplers():
    assert LongRoPESampler._get_generation_key() == GENERATION_KEY
