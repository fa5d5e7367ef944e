"""`python -m hpo.finetune`: packing, the training run, resume, export, LoRA and the mixed context window.

Every run is the tiny preset (a random 2-layer llama, 128-token window) fine-tuned at 256 tokens for a few
steps with its [finetune] settings, on factors written as the study's best_factors.json.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from hpo import finetune as finetune_module
from hpo.finetune import finetune, in_original_window, load_rows, main, original_window_factors
from models.loading import load_model
from models.patch import apply_factors
from models.rope import RopeFactors, RopeGeometry
from objectives import perplexity as perplexity_module
from objectives.packing import IGNORE_INDEX, model_inputs, pack_documents, split_rows, training_rows
from objectives.perplexity import packed_rows_loss
from studies import load_preset

# start_tokens 0: stock transformers has no n_hat, so the export reproduces the patched model exactly
FACTORS = RopeFactors(rescale_factors=(1.0, 1.0, 1.2, 1.5, 1.8, 2.0, 2.0, 2.0), original_length=128,
                      target_length=256, attention_scaling=1.1, metadata={"model": "tiny-random-llama"})


def study_out(directory: Path, factors: RopeFactors = FACTORS) -> Path:
    """A study directory as `python -m hpo.run` leaves it when its storage is elsewhere: best_factors.json."""
    factors.save(directory / "best_factors.json")
    return directory


def cli(*args: str) -> tuple[int, str, str]:
    """``main(args)`` in this process (no interpreter start-up): exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*args, "--quiet"])
    return code, out.getvalue(), err.getvalue()


