"""What the LongRoPE search varies, as Optuna parameters.

One trial's parameters are the searched rescale factors (``factor_DD``, DD the
rotary pair index, zero-padded to two digits), optionally ``start_tokens``
(n_hat) and optionally ``attention_scaling``. :class:`LongRoPESearchSpace`
maps those parameters to a full :class:`~models.rope.RopeFactors` and back, and
lists the baselines that seed generation 0.

In LongRoPE2 mode (``critical_dim > 0``) only the pairs at and above the
critical dim ``d_c`` are parameters; the pairs below are derived NTK-like as
``lambda_i = lambda_{d_c} ** (i / d_c)``, which is monotone and never above
``lambda_{d_c}`` whenever ``lambda_{d_c} >= 1``, so a monotone searched part
always gives a monotone full vector.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from models.baselines import linear_interpolation, longrope2_initial, longrope_attention_scaling, ntk_aware, yarn
from models.rope import MIN_RESCALE_FACTOR, RopeFactors, RopeGeometry

START_TOKENS_PARAM = "start_tokens"
ATTENTION_SCALING_PARAM = "attention_scaling"
DEFAULT_START_TOKEN_CANDIDATES = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 48, 64)


def factor_param_name(dim: int) -> str:
    """Optuna parameter name of rotary pair ``dim``'s rescale factor."""
    return f"factor_{dim:02d}"


