"""Study presets: every shipped file loads; typos and impossible settings are clear errors."""

from __future__ import annotations

import pytest

from studies import PresetError, list_presets, load_preset

REQUIRED = {"smollm2_16k", "smollm2_32k", "llama2_16k", "llama2_32k", "mistral_32k", "llama3_128k", "tiny"}


def test_every_required_preset_ships_and_loads():
    assert REQUIRED <= set(list_presets())
    for name in list_presets():
        preset = load_preset(name)
        assert preset.name == name and preset.target_length > 0


def test_paper_presets_use_the_reference_search():
    for name in ("llama2_16k", "llama2_32k", "mistral_32k"):
        preset = load_preset(name)
        assert (preset.search.population, preset.search.parents) == (64, 32)
        assert (preset.search.mutants, preset.search.crossovers) == (16, 16)
        assert preset.data.source == "pg19" and preset.data.samples == 5
        assert preset.search.start_token_search == "sweep"  # the reference's n_hat rule
    mistral = load_preset("mistral_32k").search  # the reference's Mistral YaRN seed: betas 128 and 2
    assert (mistral.yarn_beta_fast, mistral.yarn_beta_slow) == (128, 2)
    assert load_preset("llama2_16k").search.yarn_beta_fast == 32
    longrope2 = load_preset("llama3_128k")
    assert longrope2.search.critical_dim == (33, 34) and longrope2.fitness.kind == "needle-perplexity"
    assert longrope2.search.length_scale == 32  # [s, 2 s] from d_c on (the reference's phi-4 script: 64 at s = 32)


def test_chained_presets_build_on_shipped_studies():
    chained = {name: load_preset(name) for name in list_presets() if load_preset(name).extend.from_study}
    assert {"smollm2_32k_progressive", "smollm2_8k_short", "llama2_256k"} <= set(chained)
    for name, preset in chained.items():
        earlier = load_preset(preset.extend.from_study)
        assert preset.model.name == earlier.model.name, name
        if preset.extend.mode == "longer":
            assert preset.target_length > earlier.target_length, name
        else:
            assert preset.target_length < earlier.target_length, name
    assert load_preset("llama2_128k").finetune.steps == 400 and load_preset("llama2_256k").finetune.steps == 600
    assert load_preset("llama3_128k").finetune.mixed_short_fraction > 0


def test_pruning_is_on_where_several_searched_windows_pay_for_it():
    for name in ("llama2_16k", "llama2_32k", "mistral_32k", "llama3_128k"):
        search = load_preset(name).search
        assert search.pruning and search.pruning_margin == 0.01 and search.pruning_prefixes == ()
    for name in ("smollm2_16k", "tiny"):
        assert not load_preset(name).search.pruning
    strict = load_preset("smollm2_16k_pruned").search  # the embedded model on 5 windows, as benchmarked
    assert load_preset("smollm2_16k_pruned").data.samples == 5 and strict.pruning
    assert (strict.pruning_rank, strict.pruning_margin, strict.pruning_prefixes) == (1, 0.0, (0.25,))
    at_4x = load_preset("smollm2_32k").search  # no prefix rung: a 16k prefix ranks curves as at 2x
    assert load_preset("smollm2_32k").data.samples == 2 and at_4x.pruning
    assert (at_4x.pruning_rank, at_4x.pruning_margin, at_4x.pruning_prefixes) == (1, 0.0, ())
    preset = load_preset("tiny").replace(search__pruning=True, search__pruning_prefixes=(0.25, 0.5))
    assert preset.search.pruning and preset.search.pruning_prefixes == (0.25, 0.5)


def test_overrides():
    preset = load_preset("smollm2_16k").replace(search__n_trials=5, data__samples=2, target_length=32768,
                                                model__device=None)
    assert (preset.search.n_trials, preset.data.samples, preset.target_length) == (5, 2, 32768)
    assert preset.model.device == "auto"
    with pytest.raises(PresetError, match="n_trials must be a positive integer"):
        preset.replace(search__n_trials=0)
    assert preset.search.sampler == "longrope" and preset.replace(search__sampler="tpe").search.sampler == "tpe"


