"""Optuna's samplers as a choice (``[search] sampler``): the monotone-curve space alone, then the tiny preset."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from hypothesis import given
from hypothesis import strategies as st
from optuna.trial import TrialState

from dashboards.report import main as report_main
from hpo import study as study_module
from hpo.curve_space import (
    MonotoneCurveSpace,
    cumulative_shares,
    curve_factors,
    curve_shares,
    knot_param_name,
    knot_positions,
)
from hpo.early_stopping import stopper
from hpo.export import main as export_main
from hpo.hybrid_sampler import HybridSampler
from hpo.records import search_space_from_record, trial_generation
from hpo.run import main
from hpo.search_space import ATTENTION_SCALING_PARAM, START_TOKENS_PARAM, LongRoPESearchSpace
from hpo.study import CURVE_SAMPLERS, TrialSeededSampler, sampler_for
from models.baselines import linear_interpolation, ntk_aware
from models.rope import RopeFactors, RopeGeometry
from studies import PresetError, load_preset

GEOMETRY = RopeGeometry(rotary_dim=16, base=10000.0, original_length=1000)
SPACE = MonotoneCurveSpace(num_factors=8, original_length=1000, target_length=4000, start_token_candidates=(0, 2, 4),
                           attention_scaling_range=(1.0, 1.3))


@st.composite
def curves(draw: st.DrawFn) -> tuple[list[float], int, float]:
    """Knot shares, a number of rotary pairs that holds the knots, and a largest factor."""
    knots = draw(st.integers(2, 8))
    shares = draw(st.lists(st.floats(0.0, 1.0), min_size=knots, max_size=knots))
    return shares, draw(st.integers(knots, 64)), draw(st.floats(1.001, 200.0))


@given(curves())
def test_every_point_of_the_unit_cube_is_a_monotone_curve_within_bounds(curve) -> None:
    shares, num_factors, max_factor = curve
    factors = curve_factors(shares, num_factors, max_factor)
    assert len(factors) == num_factors
    assert all(1.0 <= f <= max_factor for f in factors)
    assert all(a <= b for a, b in zip(factors, factors[1:], strict=False))


@given(curves())
def test_the_knots_carry_the_cumulative_shares_of_log_max_factor(curve) -> None:
    shares, num_factors, max_factor = curve
    factors = curve_factors(shares, num_factors, max_factor)
    heights = cumulative_shares(shares)
    for pair, height in zip(knot_positions(num_factors, len(shares)), heights, strict=True):
        assert math.log(factors[pair]) == pytest.approx(height * math.log(max_factor), abs=1e-9)


@given(curves())
def test_projection_round_trips_the_curves_of_the_family(curve) -> None:
    shares, num_factors, max_factor = curve
    factors = curve_factors(shares, num_factors, max_factor)
    projected = curve_shares(factors, len(shares), max_factor)
    assert all(0.0 <= z <= 1.0 for z in projected)
    assert curve_factors(projected, num_factors, max_factor) == pytest.approx(factors, rel=1e-9)


@given(st.lists(st.floats(1.0, 1e3), min_size=8, max_size=8), st.integers(0, 100), st.floats(0.1, 3.0))
def test_any_factor_set_projects_into_the_distributions(values, start_tokens, scaling) -> None:
    factors = RopeFactors(tuple(values), 1000, 4000, start_tokens=start_tokens, attention_scaling=scaling)
    params = SPACE.to_params(factors)
    for name, distribution in SPACE.distributions().items():
        assert distribution._contains(distribution.to_internal_repr(params[name])), name


def test_knot_positions_are_distinct_and_span_the_pairs() -> None:
    assert knot_positions(8, 4) == (0, 2, 5, 7)
    for num_factors in range(2, 65):
        for knots in range(2, num_factors + 1):
            positions = knot_positions(num_factors, knots)
            assert positions[0] == 0 and positions[-1] == num_factors - 1
            assert all(a < b for a, b in zip(positions, positions[1:], strict=False))
    with pytest.raises(ValueError, match="needs 2 to 8 knots"):
        MonotoneCurveSpace(num_factors=8, original_length=1000, target_length=4000, knots=9)


def test_distributions_and_defaults() -> None:
    assert list(SPACE.distributions()) == [*(knot_param_name(k) for k in range(4)), START_TOKENS_PARAM,
                                           ATTENTION_SCALING_PARAM]
    assert SPACE.max_factor == 5.0  # s + 1, as LongRoPE's space
    fixed = MonotoneCurveSpace(num_factors=8, original_length=1000, target_length=4000, start_token_candidates=(0,))
    factors = fixed.to_factors({knot_param_name(k): 0.0 for k in range(4)})
    assert factors.rescale_factors == (1.0,) * 8 and factors.start_tokens == 0
    assert factors.attention_scaling == fixed.default_attention_scaling
    with pytest.raises(ValueError, match="params lack curve_knot_3"):
        fixed.to_factors({knot_param_name(k): 0.0 for k in range(3)})


def test_pi_and_ntk_are_in_the_family_and_every_seed_projects() -> None:
    for seed in (linear_interpolation(GEOMETRY, 4000), ntk_aware(GEOMETRY, 4000)):
        found = SPACE.to_factors(SPACE.to_params(seed))
        assert found.rescale_factors == pytest.approx(seed.rescale_factors, rel=1e-9), seed.method
    assert [seed.method for seed in SPACE.seeds(GEOMETRY)] == ["pi", "ntk", "yarn", "yarn-linear"]


def test_records_read_back_either_space_by_kind() -> None:
    assert search_space_from_record(SPACE.to_record()) == SPACE
    longrope = LongRoPESearchSpace(num_factors=8, original_length=1000, target_length=4000)
    record = longrope.to_record()
    assert record["kind"] == "longrope" and search_space_from_record(record) == longrope
    record.pop("kind")  # recorded before there were several kinds
    assert search_space_from_record(record) == longrope


def synthetic_value(trial: optuna.Trial) -> float:
    factors = SPACE.suggest(trial)
    return sum((f - 2.0) ** 2 for f in factors.rescale_factors) + factors.start_tokens / 10


@pytest.mark.parametrize("sampler", sorted(CURVE_SAMPLERS))
def test_a_seed_repeats_a_run_and_processes_sharing_a_study_draw_apart(sampler) -> None:
    def run(study: optuna.Study) -> list[dict]:
        study.optimize(synthetic_value, n_trials=12)
        return [t.params for t in study.trials]

    first, second = (run(optuna.create_study(sampler=TrialSeededSampler(CURVE_SAMPLERS[sampler], 0)))
                     for _ in range(2))
    assert first == second
    # two processes with the same seed on one study: each trial is asked by the one whose turn it is
    shared = optuna.create_study(sampler=TrialSeededSampler(CURVE_SAMPLERS[sampler], 0))
    other = optuna.load_study(study_name=shared.study_name, storage=shared._storage,
                              sampler=TrialSeededSampler(CURVE_SAMPLERS[sampler], 0))
    for number in range(12):
        (shared if number % 2 else other).optimize(synthetic_value, n_trials=1)
    assert len({tuple(sorted(t.params.items())) for t in shared.trials}) == 12


def test_the_longrope_samplers_own_rules_are_off_with_a_warning_for_the_others(caplog) -> None:
    preset = load_preset("llama2_16k").replace(search__sampler="tpe")  # a paper preset: early stop, n_hat sweep
    assert preset.search.early_stop_generations == 20 and preset.search.start_token_search == "sweep"
    with caplog.at_level(logging.WARNING):
        assert stopper(preset.search) is None
        assert isinstance(sampler_for(preset, SPACE), TrialSeededSampler)
    assert "early_stop_generations is ignored" in caplog.text and "'sweep' (the longrope sampler's rule) is ignored" \
        in caplog.text
    assert stopper(load_preset("llama2_16k").search) is not None
    with pytest.raises(PresetError, match="critical_dim .LongRoPE2. needs sampler = 'longrope'"):
        load_preset("llama3_128k").replace(search__sampler="gp")


# ---------------------------------------------------------------------------------------------------------------
# The tiny preset end to end


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpo.run", *args], capture_output=True, text=True, timeout=600)


def load_study(out_dir, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{out_dir / 'study.db'}")


@pytest.mark.parametrize("sampler", ["tpe", "cmaes", "gp"])
def test_tiny_study_with_an_optuna_sampler_runs_exports_and_resumes(tmp_path, sampler) -> None:
    result = run_cli("--study", "tiny", "--sampler", sampler, "--out", str(tmp_path), "--n-trials", "10", "--quiet")
    assert result.returncode == 0, result.stderr
    study = load_study(tmp_path)
    before = study.trials
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in before) == 10
    assert [t.user_attrs.get("seed") for t in before[:4]] == ["pi", "ntk", "yarn", "yarn-linear"]
    assert study.user_attrs["search_space"]["kind"] == "monotone-curve"
    factors = RopeFactors.load(tmp_path / "best_factors.json")
    assert factors.metadata["trial"] == study.best_trial.number
    assert factors.metadata["searched_perplexity"] == pytest.approx(study.best_value)
    assert factors.rescale_factors == MonotoneCurveSpace.from_record(
        study.user_attrs["search_space"]).to_factors(study.best_trial.params).rescale_factors

    result = run_cli("--study", "tiny", "--sampler", sampler, "--out", str(tmp_path), "--n-trials", "13", "--quiet")
    assert result.returncode == 0, result.stderr
    resumed = load_study(tmp_path).trials
    assert len(resumed) == 13 and all(t.state == TrialState.COMPLETE for t in resumed)
    assert [t.params for t in resumed[:10]] == [t.params for t in before]  # kept, continued
    assert len({tuple(sorted(t.params.items())) for t in resumed}) == 13  # new proposals, not the seeds again


def test_a_study_cannot_be_resumed_in_the_other_space(tmp_path, capsys) -> None:
    assert main(["--study", "tiny", "--sampler", "tpe", "--out", str(tmp_path), "--n-trials", "5", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["--study", "tiny", "--out", str(tmp_path), "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "search space kind = 'monotone-curve', not 'longrope'" in error and error.count("\n") == 1
    # a sampler of the same space continues it
    assert main(["--study", "tiny", "--sampler", "cmaes", "--out", str(tmp_path), "--n-trials", "6", "--quiet"]) == 0
    assert len(load_study(tmp_path).trials) == 6
    # the readers take the curve space from the records: export and report work unchanged
    assert export_main(["--study", "tiny", "--out", str(tmp_path), "--to", str(tmp_path / "model")]) == 0
    exported = json.loads((tmp_path / "model" / "config.json").read_text())["rope_parameters"]
    assert exported["long_factor"] == list(RopeFactors.load(tmp_path / "best_factors.json").rescale_factors)
    assert report_main(["--study", "tiny", "--out", str(tmp_path), "--html", str(tmp_path / "report.html")]) == 0


@pytest.mark.parametrize("sampler", ["tpe", "hybrid"])
def test_tpe_prunes_with_the_parent_pruner(tmp_path, sampler) -> None:
    preset = tmp_path / "tiny_tpe_pruning.toml"
    preset.write_text(
        'target_length = 256\n[model]\nname = "tiny-random-llama"\ndtype = "float32"\n'
        "[data]\nsamples = 3\nheldout_samples = 1\n"
        f'[search]\nsampler = "{sampler}"\nn_trials = 14\npopulation = 6\nparents = 3\nmutants = 2\n'
        "crossovers = 2\nhand_made_seeds = false\nstart_tokens = [0, 2, 4]\n"
        "attention_scaling = [1.0, 1.3]\npruning = true\npruning_margin = 0.0\n"
    )
    assert main(["--study", str(preset), "--out", str(tmp_path), "--quiet"]) == 0
    trials = load_study(tmp_path, "tiny_tpe_pruning").trials
    assert len(trials) == 14 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert pruned, "nothing was pruned"
    for trial in pruned:  # stopped after a window, with what it measured
        steps = sorted(trial.intermediate_values)
        assert steps in ([256], [256, 512]) and trial.value == trial.intermediate_values[steps[-1]]
    assert all(len(t.intermediate_values) == 3 for t in trials[:3])  # the first `parents` are measured in full


@pytest.mark.parametrize("sampler", ["tpe", "hybrid"])
def test_two_processes_share_a_tpe_study(tmp_path, sampler) -> None:
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    workers = [subprocess.Popen([sys.executable, "-m", "hpo.run", "--study", "tiny", "--sampler", sampler,
                                 "--storage", storage, "--out", str(tmp_path / name), "--n-trials", "12", "--quiet"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    for worker in workers:
        _, stderr = worker.communicate(timeout=600)
        assert worker.returncode == 0, stderr
    trials = optuna.load_study(study_name="tiny", storage=storage).trials
    assert len(trials) == 12 and all(t.state == TrialState.COMPLETE for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 12
    assert sorted(t.user_attrs["seed"] for t in trials if "seed" in t.user_attrs) == ["ntk", "pi", "yarn",
                                                                                      "yarn-linear"]


# ---------------------------------------------------------------------------------------------------------------
# The hybrid sampler: a model-based generation 0, then the GA


def test_hybrid_fills_generation_0_with_model_curves_and_breeds_from_them(tmp_path) -> None:
    base = ["--study", "tiny", "--sampler", "hybrid", "--out", str(tmp_path), "--quiet"]
    assert main([*base, "--n-trials", "12"]) == 0
    study = load_study(tmp_path)
    before = study.trials
    assert study.user_attrs["search_space"]["kind"] == "longrope"  # the readers see the GA's per-pair space
    generations = [trial_generation(t) for t in before]
    first = [t for t, g in zip(before, generations, strict=True) if g == 0]
    assert len(first) == 4 + 6 and [t.user_attrs.get("seed") for t in first[:4]] == ["pi", "ntk", "yarn",
                                                                                      "yarn-linear"]
    for trial in first[4:]:  # a curve of the family, stored per pair
        assert trial.system_attrs["LongRoPESampler:role"] == "model"
        factors = [trial.params[f"factor_{dim:02d}"] for dim in range(8)]
        assert factors == sorted(factors)
    later = [t for t, g in zip(before, generations, strict=True) if g > 0]
    assert later and {t.system_attrs["LongRoPESampler:role"] for t in later} <= {"mutant", "crossover"}
    numbers = {t.number for t in first}
    assert all(set(t.system_attrs["LongRoPESampler:parents"]) <= numbers for t in later if trial_generation(t) == 1)
    # resumed in another process, it continues the same study with the same proposals as one run would
    assert main([*base, "--n-trials", "14"]) == 0
    resumed = load_study(tmp_path).trials
    assert len(resumed) == 14 and [t.params for t in resumed[:12]] == [t.params for t in before]


def test_hybrid_refuses_longrope2_and_a_curve_space_of_another_window() -> None:
    with pytest.raises(PresetError, match="needs sampler = 'longrope'"):
        load_preset("llama3_128k").replace(search__sampler="hybrid")
    space = LongRoPESearchSpace(num_factors=8, original_length=1000, target_length=4000)
    with pytest.raises(ValueError, match="must share the search space's"):
        HybridSampler(space, MonotoneCurveSpace(num_factors=8, original_length=1000, target_length=8000),
                      CURVE_SAMPLERS["tpe"])


def load_sampler_benchmark(monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "bench_samplers", Path(__file__).parents[1] / "benchmarks" / "samplers.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclass looks its module up
    spec.loader.exec_module(bench)
    return bench


def test_the_sampler_benchmark_compares_over_seeds_and_replays_its_studies(tmp_path, monkeypatch, capsys) -> None:
    bench = load_sampler_benchmark(monkeypatch)
    args = ["--study", "tiny", "--n-trials", "8", "--samplers", "longrope,tpe", "--seeds", "0,1",
            "--out", str(tmp_path), "--html", str(tmp_path / "convergence.html")]
    bench.main(args)
    first = capsys.readouterr().out
    rows = [line for line in first.splitlines() if line.startswith(("| longrope |", "| tpe |"))]
    assert len(rows) == 6  # a row per sampler and seed, then one per sampler
    for seed in (0, 1):  # the reference reaches its own best within its run
        (row,) = [line for line in rows if line.startswith(f"| longrope | {seed} |")]
        assert 0 < float(row.split("|")[7]) <= 1
        assert float(row.split("|")[8]) == float(row.split("|")[7])  # no prefix rungs: windows read are evaluations
    assert (tmp_path / "convergence.html").read_text().count("tiny-tpe-seed1") > 0
    for sampler in ("longrope", "tpe"):  # seed 1 opened with seed 0's seed trials, not measured again
        first_run, copied = (optuna.load_study(study_name=f"tiny-{sampler}-seed{seed}",
                                               storage=f"sqlite:///{tmp_path}/tiny-{sampler}-seed{seed}.db").trials
                             for seed in (0, 1))
        seeds = [trial for trial in copied if "seed" in trial.user_attrs]
        assert seeds == copied[:len(seeds)] and len(seeds) >= 4
        for trial in seeds:
            origin = first_run[trial.number]
            assert trial.user_attrs["copied_from"] == f"tiny-{sampler}-seed0#{trial.number}"
            assert (trial.params, trial.value, trial.datetime_complete) == (
                origin.params, origin.value, origin.datetime_complete)
        assert "copied_from" not in copied[len(seeds)].user_attrs
    bench.main(args)  # a replay: the finished studies are read, not run again
    assert capsys.readouterr().out == first
    for name in ("tiny-longrope-seed0", "tiny-tpe-seed1"):
        assert len(optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / name}.db").trials) == 8

    # Ctrl-C in a longer budget's first new trial: one line, status 130, and the same command continues
    measure = study_module.Workload.step_perplexity
    calls = {"n": 0}

    def interrupted(self, factors, step, desc="trial"):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return measure(self, factors, step, desc=desc)

    monkeypatch.setattr(study_module.Workload, "step_perplexity", interrupted)
    longer = [*args, "--n-trials", "9"]
    assert bench.main(longer) == 130
    assert "run the same command to continue" in capsys.readouterr().err
    monkeypatch.setattr(study_module.Workload, "step_perplexity", measure)
    assert bench.main(longer) == 0
    for name in ("tiny-longrope-seed0", "tiny-tpe-seed1"):
        trials = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / name}.db").trials
        assert sum(t.state == TrialState.COMPLETE for t in trials) == 9


def test_the_sampler_benchmark_measures_pruned_samplers_against_the_plain_search(tmp_path, monkeypatch, capsys):
    bench = load_sampler_benchmark(monkeypatch)
    assert bench.main(["--study", "tiny", "--n-trials", "10", "--samplers", "longrope,tpe", "--seeds", "0",
                       "--unpruned-reference", "--prefixes", "0.5", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pruning rank 1, margin 0, prefix rungs [0.5], reference longrope (no pruning)" in out
    rows = [line for line in out.splitlines() if line.startswith("| longrope") or line.startswith("| tpe")]
    assert [row.split(" | ")[0] for row in rows] == ["| longrope (no pruning)", "| longrope", "| tpe"] * 2
    assert 0 < float(rows[0].split(" | ")[6]) <= 1  # the reference reaches its own best within its run
    assert 0 < float(rows[0].split(" | ")[7]) <= 1
    states = {}
    for name in ("tiny-longrope-seed0-unpruned", "tiny-longrope-seed0", "tiny-tpe-seed0"):
        trials = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / name}.db").trials
        states[name] = {t.state for t in trials}
    assert TrialState.PRUNED not in states["tiny-longrope-seed0-unpruned"]
    assert TrialState.PRUNED in states["tiny-longrope-seed0"] | states["tiny-tpe-seed0"]

    # a budget of full-length evaluations: the pruned run goes on past --n-trials until it read that many
    # windows in full (steps 256 and 512: the two searched windows; 128 is the prefix rung), the reference not
    def full_evaluations(name: str) -> tuple[int, int]:
        trials = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / name}.db").trials
        return len(trials), sum(step >= 256 for trial in trials for step in trial.intermediate_values)

    reference = full_evaluations("tiny-longrope-seed0-unpruned")
    trials, spent = full_evaluations("tiny-longrope-seed0")
    assert bench.main(["--study", "tiny", "--n-trials", "10", "--samplers", "longrope", "--seeds", "0",
                       "--unpruned-reference", "--prefixes", "0.5", "--max-full-evaluations", str(spent + 4),
                       "--out", str(tmp_path)]) == 0
    assert f"10 finished trials for the reference, {spent + 4} full-length evaluations for the others" \
        in capsys.readouterr().out
    longer, budget_spent = full_evaluations("tiny-longrope-seed0")
    assert longer > trials and spent + 4 <= budget_spent <= spent + 5  # the last trial may read both windows
    assert full_evaluations("tiny-longrope-seed0-unpruned") == reference

    # seed trials are copied only from a study under the same [search] settings: not from the pruned run
    # into a run without pruning
    assert bench.main(["--study", "tiny", "--n-trials", "10", "--samplers", "longrope", "--seeds", "1",
                       "--out", str(tmp_path)]) == 0
    trials = optuna.load_study(study_name="tiny-longrope-seed1", storage=f"sqlite:///{tmp_path}/tiny-longrope-seed1.db")
    assert not any("copied_from" in trial.user_attrs for trial in trials.trials)