@dataclass(frozen=True)
class LongRoPESearchSpace:
    """The LongRoPE search space for one model geometry and one target length.

    Args:
        num_factors: rotary pairs (``rotary_dim / 2``), i.e. the length of a full factor vector.
        original_length: the model's pretrained window ``L0``.
        target_length: the window the factors are searched for.
        min_factor: lower bound of every searched factor (>= 1: factors only interpolate).
        max_factor: upper bound of every searched factor; ``None`` means ``s + 1`` with
            ``s = target / original`` (the reference lets the last dim go up to about ``1 + s``).
            Always a float after construction.
        step: the mutation grid; mutated factors land on multiples of ``step``.
        start_token_candidates: the n_hat values tried; a single candidate means n_hat is fixed
            to it and is not a parameter.
        attention_scaling_range: ``(low, high)`` when the attention scaling is searched;
            ``None`` fixes it to LongRoPE's default ``sqrt(1 + ln s / ln L0)``.
        critical_dim: LongRoPE2's ``d_c``; ``0`` searches every dim (plain LongRoPE).
    """

    num_factors: int
    original_length: int
    target_length: int
    min_factor: float = 1.0
    max_factor: float | None = None
    step: float = 0.01
    start_token_candidates: tuple[int, ...] = DEFAULT_START_TOKEN_CANDIDATES
    attention_scaling_range: tuple[float, float] | None = None
    critical_dim: int = 0

    def __post_init__(self) -> None:
        if self.max_factor is None:
            object.__setattr__(self, "max_factor", self.scale + 1.0)
        object.__setattr__(self, "start_token_candidates", tuple(int(c) for c in self.start_token_candidates))
        if self.attention_scaling_range is not None:
            low, high = self.attention_scaling_range
            object.__setattr__(self, "attention_scaling_range", (float(low), float(high)))
        self._validate()

    def _validate(self) -> None:
        if self.num_factors < 1:
            raise ValueError(f"num_factors must be >= 1, got {self.num_factors}")
        if self.original_length <= 0 or self.target_length <= 0:
            raise ValueError("original_length and target_length must be positive")
        if not MIN_RESCALE_FACTOR <= self.min_factor < self.upper:
            raise ValueError(
                f"need {MIN_RESCALE_FACTOR} <= min_factor < max_factor, got {self.min_factor} and {self.upper}"
            )
        if not self.step > 0:
            raise ValueError(f"step must be positive, got {self.step}")
        candidates = self.start_token_candidates
        if not candidates or min(candidates) < 0 or len(set(candidates)) != len(candidates):
            raise ValueError(f"start_token_candidates must be distinct integers >= 0, got {candidates}")
        if self.attention_scaling_range is not None:
            low, high = self.attention_scaling_range
            if not 0 < low < high:
                raise ValueError(f"attention_scaling_range must satisfy 0 < low < high, got {(low, high)}")
        if not 0 <= self.critical_dim < self.num_factors:
            raise ValueError(f"critical_dim must be in 0..{self.num_factors - 1}, got {self.critical_dim}")

    @property
    def scale(self) -> float:
        """``s = target / original``, never below 1 (as :func:`models.baselines.length_scale`)."""
        return max(1.0, self.target_length / self.original_length)

    @property
    def upper(self) -> float:
        """``max_factor`` as a plain float (it is never ``None`` after construction)."""
        assert self.max_factor is not None
        return self.max_factor

    @property
    def factor_names(self) -> tuple[str, ...]:
        """Parameter names of the searched factors, lowest dim first."""
        return tuple(factor_param_name(dim) for dim in range(self.critical_dim, self.num_factors))

    @property
    def searches_start_tokens(self) -> bool:
        return len(self.start_token_candidates) > 1

    @property
    def searches_attention_scaling(self) -> bool:
        return self.attention_scaling_range is not None

    @property
    def default_attention_scaling(self) -> float:
        """The attention scaling used when it is not searched: LongRoPE's default."""
        return longrope_attention_scaling(self.scale, self.original_length)

    def distributions(self) -> dict[str, BaseDistribution]:
        """One Optuna distribution per parameter.

        Factor distributions have no ``step``: enqueued baselines sit off the mutation grid,
        and Optuna would reject them as out of the distribution.
        """
        space: dict[str, BaseDistribution] = {
            name: FloatDistribution(self.min_factor, self.upper) for name in self.factor_names
        }
        if self.searches_start_tokens:
            space[START_TOKENS_PARAM] = CategoricalDistribution(self.start_token_candidates)
        if self.attention_scaling_range is not None:
            space[ATTENTION_SCALING_PARAM] = FloatDistribution(*self.attention_scaling_range)
        return space

    def suggest(self, trial: optuna.Trial) -> RopeFactors:
        """Ask ``trial`` for every parameter of this space and return the full factor set."""
        params: dict[str, Any] = {}
        for name, distribution in self.distributions().items():
            if isinstance(distribution, CategoricalDistribution):
                params[name] = trial.suggest_categorical(name, distribution.choices)
            else:
                assert isinstance(distribution, FloatDistribution)
                params[name] = trial.suggest_float(name, distribution.low, distribution.high)
        return self.to_factors(params)

    def has_all_params(self, params: Mapping[str, Any]) -> bool:
        """Whether ``params`` holds every parameter of this space (extra keys are allowed)."""
        return all(name in params for name in self.distributions())

    def to_factors(self, params: Mapping[str, Any]) -> RopeFactors:
        """The full factor set (derived dims included) that ``params`` stand for.

        Values are taken as given (no clamping); use :meth:`to_params` first to repair
        out-of-bounds or non-monotone values. Raises ``ValueError`` on a missing parameter.
        """
        missing = [name for name in self.distributions() if name not in params]
        if missing:
            raise ValueError(f"params lack {', '.join(missing)}")
        searched = [float(params[name]) for name in self.factor_names]
        derived = [searched[0] ** (dim / self.critical_dim) for dim in range(self.critical_dim)]
        return RopeFactors(
            rescale_factors=tuple(derived + searched),
            original_length=self.original_length,
            target_length=self.target_length,
            start_tokens=int(params.get(START_TOKENS_PARAM, self.start_token_candidates[0])),
            attention_scaling=float(params.get(ATTENTION_SCALING_PARAM, self.default_attention_scaling)),
            method="longrope",
        )

    def to_params(self, factors: RopeFactors) -> dict[str, Any]:
        """The parameters closest to ``factors`` inside this space (used to enqueue seeds).

        Searched factors are clamped into ``[min_factor, max_factor]`` and then raised to a
        running maximum, so the result is always monotone. Dims below ``critical_dim`` are not
        parameters: :meth:`to_factors` re-derives them, so the round trip changes them unless
        they already follow ``lambda_{d_c} ** (i / d_c)``. ``start_tokens`` goes to the nearest
        candidate, ``attention_scaling`` is clamped into its range; both are dropped when not searched.
        """
        if factors.num_factors != self.num_factors:
            raise ValueError(f"{factors.num_factors} factors given, the search space has {self.num_factors}")
        params: dict[str, Any] = {}
        running = self.min_factor
        for name, value in zip(self.factor_names, factors.rescale_factors[self.critical_dim :], strict=True):
            running = max(running, min(max(value, self.min_factor), self.upper))
            params[name] = running
        if self.searches_start_tokens:
            params[START_TOKENS_PARAM] = min(
                self.start_token_candidates, key=lambda c: (abs(c - factors.start_tokens), c)
            )
        if self.attention_scaling_range is not None:
            low, high = self.attention_scaling_range
            params[ATTENTION_SCALING_PARAM] = min(max(factors.attention_scaling, low), high)
        return params

    def to_record(self) -> dict[str, Any]:
        """A JSON-able description of the space, as stored in a study's user attrs."""
        return {"num_factors": self.num_factors, "original_length": self.original_length,
                "target_length": self.target_length, "critical_dim": self.critical_dim,
                "max_factor": self.upper, "start_tokens": list(self.start_token_candidates),
                "attention_scaling": list(self.attention_scaling_range or []) or None}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> LongRoPESearchSpace:
        """The space that :meth:`to_record` described."""
        scaling = record["attention_scaling"]
        return cls(num_factors=record["num_factors"], original_length=record["original_length"],
                   target_length=record["target_length"], max_factor=record["max_factor"],
                   start_token_candidates=tuple(record["start_tokens"]),
                   attention_scaling_range=tuple(scaling) if scaling else None, critical_dim=record["critical_dim"])

    @staticmethod
    def is_monotone(vector: Sequence[float]) -> bool:
        """Whether ``vector`` is non-decreasing, as LongRoPE requires of its factors."""
        return all(a <= b for a, b in pairwise(vector))

    def seeds(self, geometry: RopeGeometry) -> list[RopeFactors]:
        """The baselines that open the search: PI, NTK-aware, YaRN, and LongRoPE2's start.

        The LongRoPE2 start (with this space's ``critical_dim``) is included only when
        ``critical_dim > 0``. Raises ``ValueError`` when ``geometry`` does not match the space.
        """
        if geometry.num_factors != self.num_factors or geometry.original_length != self.original_length:
            raise ValueError(
                f"geometry has {geometry.num_factors} factors and window {geometry.original_length}; "
                f"the search space has {self.num_factors} and {self.original_length}"
            )
        seeds = [
            linear_interpolation(geometry, self.target_length),
            ntk_aware(geometry, self.target_length),
            yarn(geometry, self.target_length),
        ]
        if self.critical_dim > 0:
            seeds.append(longrope2_initial(geometry, self.target_length, critical_dim=self.critical_dim))
        return seeds
