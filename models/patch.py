"""Set RoPE factors on a loaded transformers model in place, with no weight reload.

transformers 5.x keeps one rotary module (``model.model.rotary_emb``) with a
buffer ``inv_freq`` and a float ``attention_scaling``. Patching overwrites the
buffer, sets the scaling, and forces ``rope_type`` to ``"default"`` on the
module so that dynamic/longrope update logic cannot silently swap the
frequencies back (a ``longrope`` module caches ``long_inv_freq``). Start tokens
(n_hat) are a forward hook that puts the original rotation back for positions
below n_hat, without the attention scaling, as the LongRoPE reference does
(``rope/longrope.py``, ``_add_original_embeddings``): a query-key logit between
two start tokens is then unscaled, and one with a start-token key is scaled by
m, not m^2. :func:`restore_original` undoes all of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from models.rope import FactorError, RopeFactors, RopeGeometry


@dataclass
class _SavedRotary:
    inv_freq: torch.Tensor
    attention_scaling: float
    rope_type: str
    hook: torch.utils.hooks.RemovableHandle | None = None


_SAVED_ATTR = "_longrope_saved"


def rotary_modules(model: nn.Module) -> list[nn.Module]:
    """Every module that computes RoPE cos/sin (one in transformers 5.x llama-family models)."""
    found = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)
             and hasattr(m, "attention_scaling")]
    if not found:
        raise FactorError(f"{type(model).__name__} has no rotary embedding module with an inv_freq buffer")
    return found


def _keep_start_tokens(start_tokens: int, original_inv_freq: torch.Tensor):
    """Forward hook: positions < start_tokens get the original cos/sin back, frequencies and magnitude."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: tuple[torch.Tensor, torch.Tensor]):
        position_ids = kwargs["position_ids"] if "position_ids" in kwargs else args[1]
        cos, sin = output
        if not bool((position_ids < start_tokens).any()):
            return output  # decoding past the start tokens: nothing to restore
        inv_freq = original_inv_freq.to(device=cos.device)
        freqs = position_ids[..., None].float() * inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        keep = (position_ids < start_tokens)[..., None]
        cos = torch.where(keep, angles.cos().to(cos.dtype), cos)
        sin = torch.where(keep, angles.sin().to(sin.dtype), sin)
        return cos, sin

    return hook


def apply_factors(model: nn.Module, factors: RopeFactors) -> None:
    """Make ``model`` use ``factors`` from its next forward on; repeated calls replace earlier ones."""
    geometry = RopeGeometry.from_config(model.config)
    inv_freq, attention_scaling = factors.inv_freq(geometry)
    for module in rotary_modules(model):
        saved = getattr(module, _SAVED_ATTR, None)
        if saved is None:
            saved = _SavedRotary(module.inv_freq.detach().clone(), module.attention_scaling,
                                 getattr(module, "rope_type", "default"))
            setattr(module, _SAVED_ATTR, saved)
        if saved.hook is not None:
            saved.hook.remove()
            saved.hook = None
        if module.inv_freq.shape != inv_freq.shape:
            raise FactorError(f"model rotary module has {module.inv_freq.numel()} frequencies, "
                              f"factors give {inv_freq.numel()}")
        with torch.no_grad():
            module.inv_freq.copy_(inv_freq.to(module.inv_freq.device, module.inv_freq.dtype))
        module.attention_scaling = attention_scaling
        module.rope_type = "default"
        if factors.start_tokens > 0:
            hook = _keep_start_tokens(factors.start_tokens, geometry.original_inv_freq())
            saved.hook = module.register_forward_hook(hook, with_kwargs=True)


def restore_original(model: nn.Module) -> None:
    """Put back the RoPE the model was loaded with; a no-op on an unpatched model."""
    for module in rotary_modules(model):
        saved = getattr(module, _SAVED_ATTR, None)
        if saved is None:
            continue
        if saved.hook is not None:
            saved.hook.remove()
        with torch.no_grad():
            module.inv_freq.copy_(saved.inv_freq)
        module.attention_scaling = saved.attention_scaling
        module.rope_type = saved.rope_type
        delattr(module, _SAVED_ATTR)


@contextmanager
def patched(model: nn.Module, factors: RopeFactors) -> Iterator[nn.Module]:
    """``with patched(model, factors): ...`` runs the block with ``factors``, then restores."""
    apply_factors(model, factors)
    try:
        yield model
    finally:
        restore_original(model)
