"""RoPE rescale factors as data.

RoPE rotates pair ``i`` of a query/key by ``position * theta_i`` with
``theta_i = base ** (-2i / rotary_dim)``. A context-extension method divides each
frequency by a rescale factor: ``theta'_i = theta_i / rescale_factors[i]``
(a factor above 1 interpolates). LongRoPE additionally keeps the first
``start_tokens`` positions on the original RoPE and multiplies cos/sin by an
attention scaling.

:class:`RopeFactors` holds one such setting and round-trips through a JSON file::

    {
      "format": "longrope-hpo/rope-factors",
      "version": 1,
      "method": "longrope",              # free label: none, pi, ntk, yarn, longrope, ...
      "rescale_factors": [1.0, ...],     # rotary_dim / 2 floats, each >= 1
      "start_tokens": 0,                 # n_hat: positions < n_hat keep the original RoPE
      "attention_scaling": 1.08,         # multiplies cos and sin (the "mscale")
      "original_length": 8192,           # the model's pretrained window, in tokens
      "target_length": 16384,            # the window the factors were made for
      "metadata": {}                     # optional provenance (model, study, perplexity)
    }
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.atomic import written_atomically

logger = logging.getLogger(__name__)

FORMAT_NAME = "longrope-hpo/rope-factors"
FORMAT_VERSION = 1
MIN_RESCALE_FACTOR = 1.0  # factors only interpolate: a factor below 1 would extrapolate further


class FactorError(ValueError):
    """A factor set or factor file that cannot be used."""


@dataclass(frozen=True)
class RopeGeometry:
    """What a model's RoPE looks like before any rescaling."""

    rotary_dim: int
    base: float
    original_length: int

    @property
    def num_factors(self) -> int:
        return self.rotary_dim // 2

    @classmethod
    def from_config(cls, config: Any) -> RopeGeometry:
        """Read rotary dim, base and pretrained window from a transformers config."""
        rope = getattr(config, "rope_parameters", None) or {}
        base = rope.get("rope_theta", getattr(config, "rope_theta", None))
        if base is None:
            raise FactorError(f"{type(config).__name__} has no rope_theta: not a RoPE model?")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        original = rope.get("original_max_position_embeddings") or config.max_position_embeddings
        return cls(rotary_dim=int(head_dim * partial), base=float(base), original_length=int(original))

    def original_inv_freq(self) -> torch.Tensor:
        """``theta_i`` for i = 0 .. rotary_dim/2 - 1, in float32."""
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim
        return 1.0 / (self.base**exponents)


