"""Export factors as a Hugging Face ``rope_parameters`` block that stock transformers loads.

Stock transformers' ``longrope`` uses ``short_factor`` while the input is at most
``original_max_position_embeddings`` tokens and ``long_factor`` beyond, with one
``attention_factor`` for both. It has no notion of start tokens (n_hat): an
exported model with ``start_tokens > 0`` behaves as if n_hat were 0.

vLLM and SGLang read the same block but ignore ``attention_factor``: they scale by ``short_mscale`` and
``long_mscale`` (defaulting to sqrt(1 + ln s / ln L0)), so the block carries those too, the long one equal
to the searched attention scaling and the short one to the short factors' (1 for the original RoPE).
transformers warns that it does not know these two keys and otherwise ignores them.

The lengths (``original_max_position_embeddings``, ``factor``, ``max_position_embeddings``) come
from the factors, never from the model config: a study may extend a window shorter than the one its
config states (a preset's ``original_length``), and exporting the config's window would keep stock
transformers on the short factors up to that longer window. The config only gives rotary dim and base.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from models.loading import full_attention_config
from models.rope import FactorError, RopeFactors, RopeGeometry

logger = logging.getLogger(__name__)

START_TOKENS_WARNING = (
    "start_tokens (n_hat) = {n} is not representable in an exported model (a Hugging Face config or a "
    "GGUF): transformers, vLLM, SGLang and llama.cpp ignore it and rotate every position with the rescaled "
    "frequencies. Use models.patch.apply_factors to keep n_hat, or search with start_tokens = 0."
)


def rope_parameters(
    long_factors: RopeFactors, geometry: RopeGeometry, short_factors: RopeFactors | None = None
) -> dict[str, Any]:
    """The ``rope_parameters`` dict (rope_type ``longrope``) for ``long_factors``.

    ``geometry`` gives only the base and the number of factors; the window that stock transformers
    switches at (``original_max_position_embeddings``) and ``factor`` are the factors' own
    ``original_length`` and ``scale``. ``short_factors`` defaults to the original RoPE (all 1) for
    inputs within the original window; when given, they must be for the same original window.
    """
    long_factors.validate(geometry)
    short = (1.0,) * geometry.num_factors if short_factors is None else short_factors.rescale_factors
    if short_factors is not None:
        short_factors.validate(geometry)
        if short_factors.original_length != long_factors.original_length:
            raise FactorError(f"the short factors are for a {short_factors.original_length}-token original window, "
                              f"the long ones for {long_factors.original_length}: a longrope config has one window")
    for factors in (long_factors, short_factors):
        if factors is not None and factors.start_tokens > 0:
            logger.warning(START_TOKENS_WARNING.format(n=factors.start_tokens))
    return {
        "rope_type": "longrope",
        "rope_theta": geometry.base,
        "long_factor": list(long_factors.rescale_factors),
        "short_factor": list(short),
        "factor": long_factors.scale,
        "attention_factor": long_factors.attention_scaling,
        "original_max_position_embeddings": long_factors.original_length,
        "long_mscale": long_factors.attention_scaling,
        "short_mscale": 1.0 if short_factors is None else short_factors.attention_scaling,
    }


def extended_config(config: Any, long_factors: RopeFactors, short_factors: RopeFactors | None = None) -> Any:
    """A copy of a transformers config whose RoPE is ``long_factors`` up to their target length.

    ``max_position_embeddings`` becomes the factors' target length. A config that keeps the original window
    outside ``rope_parameters`` too (Phi-3's ``original_max_position_embeddings``, which transformers prefers
    when it loads) gets the factors' window there as well, and a ``partial_rotary_factor`` inside
    ``rope_parameters`` is kept, since it sets the rotary dim. Sliding-window attention is switched off
    (:func:`models.loading.full_attention_config`), since a window would hide the extended context.
    """
    extended = copy.deepcopy(config)
    block = rope_parameters(long_factors, RopeGeometry.from_config(config), short_factors)
    partial = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor")
    if partial is not None:
        block["partial_rotary_factor"] = partial
    extended.rope_parameters = block
    extended.max_position_embeddings = long_factors.target_length
    if hasattr(extended, "original_max_position_embeddings"):
        extended.original_max_position_embeddings = long_factors.original_length
    changed = full_attention_config(extended)
    if changed:
        logger.info("exported config: sliding-window attention switched off (%s)", ", ".join(changed))
    return extended


def write_rope_parameters(path: str | Path, long_factors: RopeFactors, geometry: RopeGeometry,
                          short_factors: RopeFactors | None = None) -> Path:
    """Write the block (plus ``max_position_embeddings``, the factors' target length) as JSON, ready to paste
    into config.json. Lengths come from the factors, base and rotary dim from ``geometry``."""
    block = {
        "rope_parameters": rope_parameters(long_factors, geometry, short_factors),
        "max_position_embeddings": long_factors.target_length,
    }
    if long_factors.start_tokens > 0:
        block["_note"] = START_TOKENS_WARNING.format(n=long_factors.start_tokens)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(block, indent=2) + "\n")
    return path


def save_extended_model(model: Any, tokenizer: Any, out_dir: str | Path, long_factors: RopeFactors,
                        short_factors: RopeFactors | None = None) -> Path:
    """Save weights, tokenizer and an extended config to ``out_dir`` for ``from_pretrained``."""
    out_dir = Path(out_dir)
    original_config = model.config  # inv_freq is not a saved buffer: only the config carries the factors
    model.config = extended_config(original_config, long_factors, short_factors)
    try:
        model.save_pretrained(out_dir)
    finally:
        model.config = original_config
    tokenizer.save_pretrained(out_dir)
    return out_dir