def checkpoint_weights(directory: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(directory / "finetune" / f"checkpoint-{step}" / "model.safetensors")


def state(directory: Path, step: int) -> dict:
    return json.loads((directory / "finetune" / f"checkpoint-{step}" / "finetune_state.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str]:
    """The tiny preset's fine-tuning (6 steps, checkpoints at 3 and 6) through the command line, uninterrupted."""
    directory = study_out(tmp_path_factory.mktemp("tiny"))
    code, stdout, stderr = cli("--study", "tiny", "--out", str(directory))
    assert code == 0, stderr
    return directory, stdout


# ----------------------------------------------------------------------------------------------------------------
# Packing


def test_packing_restarts_positions_at_each_document_and_masks_its_first_label():
    documents = [torch.arange(100, 105), torch.arange(200, 203), torch.arange(300, 310)]
    tokens, starts = pack_documents(documents, length=8, eos_token_id=0)
    # 5+1, 3+1, 10+1 = 21 tokens -> 2 rows of 8, the last 5 dropped
    assert tokens.shape == (2, 8)
    assert tokens.flatten().tolist() == [100, 101, 102, 103, 104, 0, 200, 201, 202, 0, 300, 301, 302, 303, 304, 305]
    inputs = model_inputs(tokens, starts)
    # the document cut by the row boundary continues from position 0 in the second row
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 0, 1, 2, 3, 4, 5]]
    assert inputs["labels"].tolist() == [[IGNORE_INDEX, 101, 102, 103, 104, 0, IGNORE_INDEX, 201],
                                         [IGNORE_INDEX, 0, IGNORE_INDEX, 301, 302, 303, 304, 305]]
    assert torch.equal(inputs["input_ids"], tokens)
    assert pack_documents([], length=8, eos_token_id=0)[0].shape == (0, 8)


def test_training_rows_read_every_row_once_per_pass_in_a_seeded_order():
    first_pass, second_pass = training_rows(0, 7, 7, seed=3), training_rows(7, 7, 7, seed=3)
    assert sorted(first_pass) == sorted(second_pass) == list(range(7))
    assert first_pass != second_pass  # a new order per pass
    assert training_rows(4, 6, 7, seed=3) == (first_pass + second_pass)[4:10]  # any position, from the seed alone
    assert training_rows(0, 7, 7, seed=4) != first_pass


def test_short_rows_cut_each_row_at_the_original_window():
    tokens, starts = pack_documents([torch.arange(1, 40)], length=20, eos_token_id=0)
    short_tokens, short_starts = split_rows(tokens, starts, 8)
    assert short_tokens.shape == (4, 8)  # 2 rows of 20 -> 2 x 2 rows of 8, 4 tokens each left out
    assert short_tokens.tolist() == [tokens[r, c:c + 8].tolist() for r in range(2) for c in (0, 8)]
    assert model_inputs(short_tokens, short_starts)["position_ids"].tolist() == [list(range(8))] * 4


def test_with_bos_every_row_and_document_starts_with_it_and_the_next_token_is_trained():
    documents = [torch.arange(100, 105), torch.arange(200, 203), torch.arange(300, 310)]
    tokens, starts = pack_documents(documents, length=8, eos_token_id=0, bos_token_id=1)
    # 1+5+1, 1+3+1, 1+10+1 = 24 tokens -> 3 rows of 8; rows 2 and 3 start inside a document: BOS replaces 200, 303
    assert tokens.tolist() == [[1, 100, 101, 102, 103, 104, 0, 1],
                               [1, 201, 202, 0, 1, 300, 301, 302],
                               [1, 304, 305, 306, 307, 308, 309, 0]]
    inputs = model_inputs(tokens, starts)
    assert inputs["labels"][0].tolist() == [IGNORE_INDEX, 100, 101, 102, 103, 104, 0, IGNORE_INDEX]
    for row in range(3):
        bos_at = (tokens[row] == 1).nonzero().flatten()
        assert starts[row, bos_at].all()  # each BOS opens a segment: position 0, label -100
        assert (inputs["position_ids"][row, bos_at] == 0).all()
        assert (inputs["labels"][row, bos_at] == IGNORE_INDEX).all()
        after = bos_at[bos_at < 7] + 1
        assert (inputs["labels"][row, after] != IGNORE_INDEX).all()  # the first text token is predicted from BOS
    short_tokens, short_starts = split_rows(tokens, starts, 4, bos_token_id=1)
    assert short_tokens[:, 0].tolist() == [1] * 6 and short_starts[:, 0].all()


def test_rows_start_with_bos_where_the_search_windows_do(tmp_path, monkeypatch):
    tokenizer = load_model("tiny-random-llama", dtype="float32", device="cpu")[1]
    stream_preset = load_preset("tiny")  # the essays, read as one stream: windows without BOS, rows too
    assert (load_rows(stream_preset, tokenizer, 256)[0][:, 0] != tokenizer.bos_token_id).any()
    preset = stream_preset.replace(data__window_mode="documents", finetune__mixed_short_fraction=0.5,
                                   finetune__steps=4, finetune__eval_every=100, finetune__save_every=100)
    tokens, starts = load_rows(preset, tokenizer, 256)
    assert (tokens[:, 0] == tokenizer.bos_token_id).all() and starts[:, 0].all()
    fed = []
    real_inputs = finetune_module.model_inputs

    def recording(tokens: torch.Tensor, starts: torch.Tensor) -> dict[str, torch.Tensor]:
        fed.append(tokens)
        return real_inputs(tokens, starts)

    monkeypatch.setattr(finetune_module, "model_inputs", recording)  # training rows
    monkeypatch.setattr(perplexity_module, "model_inputs", recording)  # held-out rows
    finetune(preset, FACTORS, tmp_path, progress=False)
    assert {row.shape[-1] for row in fed} == {128, 256}  # short rows (original window) and long ones
    assert all((row[:, 0] == tokenizer.bos_token_id).all() for row in fed)  # held-out, long and short rows


def test_dtype_flag_overrides_the_finetune_dtype(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(finetune_module, "finetune", lambda preset, *args, **kwargs: seen.append(preset.finetune.dtype))
    out = study_out(tmp_path)
    assert cli("--study", "tiny", "--out", str(out), "--dtype", "bf16")[0] == 0
    assert cli("--study", "tiny", "--out", str(out))[0] == 0
    assert seen == ["bf16", "auto"]
    code, _, stderr = cli("--study", "tiny", "--out", str(out), "--dtype", "half")
    assert code == 2 and stderr.startswith("error: unknown --dtype 'half'") and stderr.count("\n") == 1, stderr
    assert len(seen) == 2  # refused before fine-tuning


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_documents_do_not_attend_to_each_other(model, attention):
    """transformers 5.23 builds a block-diagonal mask from restarting position ids (no mask, no cache)."""
    model.set_attn_implementation(attention)
    first, second = torch.randint(0, 128, (1, 20)), torch.randint(0, 128, (1, 30))
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(20), torch.arange(30)])[None]
    with torch.no_grad():
        alone = model(input_ids=second, use_cache=False).logits
        together = model(input_ids=packed, position_ids=positions, use_cache=False).logits[:, 20:]
        with_cache = model(input_ids=packed, position_ids=positions, use_cache=True).logits[:, 20:]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    # with a cache the packing is not detected and the second document sees the first: why we pass use_cache=False
    assert not torch.allclose(with_cache, alone, atol=1e-3)


