"""The floating-point type that runs a model fastest on this CPU, found by measuring, never by CPU flags.

Flags do not tell: on an AVX-512 BF16 Xeon without AMX a 4096^3 matmul ran at 178 GFLOP/s in bf16 and
345 in fp32; an AVX2-only EPYC emulates bf16 at a few GFLOP/s; with AMX bf16 runs up to 2.8x faster than
fp32. :func:`fastest_cpu_dtype` times one decoder layer's work at the model's own shapes (the q/k/v/o and
MLP projections and causal SDPA) in fp32 and bf16, keeps the faster, and caches the timings in
``<cache>/dtype_probe.json`` under the CPU, its flags, the torch version, the thread count and the shapes,
so the probe costs a few seconds once per machine and model shape.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from models import assets
from models.atomic import written_atomically

logger = logging.getLogger(__name__)

PROBE_TOKENS = 1024  # long enough for the matmuls to run at speed, short enough for emulated bf16
CANDIDATE_DTYPES = (torch.float32, torch.bfloat16)
PROBE_FILE = "dtype_probe.json"


@dataclass(frozen=True)
class LayerShape:
    """The sizes of one decoder layer that decide its speed."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> LayerShape:
        """The shape of one decoder layer of the model ``config`` describes."""
        heads = config.num_attention_heads
        return cls(hidden=config.hidden_size, intermediate=config.intermediate_size, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads)

    @property
    def q_width(self) -> int:
        """Output width of the query projection (and input width of the output projection)."""
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Output width of the key and of the value projection."""
        return self.kv_heads * self.head_dim

    def projection_flops(self, tokens: int) -> dict[str, float]:
        """FLOPs of each projection of one layer over ``tokens`` tokens (2 per multiply-add)."""
        return {"q/k/v/o projections": 2.0 * tokens * self.hidden * (2 * self.q_width + 2 * self.kv_width),
                "MLP": 2.0 * tokens * self.hidden * self.intermediate * 3}

    def attention_flops(self, tokens: int) -> float:
        """FLOPs of causal attention over ``tokens`` tokens: QK^T and PV over the lower triangle."""
        return 4.0 * self.q_width * tokens * (tokens + 1) / 2


def time_layer(shape: LayerShape, dtype: torch.dtype, tokens: int = PROBE_TOKENS, repeats: int = 2) -> float:
    """Best seconds of one decoder layer's projections and causal attention over ``tokens`` tokens in ``dtype``."""
    generator = torch.Generator().manual_seed(0)

    def weight(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=generator) * cols ** -0.5).to(dtype)

    x = torch.randn(tokens, shape.hidden, generator=generator).to(dtype)
    wq, wk, wv, wo = (weight(shape.q_width, shape.hidden), weight(shape.kv_width, shape.hidden),
                      weight(shape.kv_width, shape.hidden), weight(shape.hidden, shape.q_width))
    wg, wu, wd = (weight(shape.intermediate, shape.hidden), weight(shape.intermediate, shape.hidden),
                  weight(shape.hidden, shape.intermediate))

    def heads(t: torch.Tensor, count: int) -> torch.Tensor:
        return t.view(1, tokens, count, shape.head_dim).transpose(1, 2)

    def layer() -> torch.Tensor:
        attended = F.scaled_dot_product_attention(
            heads(F.linear(x, wq), shape.heads), heads(F.linear(x, wk), shape.kv_heads),
            heads(F.linear(x, wv), shape.kv_heads), is_causal=True, enable_gqa=shape.heads != shape.kv_heads)
        hidden = F.linear(attended.transpose(1, 2).reshape(tokens, shape.q_width), wo)
        return F.linear(F.silu(F.linear(hidden, wg)) * F.linear(hidden, wu), wd)

    with torch.inference_mode():
        return best_seconds(layer, repeats)


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``run``, after one untimed call that allocates and picks kernels."""
    run()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def cpu_description() -> tuple[str, str]:
    """This CPU's model name and flags from ``/proc/cpuinfo`` (``"unknown cpu"`` and no flags where there is none)."""
    cpu, flags = "unknown cpu", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown cpu":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu, flags


def machine_key(shape: LayerShape) -> str:
    """What the timings hold for: this CPU model and flags, torch, the thread count and the layer shape."""
    cpu, flags = cpu_description()
    flags_digest = hashlib.sha256(flags.encode()).hexdigest()[:12]
    sizes = "-".join(str(value) for value in asdict(shape).values())
    return f"{cpu} (flags {flags_digest}) | torch {torch.__version__} | {torch.get_num_threads()} threads | {sizes}"


def probe_file() -> Path:
    """Where the dtype probe's timings are cached, per machine and layer shape."""
    return assets.cache_dir() / PROBE_FILE


def probed_seconds(shape: LayerShape) -> dict[str, float]:
    """Seconds of one layer in each candidate type on this machine: cached, or measured now and cached."""
    path = probe_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or a damaged file: measure again
        cache = {}
    key = machine_key(shape)
    if key not in cache:
        logger.info("measuring which dtype runs this model fastest on this CPU (once per machine)")
        cache[key] = {str(dtype).removeprefix("torch."): time_layer(shape, dtype) for dtype in CANDIDATE_DTYPES}
        with written_atomically(path) as scratch:  # concurrent probes: the last one wins
            scratch.write_text(json.dumps(cache, indent=1))
    return cache[key]


def fastest_cpu_dtype(config: PretrainedConfig) -> torch.dtype:
    """The candidate type in which one layer of ``config``'s shape runs fastest on this CPU (:func:`probed_seconds`)."""
    seconds = probed_seconds(LayerShape.from_config(config))
    fastest = min(seconds, key=seconds.get)
    logger.info("dtype auto: %s on this CPU (one layer: %s; probe cached in %s)", fastest,
                ", ".join(f"{name} {value * 1e3:.0f} ms" for name, value in seconds.items()), probe_file())
    return getattr(torch, fastest)
