"""Write a model with searched RoPE factors as a GGUF that llama.cpp and Ollama run.

llama.cpp's llama architecture reads one optional per-pair tensor, ``rope_freqs.weight`` (``n_rot / 2``
floats), and divides each rotary frequency by it (``theta_i / freq_factors[i]`` in ggml's rope): the same
meaning as LongRoPE's rescale factor, and the form llama.cpp's own converter uses for Llama-3.1's scaling.
The attention scaling goes under ``{arch}.rope.scaling.attn_factor``, which llama.cpp multiplies into cos
and sin as transformers does with ``attention_factor``; the context length becomes the target length.
What a GGUF cannot hold: start tokens (n_hat: every position gets the rescaled frequencies) and a second
factor set for short inputs (the one factor set is used at every length).

Two inputs: a GGUF of the model (the embedded SmolLM2 is one), copied tensor for tensor so its quantization
is kept; or a transformers model and tokenizer (a fine-tuned directory), converted with the tensor names of
the ``gguf`` package and written in float32 or float16.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from models.atomic import written_atomically
from models.export import START_TOKENS_WARNING
from models.rope import RopeFactors, RopeGeometry

logger = logging.getLogger(__name__)

ARCHITECTURES = ("llama",)  # llama.cpp reads rope_freqs for these; Mistral and SmolLM2 GGUFs are "llama" too
ROPE_FREQS = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
WEIGHT_TYPES = {"float32": gguf.GGMLQuantizationType.F32, "float16": gguf.GGMLQuantizationType.F16}


class GgufExportError(ValueError):
    """A model that cannot be written as an extended GGUF."""


def rope_keys(arch: str) -> dict[str, str]:
    """The GGUF metadata keys of ``arch`` that an extended GGUF sets, by what they hold."""
    return {
        "context_length": gguf.Keys.LLM.CONTEXT_LENGTH.format(arch=arch),
        "attention_scaling": gguf.Keys.Rope.SCALING_ATTN_FACTOR.format(arch=arch),
        "original_length": gguf.Keys.Rope.SCALING_ORIG_CTX_LEN.format(arch=arch),
        "rotary_dim": gguf.Keys.Rope.DIMENSION_COUNT.format(arch=arch),
        "base": gguf.Keys.Rope.FREQ_BASE.format(arch=arch),
    }


def _check_factors(factors: RopeFactors, geometry: RopeGeometry) -> None:
    factors.validate(geometry)
    if factors.start_tokens > 0:
        logger.warning(START_TOKENS_WARNING.format(n=factors.start_tokens))


def _add_rope_fields(writer: gguf.GGUFWriter, arch: str, factors: RopeFactors) -> None:
    keys = rope_keys(arch)
    writer.add_uint32(keys["context_length"], factors.target_length)
    writer.add_float32(keys["attention_scaling"], factors.attention_scaling)
    writer.add_uint32(keys["original_length"], factors.original_length)  # informational: no scaling type is set
    writer.add_tensor(ROPE_FREQS, np.asarray(factors.rescale_factors, dtype=np.float32))


@contextmanager
def _gguf_writer(path: Path, arch: str) -> Iterator[gguf.GGUFWriter]:
    """A writer into a scratch file beside ``path``, renamed onto it only once complete."""
    with written_atomically(path) as scratch:
        writer = gguf.GGUFWriter(scratch, arch)
        try:
            yield writer
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()


def gguf_geometry(reader: gguf.GGUFReader) -> tuple[str, RopeGeometry]:
    """``(architecture, RoPE geometry)`` of a GGUF, from its metadata."""
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    if arch not in ARCHITECTURES:
        raise GgufExportError(f"a {arch!r} GGUF cannot carry per-pair RoPE factors here: only {ARCHITECTURES}")
    keys = rope_keys(arch)
    fields = reader.fields
    head_count = fields[gguf.Keys.Attention.HEAD_COUNT.format(arch=arch)].contents()
    embedding = fields[gguf.Keys.LLM.EMBEDDING_LENGTH.format(arch=arch)].contents()
    rotary_dim = fields[keys["rotary_dim"]].contents() if keys["rotary_dim"] in fields else embedding // head_count
    base = fields[keys["base"]].contents() if keys["base"] in fields else 10000.0
    return arch, RopeGeometry(rotary_dim=int(rotary_dim), base=float(base),
                              original_length=int(fields[keys["context_length"]].contents()))


def extend_gguf(source: str | Path, out: str | Path, factors: RopeFactors) -> Path:
    """Copy the GGUF ``source`` to ``out`` with ``factors`` as its RoPE (see the module docstring).

    Every tensor keeps its type (a quantized model stays quantized); metadata is copied except the keys an
    extension sets. A ``rope_freqs`` tensor already in ``source`` (Llama-3.1's) is replaced, not combined:
    searched factors are searched against the plain RoPE.
    """
    source, out = Path(source), Path(out)
    reader = gguf.GGUFReader(source)
    arch, geometry = gguf_geometry(reader)
    _check_factors(factors, geometry)
    keys = rope_keys(arch)
    replaced = {keys[name] for name in ("context_length", "attention_scaling", "original_length")}  # _add_rope_fields
    with _gguf_writer(out, arch) as writer:
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or name == gguf.Keys.General.ARCHITECTURE or name in replaced:
                continue
            value_type = field.types[0]
            sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), value_type, sub_type=sub_type)
        for tensor in reader.tensors:
            if tensor.name == ROPE_FREQS:
                continue
            writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
        _add_rope_fields(writer, arch, factors)
    return out


def _llama_permute(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' q/k rows (each head's halves rotated together) to GGUF's (adjacent pairs rotated)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any) -> None:
    """A byte-level BPE tokenizer as llama.cpp's ``gpt2`` tokenizer model."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend and json.loads(backend.to_str())["model"]
    if not state or state.get("type") != "BPE":
        raise GgufExportError(f"{type(tokenizer).__name__} is not a byte-level BPE tokenizer: only those convert")
    vocab_size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    added = tokenizer.added_tokens_decoder
    control = set(tokenizer.all_special_ids) | {i for i, token in added.items() if token.special}
    token_types = [gguf.TokenType.CONTROL if i in control else
                   gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_add_bos_token(False)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


# llama.cpp names the pre-tokenizer (how text is split before BPE) in the GGUF; it cannot be read off a
# tokenizer. Known tokenizers by their ids of a fixed probe string, else llama.cpp's default split.
PRE_TOKENIZER_PROBE = "Hello World!\n\n 3333 ...  ü"
KNOWN_PRE_TOKENIZERS = {(19556, 2260, 17, 1116, 216, 35, 35, 35, 35, 4563, 216, 5549, 137): "smollm"}


def tokenizer_pre(tokenizer: Any) -> str:
    """llama.cpp's pre-tokenizer name for ``tokenizer``: a known one, else ``default`` (with a warning)."""
    probe = tuple(tokenizer(PRE_TOKENIZER_PROBE, add_special_tokens=False)["input_ids"])
    if probe in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[probe]
    logger.warning("unknown pre-tokenizer: the GGUF uses llama.cpp's default split, so llama.cpp may tokenize "
                   "raw text differently from transformers (token ids fed directly are unaffected)")
    return "default"


def model_to_gguf(model: Any, tokenizer: Any, out: str | Path, factors: RopeFactors,
                  weight_type: str = "float32") -> Path:
    """Write a transformers llama-family model and its tokenizer to ``out`` with ``factors`` as its RoPE.

    Weights are written in ``weight_type`` (``float32`` or ``float16``; norms stay float32, as llama.cpp
    expects); quantize the file with llama.cpp's ``llama-quantize`` if wanted.
    """
    config = model.config
    if config.model_type not in ("llama", "mistral"):
        raise GgufExportError(f"{config.model_type!r} models do not convert here: only llama and mistral "
                              f"(or pass a GGUF of the model)")
    if weight_type not in WEIGHT_TYPES:
        raise GgufExportError(f"weight type {weight_type!r}: choose one of {sorted(WEIGHT_TYPES)}")
    geometry = RopeGeometry.from_config(config)
    _check_factors(factors, geometry)
    arch = "llama"
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    out = Path(out)
    with _gguf_writer(out, arch) as writer:
        writer.add_name(getattr(config, "_name_or_path", "") or "model")
        writer.add_block_count(config.num_hidden_layers)
        writer.add_embedding_length(config.hidden_size)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_rope_dimension_count(geometry.rotary_dim)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_freq_base(geometry.base)
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if weight_type == "float32" else gguf.LlamaFileType.MOSTLY_F16)
        _add_tokenizer(writer, tokenizer)
        tied = getattr(config, "tie_word_embeddings", False)
        for name, tensor in model.state_dict().items():
            if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                continue
            data = tensor.detach().float()
            if name.endswith("q_proj.weight"):
                data = _llama_permute(data, heads)
            elif name.endswith("k_proj.weight"):
                data = _llama_permute(data, kv_heads)
            gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise GgufExportError(f"no GGUF name for {name}")
            dtype = np.float32 if data.ndim == 1 else np.dtype(weight_type)
            writer.add_tensor(gguf_name, data.numpy().astype(dtype))
        _add_rope_fields(writer, arch, factors)
    return out