def test_heldout_loss_is_transformers_loss_through_the_chunked_path(model):
    """The held-out loss never builds a row's full logits, and equals the model's own loss on packed rows."""
    tokens, starts = pack_documents([torch.randint(2, 128, (n,)) for n in (30, 50, 45, 70)], length=64,
                                    eos_token_id=0)
    with torch.no_grad():
        nll = count = 0
        for row in range(len(tokens)):
            inputs = model_inputs(tokens[row:row + 1], starts[row:row + 1])
            scored = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
            nll += model(**inputs, use_cache=False).loss.item() * scored
            count += scored
    assert packed_rows_loss(model, tokens, starts) == pytest.approx(nll / count, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# The run


def test_training_beyond_the_window_lowers_the_heldout_loss(trained):
    directory, stdout = trained
    summary = json.loads((directory / "finetune" / "summary.json").read_text())
    assert summary["settings"]["sequence_length"] == 256 > FACTORS.original_length
    assert summary["steps"] == 6 and summary["tokens"] == 6 * 256 and summary["short_batches"] == 0
    assert [step for step, _ in summary["evals"]] == [0, 3, 6]
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"] - 0.1
    assert "held-out loss" in stdout and str(directory / "finetuned") in stdout
    # only the latest checkpoint is kept
    assert sorted(p.name for p in (directory / "finetune").iterdir()) == ["checkpoint-6", "summary.json"]


def test_export_loads_in_stock_transformers_and_reproduces_the_patched_model(trained):
    directory, _ = trained
    exported = AutoModelForCausalLM.from_pretrained(directory / "finetuned").eval()
    assert exported.config.rope_parameters["rope_type"] == "longrope"
    assert RopeFactors.load(directory / "finetuned" / "rope_factors.json") == FACTORS
    # the same trained weights on the model's original config, with the factors patched in
    original_config = load_model("tiny-random-llama", dtype="float32", device="cpu")[0].config
    patched = LlamaForCausalLM.from_pretrained(directory / "finetuned", config=original_config).eval()
    for length, factors in ((100, original_window_factors(FACTORS)), (200, FACTORS)):  # within and beyond the window
        ids = torch.randint(0, exported.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
        apply_factors(patched, factors)
        with torch.no_grad():
            torch.testing.assert_close(exported(ids).logits, patched(ids).logits, atol=1e-4, rtol=1e-4)


def test_a_resumed_run_ends_like_an_uninterrupted_one(trained, tmp_path):
    reference, _ = trained
    directory = study_out(tmp_path)
    code, stdout, stderr = cli("--study", "tiny", "--out", str(directory), "--stop-after", "3")
    assert code == 0 and "stopped by --stop-after 3" in stdout, stderr
    assert not (directory / "finetuned").exists()
    # what a run killed while saving leaves behind: never resumed from
    (directory / "finetune" / "checkpoint-6.partial").mkdir()
    (directory / "finetune" / "checkpoint-5").mkdir()
    (directory / "finetune" / "checkpoint-5" / "model.safetensors").write_bytes(b"half")

    code, _, stderr = cli("--study", "tiny", "--out", str(directory))
    assert code == 0, stderr
    assert state(directory, 6)["losses"] == pytest.approx(state(reference, 6)["losses"], rel=1e-6)
    assert sum(state(directory, 6)["evals"], []) == pytest.approx(sum(state(reference, 6)["evals"], []), rel=1e-6)
    assert state(directory, 6)["position"] == 6
    resumed, uninterrupted = checkpoint_weights(directory, 6), checkpoint_weights(reference, 6)
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in resumed.items():
        torch.testing.assert_close(tensor, uninterrupted[name], atol=1e-6, rtol=1e-6)
    assert sorted(p.name for p in (directory / "finetune").iterdir()) == ["checkpoint-6", "summary.json"]


def test_resuming_with_other_settings_or_without_a_checkpoint_is_refused(trained, tmp_path):
    directory, _ = trained
    code, _, stderr = cli("--study", "tiny", "--out", str(directory), "--lr", "0.1")
    assert code == 2 and "other settings" in stderr and "learning_rate" in stderr and "--restart" in stderr
    code, _, stderr = cli("--study", "tiny", "--out", str(study_out(tmp_path)), "--resume")
    assert code == 2 and "no checkpoint" in stderr
    assert (directory / "finetune" / "checkpoint-6" / "finetune_state.json").is_file()  # nothing lost


def test_mixed_window_runs_short_rows_with_the_original_rope(tmp_path, monkeypatch):
    preset = load_preset("tiny").replace(finetune__mixed_short_fraction=0.5, finetune__steps=4)
    kinds = ["short" if in_original_window(step, 0.5, preset.finetune.seed) else "long" for step in range(4)]
    assert set(kinds) == {"short", "long"}, kinds
    seen = []
    forward = LlamaRotaryEmbedding.forward

    def recording(self, x, position_ids):
        seen.append((tuple(position_ids.shape), self.inv_freq.clone(), self.attention_scaling))
        return forward(self, x, position_ids)

    monkeypatch.setattr(LlamaRotaryEmbedding, "forward", recording)
    finetune(preset, FACTORS, tmp_path, progress=False)

    geometry = RopeGeometry(rotary_dim=16, base=10000.0, original_length=128)
    long_inv_freq, _ = FACTORS.inv_freq(geometry)
    expected = {"short": ((2, 128), geometry.original_inv_freq()), "long": ((1, 256), long_inv_freq)}
    training = seen[1:-1]  # between the held-out forwards at step 0 and at the end (step 4)
    del training[3]  # the held-out forward at step 3 (eval_every)
    assert [shape for shape, _, _ in training] == [expected[kind][0] for kind in kinds]
    for (_, inv_freq, scaling), kind in zip(training, kinds, strict=True):
        torch.testing.assert_close(inv_freq, expected[kind][1])
        assert scaling == FACTORS.attention_scaling  # the exported longrope applies it to both sets
    summary = json.loads((tmp_path / "finetune" / "summary.json").read_text())
    assert summary["short_batches"] == kinds.count("short")


def test_lora_trains_only_the_adapters_and_exports_a_merged_model(tmp_path):
    preset = load_preset("tiny").replace(finetune__lora=True, finetune__steps=2)
    export = finetune(preset, FACTORS, tmp_path, progress=False)
    base = load_model("tiny-random-llama", dtype="float32", device="cpu")[0].state_dict()
    trained = checkpoint_weights(tmp_path, 2)
    adapters = {name: t for name, t in trained.items() if ".lora_" in name}
    assert adapters and any(t.abs().max() > 0 for name, t in adapters.items() if ".lora_B." in name)
    for name, tensor in trained.items():
        if ".lora_" not in name:  # every base weight is as loaded
            original = name.removeprefix("base_model.model.").replace(".base_layer", "")
            torch.testing.assert_close(tensor, base[original], atol=0, rtol=0)

    merged = AutoModelForCausalLM.from_pretrained(export)
    assert merged.config.rope_parameters["rope_type"] == "longrope"
    weights = merged.state_dict()
    assert weights.keys() == base.keys()  # plain llama weights, the adapters merged in
    query = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights[query], base[query])
    torch.testing.assert_close(weights["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


# ----------------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_exits_2_with_one_line(tmp_path):
    def fails(*args: str) -> str:
        code, _, stderr = cli(*args)
        assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
        return stderr

    assert "unknown study 'nope'" in fails("--study", "nope")
    assert "no study storage" in fails("--study", "tiny", "--out", str(tmp_path / "empty"))
    wrong = RopeFactors(rescale_factors=(1.0, 2.0), original_length=128, target_length=256)
    assert "needs 8" in fails("--study", "tiny", "--out", str(study_out(tmp_path / "wrong", wrong)))
    out = study_out(tmp_path / "run")
    assert "text too short" in fails("--study", "tiny", "--out", str(out), "--sequence-length", "1000000")
    assert "must be longer than the original window" in fails("--study", "tiny", "--out", str(out),
                                                              "--sequence-length", "128")
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    preset = tmp_path / "broken.toml"
    preset.write_text(f'target_length = 256\n[model]\nname = "{not_a_model}"\n')
    assert "no config.json" in fails("--study", str(preset), "--out", str(out))
    shutil.rmtree(out)
