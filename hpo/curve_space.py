"""A low-dimensional family of monotone factor curves, for Optuna's own samplers (TPE, CMA-ES, GP).

LongRoPE's evolutionary sampler searches one parameter per rotary pair and keeps the vector
non-decreasing with its operators. Samplers that know nothing of that order search this family
instead, in which every point of the unit cube is a valid curve:

- ``K`` knots (default 4) at the rotary pairs ``p_k = floor(k (n - 1) / (K - 1) + 1/2)``, ``k = 0 .. K-1``,
  ``n`` the number of pairs: evenly spread from the first pair to the last, so no pair lies outside the knots;
- parameters ``curve_knot_k`` (:func:`knot_param_name`) ``z_k`` in ``[0, 1]``, turned into cumulative shares
  ``h_k = h_{k-1} + z_k (1 - h_{k-1})`` with ``h_{-1} = 0``: non-decreasing, in ``[0, 1]``;
- ``log lambda(p_k) = h_k log M`` with ``M`` the largest factor (default ``s + 1``, LongRoPE's bound), and
  ``log lambda`` piecewise linear in the pair index between knots.

So ``lambda`` is non-decreasing in the pair index and within ``[1, M]`` for any parameters. A knot at the
first pair, rather than a fixed ``lambda_0 = 1``, keeps PI (constant ``s``) in the family; NTK-aware
(``log lambda`` linear in the pair index, from 0) is in it too whenever its largest factor is at most
``M``; YaRN's ramp is approximated. :func:`curve_factors` is the map, :func:`curve_shares` its
inverse on the knots; :class:`MonotoneCurveSpace` adds the start tokens and the attention scaling,
with the same parameter names and ranges as :class:`~hpo.search_space.LongRoPESearchSpace`.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from optuna.distributions import BaseDistribution, FloatDistribution

from hpo.search_space import DEFAULT_START_TOKEN_CANDIDATES, RopeSearchSpace
from models.rope import MIN_RESCALE_FACTOR, RopeFactors, RopeGeometry

DEFAULT_KNOTS = 4


def knot_param_name(knot: int) -> str:
    """Optuna parameter name of knot ``knot``'s share."""
    return f"curve_knot_{knot}"


def knot_positions(num_factors: int, knots: int) -> tuple[int, ...]:
    """The rotary pairs of the ``knots`` knots: ``floor(k (n - 1) / (K - 1) + 1/2)``, first pair to last.

    Distinct and increasing for ``2 <= knots <= num_factors`` (consecutive knots are at least one pair
    apart before rounding, and rounding half up keeps that); ``ValueError`` otherwise.
    """
    if not 2 <= knots <= num_factors:
        raise ValueError(f"a curve over {num_factors} rotary pairs needs 2 to {num_factors} knots, got {knots}")
    return tuple(math.floor(k * (num_factors - 1) / (knots - 1) + 0.5) for k in range(knots))


def cumulative_shares(shares: Sequence[float]) -> list[float]:
    """``h_k = h_{k-1} + z_k (1 - h_{k-1})``, ``h_{-1} = 0``: non-decreasing in ``[0, 1]`` for ``z_k`` in ``[0, 1]``."""
    heights, height = [], 0.0
    for share in shares:
        height = min(height + share * (1.0 - height), 1.0)
        heights.append(height)
    return heights


def curve_factors(shares: Sequence[float], num_factors: int, max_factor: float) -> tuple[float, ...]:
    """The per-pair factors of the curve with knot parameters ``shares`` (each in ``[0, 1]``).

    ``log lambda`` is ``h_k log(max_factor)`` at knot ``k`` (:func:`cumulative_shares`) and linear in the pair
    index between knots. The result is non-decreasing and within ``[1, max_factor]``; the running maximum and
    the clamp only absorb one-ulp rounding of the interpolation and of ``exp``.
    """
    if not max_factor > MIN_RESCALE_FACTOR:
        raise ValueError(f"max_factor must be above {MIN_RESCALE_FACTOR}, got {max_factor}")
    positions = knot_positions(num_factors, len(shares))
    logs = [height * math.log(max_factor) for height in cumulative_shares(shares)]
    factors: list[float] = []
    for pair in range(num_factors):
        k = min(bisect.bisect_right(positions, pair), len(positions) - 1) - 1  # the knots at k, k + 1 enclose pair
        start, end = positions[k], positions[k + 1]
        value = logs[k] + (pair - start) / (end - start) * (logs[k + 1] - logs[k])
        factors.append(min(max(math.exp(value), MIN_RESCALE_FACTOR, factors[-1] if factors else 0.0), max_factor))
    return tuple(factors)