def write(tmp_path, text: str):
    path = tmp_path / "custom.toml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("target_length = 100\n[search]\npopulaton = 4\n", "unknown key.*populaton"),
        ("target_length = 100\nmodle = 'x'\n", "unknown key.*modle"),
        ("[model]\nname = 'x'\n", "target_length is missing"),
        ("target_length = 100\n[model]\noriginal_length = 200\n", "must be longer than original_length"),
        ("target_length = 100\n[fitness]\nkind = 'bleu'\n", "fitness.kind"),
        ("target_length = 100\n[search]\nparents = 9\npopulation = 4\n", "parents cannot exceed"),
        ("target_length = 'long'\n", "positive integer"),
        ("target_length = = 3\n", "not valid TOML"),
        ("target_length = 100\nsearch = 3\n", r"\[search\] must be a table"),
        ("target_length = 100\n[search]\npruning = 'yes'\n", "pruning must be true or false"),
        ("target_length = 100\n[search]\npruning_margin = -0.1\n", "pruning_margin must be a number >= 0"),
        ("target_length = 100\n[search]\npruning_rank = 0\n", "pruning_rank must be an integer from 1"),
        ("target_length = 100\n[search]\npruning_rank = 33\n", "pruning_rank must be an integer from 1"),
        ("target_length = 100\n[search]\npruning_rank = 1.5\n", "pruning_rank must be an integer from 1"),
        ("target_length = 100\n[search]\npruning_prefixes = [0.5, 0.25]\n", "increasing fractions"),
        ("target_length = 100\n[search]\npruning_prefixes = [1.5]\n", "increasing fractions"),
        ("target_length = 100\n[search]\nlength_scale = 8.0\n", "length_scale bounds LongRoPE2"),
        ("target_length = 100\n[search]\ncritical_dim = 3\nlength_scale = 0.5\n", "length_scale must be a number"),
        ("target_length = 100\n[search]\ncritical_dim = [3, 0]\n", "sweeps LongRoPE2 critical dims"),
        ("target_length = 100\n[search]\ncritical_dim = 'formula'\n", "critical_dim must be 'auto'"),
        ("target_length = 100\n[search]\nstart_token_search = 'grid'\n", "start_token_search must be one of"),
        ("target_length = 100\n[search]\nstart_token_search = 'sweep'\n", "needs several search.start_tokens"),
        ("target_length = 100\n[search]\nyarn_beta_fast = 0\n", "yarn_beta_fast and search.yarn_beta_slow"),
        ("name = '../../elsewhere'\ntarget_length = 100\n", "name must be letters"),
        ("target_length = 100\n[search]\nsampler = 'bayes'\n", "sampler must be one of longrope, tpe, cmaes, gp"),
        ("target_length = 100\n[search]\nsampler = 'gp'\ncritical_dim = 'auto'\n", "critical_dim .LongRoPE2. needs"),
        ("target_length = 100\n[search]\ncurve_knots = 1\n", "curve_knots must be an integer >= 2"),
        # refused when the preset loads, not by the search space after the model has loaded
        ("target_length = 100\n[search]\nattention_scaling = [1.1, 1.1]\n", "0 < low < high"),
        ("target_length = 100\n[search]\nstart_tokens = [0, 4, 4]\n", "distinct integers"),
        ("target_length = 100\n[search]\nmax_factor = 0.5\n", "max_factor must be a number > 1"),
    ],
)
def test_malformed_presets(tmp_path, text, message):
    with pytest.raises(PresetError, match=message):
        load_preset(write(tmp_path, text))


def test_unknown_study_lists_the_presets():
    with pytest.raises(PresetError, match="unknown study 'llama9_1m'.*smollm2_16k"):
        load_preset("llama9_1m")
