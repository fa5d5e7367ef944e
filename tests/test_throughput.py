"""benchmarks/throughput.py: its part timer splits a trial's forward exactly and leaves the model as it was."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from models.loading import load_model
from models.patch import apply_factors
from objectives.perplexity import window_nll


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_throughput", Path(__file__).parents[1] / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_part_timer_splits_the_forward_and_removes_its_hooks(bench):
    model, _ = load_model("tiny-random-llama", dtype="float32")
    apply_factors(model, bench.trial_factors(model, 256))  # start tokens: our hook runs too
    ids = torch.randint(0, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    expected = window_nll(model, ids)
    kernel = ALL_ATTENTION_FUNCTIONS["sdpa"]
    timer = bench.PartTimer(model)
    with timer():
        started = time.perf_counter()
        assert window_nll(model, ids) == expected  # timing changes nothing
        total_s = time.perf_counter() - started
    parts = timer.parts(total_s)
    assert sum(parts.values()) == pytest.approx(total_s)
    measured = ("attention kernel", "q/k/v/o projections", "MLP", "norms", "lm-head",
                "RoPE (rotary module, start-token hook)")
    assert all(parts[part] > 0 for part in measured), parts
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is kernel
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in model.model.layers.modules())


def test_part_flops_count_the_lower_triangle_and_every_projection(bench):
    shape = bench.LayerShape(hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64)
    flops = bench.part_flops(shape, layers=30, vocab=49152, tokens=16384)
    assert flops["attention kernel"] == 30 * 4 * 9 * 64 * 16384 * 16385 / 2
    assert flops["MLP"] == 30 * 2 * 16384 * 576 * 1536 * 3
    assert flops["q/k/v/o projections"] == 30 * 2 * 16384 * 576 * (2 * 576 + 2 * 192)


def test_a_length_runs_in_a_fresh_process_and_reports_memory(bench, tmp_path, capsys):
    out = tmp_path / "throughput.json"
    bench.main(["--model", "tiny-random-llama", "--no-peaks", "--lengths", "128", "--variants", "none",
                "--json", str(out)])
    (run,) = json.loads(out.read_text())["lengths"]
    assert run["length"] == 128 and run["dtype"] in ("float32", "bfloat16")
    assert run["rss_peak_gib"] >= run["rss_loaded_gib"] > 0
    assert sum(run["parts_s"].values()) == pytest.approx(run["seconds"])
    assert "## (b) 128 tokens" in capsys.readouterr().out


def test_a_trial_forward_gives_sdpa_no_mask_and_the_causal_flag(monkeypatch):
    """No L x L mask is built: SDPA's causal kernel (flash on CPU) does the masking."""
    model, _ = load_model("tiny-random-llama", dtype="float32", attn_implementation="sdpa")
    kernel, seen = ALL_ATTENTION_FUNCTIONS["sdpa"], []

    def recording(module, query, key, value, attention_mask, **kwargs):
        seen.append(attention_mask)
        return kernel(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", recording)
    window_nll(model, torch.randint(0, model.config.vocab_size, (1, 200)))
    assert seen and all(mask is None for mask in seen)


@pytest.fixture(scope="module")
def bench_cuda():
    spec = importlib.util.spec_from_file_location(
        "bench_throughput_cuda", Path(__file__).parents[1] / "benchmarks" / "throughput_cuda.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_benchmark_compares_kernels_on_one_forward_and_says_which_cannot_run(bench_cuda, tmp_path, capsys):
    """On the CPU (the GPU run's logic, smoke-tested): every kernel scores the same NLL, one SDPA cannot run
    here is a row with its error, and the JSON holds every row."""
    out = tmp_path / "throughput_cuda.json"
    bench_cuda.main(["--device", "cpu", "--model", "tiny-random-llama", "--lengths", "128", "--square", "128",
                     "--shape-tokens", "128", "--repeats", "1", "--kernels", "sdpa default,sdpa flash,sdpa cudnn",
                     "--json", str(out)])
    default, flash, cudnn = json.loads(out.read_text())["rows"]
    assert default["nll_per_token"] == pytest.approx(flash["nll_per_token"], rel=1e-4)
    assert default["seconds"] > 0 and "error" in cudnn
    assert "| 128 | sdpa cudnn | RuntimeError" in capsys.readouterr().out


def test_the_gpu_benchmark_on_a_machine_without_one_says_so(bench_cuda, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as ended:
        bench_cuda.main([])
    assert ended.value.code == 2 and "needs a CUDA GPU" in capsys.readouterr().err
