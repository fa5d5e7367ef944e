"""Chained studies: progressive extension (factors multiply) and short-context readjustment."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hpo.finetune import main as finetune_main
from hpo.records import study_factors
from hpo.stages import STAGE_KINDS, LongerStage, ShortStage, stage_from_record
from hpo.study import load_workload
from models.baselines import linear_interpolation, yarn
from models.loading import load_model
from models.patch import patched
from models.rope import FactorError, RopeFactors, RopeGeometry, chain_factors
from studies import EXTEND_MODES, PresetError, load_preset

GEOMETRY = RopeGeometry(rotary_dim=16, base=10000.0, original_length=128)

# A tiny second stage: 256 -> 512 on top of the tiny study's factors (the bare model: no fine-tuning here).
LONGER = """target_length = 512
[model]
name = "tiny-random-llama"
dtype = "float32"
[data]
samples = 1
heldout_samples = 1
[search]
n_trials = 8
population = 5
parents = 2
mutants = 2
crossovers = 1
[extend]
from_study = "tiny"
from_dir = "{from_dir}"
finetuned = false
"""
# The short stage searches n_hat among the tiny study's candidates, so that its long-factors seed is exactly
# the long factors (n_hat included) that the comparison row measures.
SHORT = LONGER.replace("target_length = 512", "target_length = 128").replace(
    'finetuned = false', 'finetuned = false\nmode = "short"').replace(
    "crossovers = 1\n", "crossovers = 1\nstart_tokens = [0, 2, 4]\n")


def test_chained_factors_multiply_and_keep_both_stages():
    first = yarn(GEOMETRY, 256)
    then = linear_interpolation(RopeGeometry(16, 10000.0, 256), 1024)
    chained = chain_factors(first, then)
    assert chained.rescale_factors == tuple(a * 4.0 for a in first.rescale_factors)
    assert (chained.original_length, chained.target_length) == (128, 1024)
    assert chained.attention_scaling == pytest.approx(first.attention_scaling * then.attention_scaling)
    assert [stage["target_length"] for stage in chained.metadata["stages"]] == [256, 1024]
    third = linear_interpolation(RopeGeometry(16, 10000.0, 1024), 2048)
    assert [stage["target_length"] for stage in chain_factors(chained, third).metadata["stages"]] == [256, 1024, 2048]
    with pytest.raises(FactorError, match="must start at the first's target length"):
        chain_factors(first, linear_interpolation(GEOMETRY, 512))


def run_stage(tmp_path, text: str, name: str):
    preset = tmp_path / f"{name}.toml"
    preset.write_text(text)
    out = tmp_path / name
    done = subprocess.run([sys.executable, "-m", "hpo.run", "--study", str(preset), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    return done, out


def test_each_extend_mode_is_a_stage_kind_that_answers_without_a_model():
    assert set(STAGE_KINDS) == set(EXTEND_MODES)
    long_factors = yarn(GEOMETRY, 256)
    found = linear_interpolation(RopeGeometry(16, 10000.0, 256), 512)
    longer = LongerStage("tiny", long_factors, "tiny-random-llama")
    assert longer.search_geometry(GEOMETRY, 512).original_length == 256
    with pytest.raises(ValueError, match="longer than the earlier stage's original window 256"):
        longer.search_geometry(GEOMETRY, 256)
    assert longer.search_target_length(512) == 512
    assert longer.exported(longer.final_factors(found)) == (chain_factors(long_factors, found), None)
    assert longer.first_seeds(GEOMETRY, 512) == []
    assert [name for name, _ in longer.references([("none", found), ("pi", found)], GEOMETRY, 512)] == [
        "tiny only", "tiny + pi"]

    short = ShortStage("tiny", long_factors, "tiny-random-llama")
    within = linear_interpolation(GEOMETRY, 128)
    assert short.search_geometry(GEOMETRY, 128) == GEOMETRY
    with pytest.raises(ValueError, match="at most 128"):
        short.search_geometry(GEOMETRY, 256)
    assert short.search_target_length(128) == 256  # bounded as the long factors
    final = short.final_factors(within)
    assert final.attention_scaling == long_factors.attention_scaling
    assert short.exported(final) == (long_factors, final)
    assert [seed.method for seed in short.first_seeds(GEOMETRY, 256)] == ["long", "none"]
    for stage in (longer, short):
        assert stage_from_record(json.loads(json.dumps(stage.to_record()))) == stage


def test_progressive_stage_searches_on_top_and_multiplies(run_dir, tmp_path):
    done, out = run_stage(tmp_path, LONGER.format(from_dir=run_dir), "tiny_longer")
    assert done.returncode == 0, done.stderr
    first = RopeFactors.load(run_dir / "best_factors.json")
    final = RopeFactors.load(out / "best_factors.json")
    second = RopeFactors.from_dict(final.metadata["stages"][-1])
    assert (second.original_length, second.target_length) == (256, 512)  # searched from the first stage's target
    assert final.rescale_factors == pytest.approx([a * b for a, b in zip(first.rescale_factors,
                                                                          second.rescale_factors, strict=True)])
    assert (final.original_length, final.target_length) == (128, 512)
    # The study's value is the perplexity of the model running the product, measured without any stage.
    plain = load_workload(load_preset("tiny").replace(target_length=512, data__samples=1, data__heldout_samples=0))
    value, _ = plain.split_perplexity(final)
    assert value == pytest.approx(second.metadata["searched_perplexity"], rel=1e-6)
    # Evaluation and fine-tuning read the final factors back from the storage too.
    from_storage, model = study_factors("tiny_longer", out=out)
    assert from_storage.rescale_factors == final.rescale_factors and model == "tiny-random-llama"
    results = json.loads((out / "results.json").read_text())
    assert results["extends"]["study"] == "tiny"
    assert [row["method"] for row in results["comparison"]][:2] == ["tiny only", "tiny + pi"]
    rope = json.loads((out / "rope_parameters.json").read_text())["rope_parameters"]
    assert rope["long_factor"] == pytest.approx(list(final.rescale_factors))
    assert rope["original_max_position_embeddings"] == 128


@pytest.fixture(scope="module")
def short_stage(run_dir, tmp_path_factory):
    done, out = run_stage(tmp_path_factory.mktemp("short"), SHORT.format(from_dir=run_dir), "tiny_short")
    assert done.returncode == 0, done.stderr
    return out


def test_short_stage_recovers_the_original_window_and_exports_both(run_dir, short_stage):
    long_factors = RopeFactors.load(run_dir / "best_factors.json")
    short_factors = RopeFactors.load(short_stage / "best_factors.json")
    assert short_factors.attention_scaling == long_factors.attention_scaling  # one attention factor in a config
    rope = json.loads((short_stage / "rope_parameters.json").read_text())["rope_parameters"]
    assert rope["long_factor"] == pytest.approx(list(long_factors.rescale_factors))
    assert rope["short_factor"] == pytest.approx(list(short_factors.rescale_factors))
    rows = {row["method"]: row for row in json.loads((short_stage / "results.json").read_text())["comparison"]}
    best = next(row for name, row in rows.items() if name.startswith("longrope"))
    # No rescaling and the long factors open the search, so the short factors are at least as good as both.
    assert best["searched"] <= rows["none"]["searched"] and best["searched"] <= rows["tiny long factors"]["searched"]


@pytest.fixture(scope="module")
def exported(short_stage, tmp_path_factory):
    """The short study exported by `python -m hpo.export`: the model with long and short factors."""
    model_dir = tmp_path_factory.mktemp("exported") / "model"
    done = subprocess.run([sys.executable, "-m", "hpo.export", "--study", "tiny_short", "--out", str(short_stage),
                           "--to", str(model_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return model_dir


def without_start_tokens(path):
    """The factors of a factor file as an exported config carries them: configs have no n_hat."""
    return dataclasses.replace(RopeFactors.load(path), start_tokens=0)


def test_exported_model_switches_factors_by_input_length(run_dir, short_stage, exported):
    model = AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager").eval()
    ours, _ = load_model("tiny-random-llama", dtype="float32", attn_implementation="eager")
    long_factors = without_start_tokens(run_dir / "best_factors.json")
    short_factors = without_start_tokens(short_stage / "best_factors.json")
    tokens = torch.randint(0, model.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(0))
    for length, factors in ((100, short_factors), (200, long_factors)):  # the window is 128
        with torch.no_grad(), patched(ours, factors):
            expected = ours(tokens[:, :length]).logits
        with torch.no_grad():
            got = model(tokens[:, :length]).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_evaluating_the_exported_model_as_configured(run_dir, short_stage, exported, tmp_path):
    """`hpo.evaluate --methods config` measures the export as stock transformers runs it: short factors within
    the window, long ones beyond; the other candidates are patched over it and restored."""
    files = []
    for name, path in (("short", short_stage), ("long", run_dir)):
        files += ["--factors", str(without_start_tokens(path / "best_factors.json").save(tmp_path / f"{name}.json"))]
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, "-m", "hpo.evaluate", "--model", str(exported), "--methods", "config,none",
                           *files, "--lengths", "128,256", "--dtype", "float32", "--attn", "eager", "--json", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ppl = {(row["method"], row["length"]): row["perplexity"] for row in json.loads(out.read_text())["results"]}
    assert ppl["config", 128] == pytest.approx(ppl["short", 128], rel=1e-5)
    assert ppl["config", 256] == pytest.approx(ppl["long", 256], rel=1e-5)
    assert ppl["config", 256] != pytest.approx(ppl["none", 256], rel=1e-5)


def test_search_finetune_search_finetune(run_dir, tmp_path):
    """The whole progressive chain on the tiny model: each stage starts from the previous fine-tuned model."""
    assert finetune_main(["--study", "tiny", "--out", str(run_dir), "--steps", "2", "--quiet"]) == 0
    first_model = run_dir / "finetuned"
    trained_with = RopeFactors.load(first_model / "rope_factors.json")
    assert trained_with.rescale_factors == RopeFactors.load(run_dir / "best_factors.json").rescale_factors
    text = LONGER.format(from_dir=run_dir).replace("finetuned = false", "finetuned = true")
    done, out = run_stage(tmp_path, text + "[finetune]\nsteps = 2\nsave_every = 2\neval_every = 2\n",
                          "tiny_progressive")
    assert done.returncode == 0, done.stderr
    final = RopeFactors.load(out / "best_factors.json")
    assert final.metadata["model"] == str(first_model)
    assert finetune_main(["--study", str(tmp_path / "tiny_progressive.toml"), "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "finetune" / "summary.json").read_text())
    assert summary["model"] == str(first_model) and summary["settings"]["sequence_length"] == 512
    second = RopeFactors.load(out / "finetuned" / "rope_factors.json")
    assert second.rescale_factors == final.rescale_factors and len(second.metadata["stages"]) == 2
    config = AutoConfig.from_pretrained(out / "finetuned")
    assert config.rope_parameters["long_factor"] == pytest.approx(list(final.rescale_factors))


def test_a_missing_earlier_stage_is_a_clear_error(tmp_path):
    done, _ = run_stage(tmp_path, LONGER.format(from_dir=tmp_path / "nothing"), "orphan")
    assert done.returncode == 2
    assert "best_factors.json does not exist: run `python -m hpo.run --study tiny` first" in done.stderr
    finetuned = LONGER.format(from_dir=tmp_path / "nothing").replace("finetuned = false", "finetuned = true")
    done, _ = run_stage(tmp_path, finetuned, "orphan_finetuned")
    assert done.returncode == 2 and "python -m hpo.finetune --study tiny" in done.stderr


def test_extend_settings_are_checked(tmp_path):
    preset = tmp_path / "bad.toml"
    preset.write_text(LONGER.format(from_dir=tmp_path).replace('finetuned = false', 'mode = "sideways"'))
    with pytest.raises(PresetError, match="extend.mode must be one of longer, short"):
        load_preset(str(preset))