@dataclass(frozen=True)
class RopeFactors:
    """One RoPE rescaling: per-dimension factors, start tokens and attention scaling."""

    rescale_factors: tuple[float, ...]
    original_length: int
    target_length: int
    start_tokens: int = 0
    attention_scaling: float = 1.0
    method: str = "longrope"
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rescale_factors", tuple(float(f) for f in self.rescale_factors))
        self.validate()

    @property
    def scale(self) -> float:
        """The extension ratio ``s = target_length / original_length``, never below 1: one meaning everywhere
        (:func:`models.baselines.length_scale`, the search spaces' ``scale``)."""
        return max(1.0, self.target_length / self.original_length)

    @property
    def num_factors(self) -> int:
        return len(self.rescale_factors)

    def validate(self, geometry: RopeGeometry | None = None) -> None:
        """Raise :class:`FactorError` on anything a model could not use.

        With ``geometry``, also check that there is one factor per rotary pair.
        """
        if not self.rescale_factors:
            raise FactorError("rescale_factors is empty")
        bad = [i for i, f in enumerate(self.rescale_factors) if not math.isfinite(f)]
        if bad:
            raise FactorError(f"rescale_factors has non-finite values at dims {bad[:8]}")
        low = [i for i, f in enumerate(self.rescale_factors) if f < MIN_RESCALE_FACTOR]
        if low:
            raise FactorError(
                f"rescale_factors must be >= {MIN_RESCALE_FACTOR} (they only interpolate); "
                f"dims {low[:8]} are below, e.g. {self.rescale_factors[low[0]]}"
            )
        if not (math.isfinite(self.attention_scaling) and self.attention_scaling > 0):
            raise FactorError(f"attention_scaling must be a positive number, got {self.attention_scaling}")
        if isinstance(self.start_tokens, bool) or not isinstance(self.start_tokens, int) or self.start_tokens < 0:
            raise FactorError(f"start_tokens must be an integer >= 0, got {self.start_tokens!r}")
        for name in ("original_length", "target_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise FactorError(f"{name} must be a positive integer, got {value!r}")
        if geometry is not None and self.num_factors != geometry.num_factors:
            raise FactorError(
                f"{self.num_factors} rescale factors given, but the model has rotary dim "
                f"{geometry.rotary_dim}, so it needs {geometry.num_factors}"
            )

    def inv_freq(self, geometry: RopeGeometry) -> tuple[torch.Tensor, float]:
        """``(inv_freq, attention_scaling)`` as transformers' RoPE init functions return them."""
        self.validate(geometry)
        factors = torch.tensor(self.rescale_factors, dtype=torch.float32)
        return geometry.original_inv_freq() / factors, self.attention_scaling

    def to_dict(self) -> dict[str, Any]:
        """The factor file's JSON content (format ``rope-factors``), which :meth:`from_dict` reads back."""
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "method": self.method,
            "rescale_factors": list(self.rescale_factors),
            "start_tokens": self.start_tokens,
            "attention_scaling": self.attention_scaling,
            "original_length": self.original_length,
            "target_length": self.target_length,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RopeFactors:
        """The factors a factor file holds; a :class:`FactorError` for another format or a malformed file."""
        if data.get("format", FORMAT_NAME) != FORMAT_NAME:
            raise FactorError(f"not a rope-factors file: format is {data.get('format')!r}")
        version = data.get("version", FORMAT_VERSION)
        if isinstance(version, bool) or not isinstance(version, int):
            raise FactorError(f"factor file version must be an integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise FactorError(f"factor file version {data['version']} is newer than this tool ({FORMAT_VERSION})")
        missing = [key for key in ("rescale_factors", "original_length", "target_length") if key not in data]
        if missing:
            raise FactorError(f"factor file lacks {', '.join(missing)}")
        if not isinstance(data["rescale_factors"], Sequence) or isinstance(data["rescale_factors"], str):
            raise FactorError("rescale_factors must be a list of numbers")
        try:
            factors = [float(f) for f in data["rescale_factors"]]
        except (TypeError, ValueError) as error:
            raise FactorError(f"rescale_factors must be a list of numbers: {error}") from None
        return cls(
            rescale_factors=tuple(factors),
            original_length=data["original_length"],
            target_length=data["target_length"],
            start_tokens=data.get("start_tokens", 0),
            attention_scaling=float(data.get("attention_scaling", 1.0)),
            method=str(data.get("method", "longrope")),
            metadata=data.get("metadata") or {},
        )

    def save(self, path: str | Path) -> Path:
        """Write the factor file at ``path`` (written whole or not at all), and return the path."""
        with written_atomically(path) as scratch:
            scratch.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, geometry: RopeGeometry | None = None) -> RopeFactors:
        """Read a factor file; with ``geometry``, also check it fits that model.

        Factors made for another original window than ``geometry``'s are used as they are, with a
        warning (:func:`warn_if_other_window`).
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FactorError(f"factor file {path} does not exist") from None
        except UnicodeDecodeError as error:
            raise FactorError(f"cannot read {path}: not UTF-8 text "
                              f"(byte 0x{error.object[error.start]:02x} at offset {error.start})") from None
        except json.JSONDecodeError as error:
            raise FactorError(f"factor file {path} is not valid JSON: {error}") from None
        if not isinstance(data, dict):
            raise FactorError(f"factor file {path} must hold a JSON object")
        try:
            factors = cls.from_dict(data)
            factors.validate(geometry)
        except FactorError as error:
            raise FactorError(f"{path}: {error}") from None
        if geometry is not None:
            warn_if_other_window(factors, geometry.original_length, path)
        return factors


def warn_if_other_window(factors: RopeFactors, original_length: int, source: str | Path | None = None) -> bool:
    """Log one WARNING when ``factors`` extend another original window than the model's ``original_length``.

    Such factors still apply (their rescale factors fit the model's rotary dim), but they were chosen for
    positions relative to another pretrained window, so results may not be what the file promises.
    ``source`` (a factor file) names them in the warning, else their method. Returns True when the windows match.
    """
    if factors.original_length == original_length:
        return True
    what = f"factor file {source}" if source is not None else f"the {factors.method} factors"
    logger.warning("%s: made for an original window of %d tokens (%d -> %d), but the model's is %d tokens; "
                   "applying them as they are", what, factors.original_length, factors.original_length,
                   factors.target_length, original_length)
    return False


def chain_factors(first: RopeFactors, then: RopeFactors) -> RopeFactors:
    """The factors of two extensions applied one after the other (LongRoPE's progressive extension).

    ``first`` takes the model from its original window to ``first.target_length``; ``then`` was
    searched on that extended model, treating ``first.target_length`` as its window. Dividing a
    frequency by one factor and then by the other is dividing it by their product, and the attention
    scalings multiply the same way. Positions below ``then.start_tokens`` keep the original RoPE.
    The stages are kept in ``metadata["stages"]``.

    Raises :class:`FactorError` when ``then`` does not start where ``first`` ends.
    """
    if then.original_length != first.target_length or then.num_factors != first.num_factors:
        raise FactorError(f"cannot chain {then.num_factors} factors for {then.original_length} -> "
                          f"{then.target_length} after {first.num_factors} factors for {first.original_length} -> "
                          f"{first.target_length}: the second must start at the first's target length")
    stages = [*first.metadata.get("stages", [first.to_dict()]), then.to_dict()]
    return RopeFactors(
        rescale_factors=tuple(a * b for a, b in zip(first.rescale_factors, then.rescale_factors, strict=True)),
        original_length=first.original_length,
        target_length=then.target_length,
        start_tokens=then.start_tokens,
        attention_scaling=first.attention_scaling * then.attention_scaling,
        method=then.method,
        metadata={**then.metadata, "stages": stages},
    )
