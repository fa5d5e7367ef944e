"""On a CUDA GPU (skipped elsewhere): the patched model scores what it scores on the CPU, in each attention kernel.

The project never depends on a GPU, but a trial on one must measure the same factors: the patch builds its
frequencies and the start-token hook its positions on the model's device. These run where a GPU machine is
lent (`pytest tests/test_cuda.py`); CI has none and skips them.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from models.baselines import yarn
from models.loading import pick_device, pick_dtype
from models.patch import apply_factors, restore_original
from models.rope import RopeFactors, RopeGeometry
from objectives.perplexity import window_nll
from tests.conftest import TINY_WINDOW, tiny_llama

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TARGET = 4 * TINY_WINDOW


def trial_factors() -> dict[str, RopeFactors]:
    geometry = RopeGeometry.from_config(tiny_llama().config)
    curve = tuple(1.0 + 3.0 * index / 7 for index in range(8))  # monotone per-pair factors, as a mutant's
    return {"yarn, 4 start tokens": replace(yarn(geometry, TARGET), start_tokens=4),
            "per-pair factors, 2 start tokens": RopeFactors(curve, TINY_WINDOW, TARGET, start_tokens=2,
                                                            attention_scaling=1.1)}


def hidden_states(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states on the CPU: RoPE moves them far more than the tiny model's NLL."""
    with torch.no_grad():
        return model.get_decoder()(ids.to(model.device)).last_hidden_state.cpu()


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(trial_factors()))
def test_a_patched_model_computes_on_the_gpu_what_it_computes_on_the_cpu(name, attention):
    factors = trial_factors()[name]
    ids = torch.randint(0, 128, (1, TARGET), generator=torch.Generator().manual_seed(0))
    states, nll = {}, {}
    for device in ("cpu", "cuda"):
        model = tiny_llama().to(device)
        model.set_attn_implementation(attention)
        apply_factors(model, factors)
        states[device], nll[device] = hidden_states(model, ids), window_nll(model, ids)[0]
        restore_original(model)
        states[f"{device} restored"] = hidden_states(model, ids)
    torch.testing.assert_close(states["cuda"], states["cpu"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(states["cuda restored"], states["cpu restored"], rtol=1e-4, atol=1e-4)
    assert (states["cuda"] - states["cuda restored"]).abs().max() > 1e-2  # the patch acted on the GPU too
    assert nll["cuda"] == pytest.approx(nll["cpu"], rel=1e-4)


def test_auto_on_a_gpu_is_cuda_and_bf16():
    device = pick_device("auto")
    assert device.type == "cuda"
    assert pick_dtype("auto", device) == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