def curve_shares(factors: Sequence[float], knots: int, max_factor: float) -> list[float]:
    """Knot parameters of the curve of the family closest to ``factors`` at the knots: the inverse of
    :func:`curve_factors` on the curves of the family.

    ``factors`` is read at the knot pairs only, clamped into ``[1, max_factor]`` and raised to a running
    maximum, so any vector (a baseline, say) projects to valid parameters; between the knots the projected
    curve is log-linear whatever ``factors`` does there. A share after a knot at ``max_factor`` is 0.
    """
    positions = knot_positions(len(factors), knots)
    log_max = math.log(max_factor)
    heights, height = [], 0.0
    for pair in positions:
        height = max(height, min(max(math.log(max(factors[pair], MIN_RESCALE_FACTOR)) / log_max, 0.0), 1.0))
        heights.append(height)
    shares, previous = [], 0.0
    for height in heights:
        shares.append(min(max((height - previous) / (1.0 - previous), 0.0), 1.0) if previous < 1.0 else 0.0)
        previous = height
    return shares


@dataclass(frozen=True)
class MonotoneCurveSpace(RopeSearchSpace):
    """The monotone-curve family (module docstring) for one model geometry and one target length.

    Args:
        num_factors: rotary pairs (``rotary_dim / 2``), i.e. the length of a full factor vector.
        original_length: the model's pretrained window ``L0``.
        target_length: the window the factors are searched for.
        knots: how many knots the curve has (``2 .. num_factors``).
        max_factor: the largest factor ``M`` (the curve's top); ``None`` means ``s + 1``, the
            :class:`~hpo.search_space.LongRoPESearchSpace` default. Always a float after construction.
        start_token_candidates: the n_hat values tried; a single candidate fixes n_hat to it.
        attention_scaling_range: ``(low, high)`` when the attention scaling is searched; ``None`` fixes it
            to LongRoPE's default ``sqrt(1 + ln s / ln L0)``.
        yarn_beta_fast, yarn_beta_slow: the YaRN seeds' ramp.
    """

    num_factors: int
    original_length: int
    target_length: int
    knots: int = DEFAULT_KNOTS
    max_factor: float | None = None
    start_token_candidates: tuple[int, ...] = DEFAULT_START_TOKEN_CANDIDATES
    attention_scaling_range: tuple[float, float] | None = None
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0

    kind: ClassVar[str] = "monotone-curve"

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_factor", float(self.scale + 1.0 if self.max_factor is None else self.max_factor))
        self._normalize_extras()
        self._validate_extras()
        curve_factors([0.0] * self.knots, self.num_factors, self.top)  # raises on bad knots or max_factor

    @property
    def top(self) -> float:
        """``max_factor`` as a plain float (it is never ``None`` after construction)."""
        assert self.max_factor is not None
        return self.max_factor

    @property
    def knot_names(self) -> tuple[str, ...]:
        return tuple(knot_param_name(k) for k in range(self.knots))

    def distributions(self) -> dict[str, BaseDistribution]:
        """A ``[0, 1]`` share per knot, then n_hat and the attention scaling where searched."""
        space: dict[str, BaseDistribution] = {name: FloatDistribution(0.0, 1.0) for name in self.knot_names}
        return space | self._extra_distributions()

    def to_factors(self, params: Mapping[str, Any]) -> RopeFactors:
        """The curve's factors (:func:`curve_factors`) with ``params``' n_hat and scaling."""
        self._check_params(params)
        shares = [float(params[name]) for name in self.knot_names]
        return self._factors(curve_factors(shares, self.num_factors, self.top), params)

    def to_params(self, factors: RopeFactors) -> dict[str, Any]:
        """The family's curve through ``factors`` at the knots (:func:`curve_shares`), n_hat at the nearest
        candidate and the scaling clamped into its range (both dropped when not searched)."""
        if factors.num_factors != self.num_factors:
            raise ValueError(f"{factors.num_factors} factors given, the search space has {self.num_factors}")
        shares = curve_shares(factors.rescale_factors, self.knots, self.top)
        return dict(zip(self.knot_names, shares, strict=True)) | self._extra_params(factors)

    def to_record(self) -> dict[str, Any]:
        """The space as JSON types, recorded on the study: a resumed study must be searched in the same one."""
        return {"kind": self.kind, "num_factors": self.num_factors, "original_length": self.original_length,
                "target_length": self.target_length, "knots": self.knots, "max_factor": self.top,
                "start_tokens": list(self.start_token_candidates),
                "attention_scaling": list(self.attention_scaling_range or []) or None,
                "yarn_betas": [self.yarn_beta_fast, self.yarn_beta_slow]}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> MonotoneCurveSpace:
        """The space a :meth:`to_record` record describes."""
        scaling = record["attention_scaling"]
        beta_fast, beta_slow = record["yarn_betas"]
        return cls(num_factors=record["num_factors"], original_length=record["original_length"],
                   target_length=record["target_length"], knots=record["knots"], max_factor=record["max_factor"],
                   start_token_candidates=tuple(record["start_tokens"]),
                   attention_scaling_range=tuple(scaling) if scaling else None,
                   yarn_beta_fast=beta_fast, yarn_beta_slow=beta_slow)

    def seeds(self, geometry: RopeGeometry) -> list[RopeFactors]:
        """PI, NTK-aware, YaRN and the reference's linear YaRN (:meth:`baseline_seeds`), projected by
        :meth:`to_params` when enqueued."""
        return self.baseline_seeds(geometry)
