"""The GGUF export, checked in a real llama.cpp (llama-cpp-python, which the set-up builds from source)."""

from __future__ import annotations

import dataclasses
import math

import gguf
import numpy as np
import pytest
import torch

import hpo.export
from models.baselines import yarn
from models.gguf_export import ROPE_FREQS, GgufExportError, extend_gguf, model_to_gguf, rope_keys
from models.loading import gguf_file, load_model
from models.patch import patched
from models.rope import RopeFactors, RopeGeometry
from objectives.data import load_windows
from objectives.llamacpp import BATCH_TOKENS, gguf_nll, load_gguf_runtime
from objectives.perplexity import perplexity

TINY_TARGET = 256


@pytest.fixture(scope="module")
def tiny():
    """The tiny random llama, sharpened: random weights predict near-uniformly, so neither RoPE nor an attention
    scaling would move its losses enough to tell a right export from a wrong one."""
    model, tokenizer = load_model("tiny-random-llama", dtype="float32")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
        model.lm_head.weight.mul_(20)
    return model, tokenizer


def searched_like(geometry: RopeGeometry, target: int, attention_scaling: float) -> RopeFactors:
    """YaRN's factors bent per pair (as a search leaves them) with a non-trivial attention scaling."""
    bent = [f * (1.0 + 0.1 * (i % 3)) for i, f in enumerate(yarn(geometry, target).rescale_factors)]
    return RopeFactors(bent, geometry.original_length, target, attention_scaling=attention_scaling)


def transformers_nll(model, factors: RopeFactors, ids: torch.Tensor) -> torch.Tensor:
    with patched(model, factors), torch.no_grad():
        hidden = model.model(ids).last_hidden_state[0]
        return torch.nn.functional.cross_entropy(model.lm_head(hidden[:-1]), ids[0, 1:], reduction="none")


def fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {"reader": reader, **{k: reader.fields[k].contents() for k in rope_keys("llama").values()}}


def test_a_converted_model_carries_the_factors_and_runs_in_llama_cpp_as_in_transformers(tiny, tmp_path):
    model, tokenizer = tiny
    factors = searched_like(RopeGeometry.from_config(model.config), TINY_TARGET, attention_scaling=1.2)
    path = model_to_gguf(model, tokenizer, tmp_path / "tiny.gguf", factors)
    written = fields(path)
    assert written["llama.context_length"] == TINY_TARGET
    assert written["llama.rope.scaling.attn_factor"] == pytest.approx(1.2)
    freqs = next(t for t in written["reader"].tensors if t.name == ROPE_FREQS)
    np.testing.assert_allclose(freqs.data, factors.rescale_factors, rtol=1e-6)

    ids = torch.randint(0, 2000, (1, TINY_TARGET), generator=torch.Generator().manual_seed(3))
    ours = transformers_nll(model, factors, ids)
    theirs = gguf_nll(load_gguf_runtime(path, TINY_TARGET), ids)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=5e-3)
    for wrong in (dataclasses.replace(factors, attention_scaling=1.0),  # each part of the export matters
                  dataclasses.replace(factors, rescale_factors=(1.0,) * factors.num_factors)):
        other = model_to_gguf(model, tokenizer, tmp_path / "other.gguf", wrong)
        assert (gguf_nll(load_gguf_runtime(other, TINY_TARGET), ids) - ours).abs().max() > 0.1


def test_a_window_of_several_batches_scores_every_token_once_and_the_next_window_starts_afresh(tiny, tmp_path):
    model, tokenizer = tiny
    length = 2 * BATCH_TOKENS + 7  # two whole batches and part of a third
    factors = searched_like(RopeGeometry.from_config(model.config), length, attention_scaling=1.2)
    runtime = load_gguf_runtime(model_to_gguf(model, tokenizer, tmp_path / "tiny.gguf", factors), length)
    ids = torch.randint(0, 2000, (1, length), generator=torch.Generator().manual_seed(4))
    first = gguf_nll(runtime, ids)
    torch.testing.assert_close(first, transformers_nll(model, factors, ids), rtol=0, atol=5e-3)
    torch.testing.assert_close(gguf_nll(runtime, ids), first, rtol=0, atol=1e-5)


def test_copying_a_gguf_keeps_every_tensor_and_replaces_the_rope_fields(tiny, tmp_path):
    model, tokenizer = tiny
    geometry = RopeGeometry.from_config(model.config)
    first = model_to_gguf(model, tokenizer, tmp_path / "first.gguf", searched_like(geometry, TINY_TARGET, 1.2))
    wider = searched_like(geometry, 2 * TINY_TARGET, 1.3)
    second = extend_gguf(first, tmp_path / "second.gguf", wider)
    before, after = gguf.GGUFReader(first), fields(second)
    assert after["llama.context_length"] == 2 * TINY_TARGET
    assert after["llama.rope.scaling.attn_factor"] == pytest.approx(1.3)
    tensors = {t.name: t for t in after["reader"].tensors}
    assert len(tensors) == len(before.tensors)  # rope_freqs replaced, not added twice
    np.testing.assert_allclose(tensors[ROPE_FREQS].data, wider.rescale_factors, rtol=1e-6)
    for tensor in before.tensors:
        if tensor.name != ROPE_FREQS:
            assert tensor.tensor_type == tensors[tensor.name].tensor_type
            np.testing.assert_array_equal(tensor.data, tensors[tensor.name].data)
    assert (after["reader"].fields["tokenizer.ggml.tokens"].contents()
            == before.fields["tokenizer.ggml.tokens"].contents())


def test_factors_of_the_wrong_length_write_nothing(tiny, tmp_path):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="rotary dim"):
        model_to_gguf(model, tokenizer, tmp_path / "bad.gguf", RopeFactors((1.0,) * 5, 128, 256))
    with pytest.raises(GgufExportError, match="weight type"):
        model_to_gguf(model, tokenizer, tmp_path / "bad.gguf", RopeFactors((1.0,) * 8, 128, 256), "int3")
    assert list(tmp_path.iterdir()) == []


def test_export_cli_writes_a_gguf_that_llama_cpp_loads(run_dir, tmp_path, capsys):
    out = tmp_path / "tiny.gguf"
    assert hpo.export.main(["--study", "tiny", "--out", str(run_dir), "--gguf", str(out)]) == 0
    assert "converted to float32" in capsys.readouterr().out
    runtime = load_gguf_runtime(out, TINY_TARGET)
    assert runtime.n_ctx() == TINY_TARGET
    assert fields(out)["llama.context_length"] == TINY_TARGET


@pytest.mark.parametrize("argv, message", [
    (["--gguf", "{tmp}"], "is a folder"),
    ([], "--to DIR, --gguf FILE, or both"),
])
def test_export_cli_refuses_where_it_cannot_write(run_dir, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    try:
        code = hpo.export.main(["--study", "tiny", "--out", str(run_dir), *argv])
    except SystemExit as stop:  # argparse's usage error
        code = stop.code
    assert code == 2 and message in capsys.readouterr().err


# 2x the embedded model's 8k window: at 1.25x (10k) the unextended model still reads its last 2k tokens as
# well as the extended one (perplexity 21.7 against 21.3); at 2x it breaks. About 13 min on a 2-core CPU,
# most of it llama.cpp's two forwards.
REAL_LENGTH = 16384


@pytest.mark.real_model
def test_the_embedded_gguf_extended_reads_past_its_window_in_llama_cpp(real_model, tmp_path):
    model, tokenizer = real_model
    geometry = RopeGeometry.from_config(model.config)
    factors = yarn(geometry, REAL_LENGTH)
    window = load_windows("essays", tokenizer, REAL_LENGTH, 1, first_window=1)[0]
    exported = extend_gguf(gguf_file("smollm2-135m"), tmp_path / "extended.gguf", factors)
    with patched(model, factors):
        ours = perplexity(model, [window], progress=False).perplexity
    extended = gguf_nll(load_gguf_runtime(exported, REAL_LENGTH), window)
    unextended = gguf_nll(load_gguf_runtime(gguf_file("smollm2-135m"), REAL_LENGTH), window)
    assert math.isclose(extended.mean().exp().item(), ours, rel_tol=0.03)  # Q4_1 kernels vs dequantized fp32
    past = slice(geometry.original_length - 1, None)  # the losses of the tokens past the original window
    assert extended[past].mean().exp() < 0.5 * unextended[past].mean().exp(), (extended[past].mean(),
                                                                               unextended[past].mean())
