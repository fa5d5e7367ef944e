"""What the LongRoPE search varies, as Optuna parameters.

One trial's parameters are the searched rescale factors (``factor_DD``, DD the
rotary pair index, zero-padded to two digits), optionally ``start_tokens``
(n_hat) and optionally ``attention_scaling``. :class:`LongRoPESearchSpace`
maps those parameters to a full :class:`~models.rope.RopeFactors` and back, and
lists the baselines that seed generation 0. :class:`RopeSearchSpace` is what the runner and the
readers need of any space: this one, which the evolutionary sampler searches, and
:class:`hpo.curve_space.MonotoneCurveSpace`, which Optuna's own samplers search.

In LongRoPE2 mode (``critical_dim > 0``) only the pairs at and above the
critical dim ``d_c`` are parameters; the pairs below are derived NTK-like as
``lambda_i = lambda_{d_c} ** (i / d_c)``, which is strictly increasing and below
``lambda_{d_c}`` whenever ``lambda_{d_c} > 1``, so an increasing searched part
always gives an increasing full vector. The searched part follows LongRoPE2's
space (J-shang/LongRoPE, ``evolution/search.py`` and ``algorithms/dim_mono.py``):
each factor in ``[s, length_scale]``, strictly increasing, and the last one at
most ``last_factor_step`` above its neighbour. Several critical dims can be swept
in one study (``critical_dims``): each trial then carries its ``critical_dim`` as
a parameter, its factors between the lowest critical dim and its own are derived
(and stored as derived), and operators keep a lineage's critical dim.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, ClassVar, Self

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from models.baselines import (
    LONGROPE2_INCREMENT,
    linear_interpolation,
    longrope2_initial,
    longrope_attention_scaling,
    ntk_aware,
    yarn,
)
from models.rope import MIN_RESCALE_FACTOR, RopeFactors, RopeGeometry

START_TOKENS_PARAM = "start_tokens"
CRITICAL_DIM_PARAM = "critical_dim"
ATTENTION_SCALING_PARAM = "attention_scaling"
DEFAULT_START_TOKEN_CANDIDATES = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 48, 64)
# LongRoPE (paper, section 3.2): generation 0 is PI, NTK and YaRN and mutants of them.
PAPER_MUTATION_ROOTS = ("pi", "ntk", "yarn")
# LongRoPE2 (reference dim_mono.py): the last searched factor moves at most this far above its neighbour.
LONGROPE2_LAST_FACTOR_STEP = 4.0
# LongRoPE2 (reference genetic_base.py): generation 0 opens with 8 NTK-shaped vectors whose critical
# factors are s, s + 3s/32, ..., s + 21s/32 (32, 35, ..., 53 for s = 32, as in its scripts).
LONGROPE2_NUM_SEEDS = 8
LONGROPE2_SEED_SPACING = 3 / 32


def factor_param_name(dim: int) -> str:
    """Optuna parameter name of rotary pair ``dim``'s rescale factor."""
    return f"factor_{dim:02d}"


class RopeSearchSpace(ABC):
    """What the runner and the readers need of a search space, whatever samples it.

    A space names one trial's Optuna parameters (:meth:`distributions`), maps them to a full
    :class:`~models.rope.RopeFactors` (:meth:`to_factors`), projects any factor set into itself
    (:meth:`to_params`: how the baselines of :meth:`seeds` become the first trials) and describes
    itself as a JSON-able record that :meth:`from_record` reads back; the record's ``kind`` (the
    class's :attr:`kind`) tells :func:`hpo.records.recorded_search_space` which class to read it with.

    Subclasses are frozen dataclasses with the fields declared below. The start tokens (n_hat) and the
    attention scaling are shared: parameters :data:`START_TOKENS_PARAM` and :data:`ATTENTION_SCALING_PARAM`,
    searched when there are several candidates and when a range is given, else fixed (to the first
    candidate and to LongRoPE's default scaling).
    """

    kind: ClassVar[str]
    num_factors: int
    original_length: int
    target_length: int
    start_token_candidates: tuple[int, ...]
    attention_scaling_range: tuple[float, float] | None
    yarn_beta_fast: float
    yarn_beta_slow: float

    @abstractmethod
    def distributions(self) -> dict[str, BaseDistribution]:
        """One Optuna distribution per parameter."""

    @abstractmethod
    def to_factors(self, params: Mapping[str, Any]) -> RopeFactors:
        """The full factor set that ``params`` stand for; ``ValueError`` on a missing parameter."""

    @abstractmethod
    def to_params(self, factors: RopeFactors) -> dict[str, Any]:
        """Parameters of this space closest to ``factors`` (always inside the distributions)."""

    @abstractmethod
    def to_record(self) -> dict[str, Any]:
        """A JSON-able description of the space, ``kind`` included, as stored in a study's user attrs."""

    @classmethod
    @abstractmethod
    def from_record(cls, record: Mapping[str, Any]) -> Self:
        """The space that :meth:`to_record` described."""

    @abstractmethod
    def seeds(self, geometry: RopeGeometry) -> list[RopeFactors]:
        """The baselines that open the search (enqueued through :meth:`to_params`)."""

    def _normalize_extras(self) -> None:
        """In ``__post_init__``: the n_hat candidates as ints, the scaling range as floats."""
        object.__setattr__(self, "start_token_candidates", tuple(int(c) for c in self.start_token_candidates))
        if self.attention_scaling_range is not None:
            low, high = self.attention_scaling_range
            object.__setattr__(self, "attention_scaling_range", (float(low), float(high)))

    def _validate_extras(self) -> None:
        if self.num_factors < 1:
            raise ValueError(f"num_factors must be >= 1, got {self.num_factors}")
        if self.original_length <= 0 or self.target_length <= 0:
            raise ValueError("original_length and target_length must be positive")
        candidates = self.start_token_candidates
        if not candidates or min(candidates) < 0 or len(set(candidates)) != len(candidates):
            raise ValueError(f"start_token_candidates must be distinct integers >= 0, got {candidates}")
        if self.attention_scaling_range is not None:
            low, high = self.attention_scaling_range
            if not 0 < low < high:
                raise ValueError(f"attention_scaling_range must satisfy 0 < low < high, got {(low, high)}")

    @property
    def scale(self) -> float:
        """``s = target / original``, never below 1 (as :func:`models.baselines.length_scale`)."""
        return max(1.0, self.target_length / self.original_length)

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

    def _extra_distributions(self) -> dict[str, BaseDistribution]:
        """The distributions of n_hat and the attention scaling, where searched."""
        space: dict[str, BaseDistribution] = {}
        if self.searches_start_tokens:
            space[START_TOKENS_PARAM] = CategoricalDistribution(self.start_token_candidates)
        if self.attention_scaling_range is not None:
            space[ATTENTION_SCALING_PARAM] = FloatDistribution(*self.attention_scaling_range)
        return space

    def _extra_params(self, factors: RopeFactors) -> dict[str, Any]:
        """``factors``' n_hat at the nearest candidate and its scaling clamped into the range, where searched."""
        params: dict[str, Any] = {}
        if self.searches_start_tokens:
            params[START_TOKENS_PARAM] = min(
                self.start_token_candidates, key=lambda c: (abs(c - factors.start_tokens), c)
            )
        if self.attention_scaling_range is not None:
            low, high = self.attention_scaling_range
            params[ATTENTION_SCALING_PARAM] = min(max(factors.attention_scaling, low), high)
        return params

    def _factors(self, rescale_factors: Sequence[float], params: Mapping[str, Any],
                 metadata: dict[str, Any] | None = None) -> RopeFactors:
        """A full factor set of this space: ``rescale_factors`` with the n_hat and scaling of ``params``."""
        return RopeFactors(
            rescale_factors=tuple(rescale_factors),
            original_length=self.original_length,
            target_length=self.target_length,
            start_tokens=int(params.get(START_TOKENS_PARAM, self.start_token_candidates[0])),
            attention_scaling=float(params.get(ATTENTION_SCALING_PARAM, self.default_attention_scaling)),
            method="longrope",
            metadata=metadata or {},
        )

    def _check_geometry(self, geometry: RopeGeometry) -> None:
        if geometry.num_factors != self.num_factors or geometry.original_length != self.original_length:
            raise ValueError(
                f"geometry has {geometry.num_factors} factors and window {geometry.original_length}; "
                f"the search space has {self.num_factors} and {self.original_length}"
            )

    def baseline_seeds(self, geometry: RopeGeometry) -> list[RopeFactors]:
        """PI, NTK-aware, YaRN (inverse frequencies blended, as YaRN defines it) and YaRN with factors
        blended linearly (the reference's seed), both with this space's betas."""
        self._check_geometry(geometry)
        betas = {"beta_fast": self.yarn_beta_fast, "beta_slow": self.yarn_beta_slow}
        return [
            linear_interpolation(geometry, self.target_length),
            ntk_aware(geometry, self.target_length),
            yarn(geometry, self.target_length, **betas),
            yarn(geometry, self.target_length, **betas, blend="factor"),
        ]

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

    def _check_params(self, params: Mapping[str, Any]) -> None:
        missing = [name for name in self.distributions() if name not in params]
        if missing:
            raise ValueError(f"params lack {', '.join(missing)}")


@dataclass(frozen=True)
class LongRoPESearchSpace(RopeSearchSpace):
    """The LongRoPE search space for one model geometry and one target length.

    Args:
        num_factors: rotary pairs (``rotary_dim / 2``), i.e. the length of a full factor vector.
        original_length: the model's pretrained window ``L0``.
        target_length: the window the factors are searched for.
        min_factor: lower bound of every searched factor; ``None`` means 1 (factors only
            interpolate), or ``s`` in LongRoPE2 mode (the dims from ``d_c`` on are at least fully
            interpolated). Always a float after construction.
        max_factor: upper bound of every searched factor; ``None`` means ``s + 1`` (the reference
            lets the last dim go up to about ``1 + s``), or ``2 s`` in LongRoPE2 mode (its
            ``length_scale``: 64 for s = 32 in the reference's phi-4 script). Always a float after
            construction.
        step: the mutation grid; mutated factors land on multiples of ``step``.
        start_token_candidates: the n_hat values tried; a single candidate means n_hat is fixed
            to it and is not a parameter.
        attention_scaling_range: ``(low, high)`` when the attention scaling is searched;
            ``None`` fixes it to LongRoPE's default ``sqrt(1 + ln s / ln L0)``.
        critical_dim: LongRoPE2's ``d_c``; ``0`` searches every dim (plain LongRoPE). In LongRoPE2
            mode the searched factors are strictly increasing and the last one is at most
            :data:`LONGROPE2_LAST_FACTOR_STEP` above its neighbour.
        yarn_beta_fast, yarn_beta_slow: the YaRN seeds' ramp (32 and 1; the reference uses 128
            and 2 for Mistral).
        critical_dims: LongRoPE2 critical dims swept in one study (the reference tries several per
            model: 27 for Phi-3, 30 for Phi-4, 33 for Llama-3); ``critical_dim`` is then their
            lowest. Empty means ``(critical_dim,)``.
    """

    num_factors: int
    original_length: int
    target_length: int
    min_factor: float | None = None
    max_factor: float | None = None
    step: float = 0.01
    start_token_candidates: tuple[int, ...] = DEFAULT_START_TOKEN_CANDIDATES
    attention_scaling_range: tuple[float, float] | None = None
    critical_dim: int = 0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    critical_dims: tuple[int, ...] = ()

    kind: ClassVar[str] = "longrope"

    def __post_init__(self) -> None:
        swept = tuple(sorted({int(c) for c in self.critical_dims} or {self.critical_dim}))
        object.__setattr__(self, "critical_dims", swept)
        object.__setattr__(self, "critical_dim", swept[0])
        if self.min_factor is None:
            object.__setattr__(self, "min_factor", self.scale if self.longrope2 else MIN_RESCALE_FACTOR)
        if self.max_factor is None:
            object.__setattr__(self, "max_factor", 2 * self.scale if self.longrope2 else self.scale + 1.0)
        object.__setattr__(self, "min_factor", float(self.min_factor))
        object.__setattr__(self, "max_factor", float(self.max_factor))
        self._normalize_extras()
        self._validate()

    def _validate(self) -> None:
        self._validate_extras()
        if not MIN_RESCALE_FACTOR <= self.lower < self.upper:
            raise ValueError(
                f"need {MIN_RESCALE_FACTOR} <= min_factor < max_factor, got {self.lower} and {self.upper}"
            )
        if not self.step > 0:
            raise ValueError(f"step must be positive, got {self.step}")
        if self.longrope2 and self.lower + (len(self.factor_names) - 1) * self.step > self.upper + 1e-9:
            raise ValueError(f"{len(self.factor_names)} strictly increasing factors on a {self.step} grid do not fit "
                             f"in [{self.lower}, {self.upper}]: raise the upper bound (length_scale)")
        if not 0 <= self.critical_dim <= self.critical_dims[-1] < self.num_factors:
            raise ValueError(f"critical_dim must be in 0..{self.num_factors - 1}, got {self.critical_dims}")
        if self.critical_dim == 0 and len(self.critical_dims) > 1:
            raise ValueError("a sweep of critical dims is LongRoPE2's: every swept value must be >= 1")

    @property
    def longrope2(self) -> bool:
        """LongRoPE2 mode: only the dims from the critical dim on are searched, in LongRoPE2's space."""
        return self.critical_dim > 0

    @property
    def lower(self) -> float:
        """``min_factor`` as a plain float (it is never ``None`` after construction)."""
        assert self.min_factor is not None
        return self.min_factor

    @property
    def upper(self) -> float:
        """``max_factor`` as a plain float (it is never ``None`` after construction)."""
        assert self.max_factor is not None
        return self.max_factor

    @property
    def last_factor_step(self) -> float | None:
        """How far the last searched factor may rise above its neighbour (LongRoPE2), else ``None``."""
        return LONGROPE2_LAST_FACTOR_STEP if self.longrope2 else None

    @property
    def factor_names(self) -> tuple[str, ...]:
        """Parameter names of the searched factors, lowest dim first."""
        return tuple(factor_param_name(dim) for dim in range(self.critical_dim, self.num_factors))

    @property
    def sweeps_critical_dim(self) -> bool:
        return len(self.critical_dims) > 1

    def critical_dim_of(self, params: Mapping[str, Any]) -> int:
        """The critical dim a parameter set was searched with."""
        return int(params.get(CRITICAL_DIM_PARAM, self.critical_dim))

    def searched_names(self, params: Mapping[str, Any]) -> tuple[str, ...]:
        """Names of the factors ``params`` searched: from its critical dim on."""
        return self.factor_names[self.critical_dim_of(params) - self.critical_dim :]

    def with_derived(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` with the factors below its critical dim (above the lowest swept one) re-derived from
        the factor at its critical dim, as :meth:`to_factors` derives them."""
        critical_dim = self.critical_dim_of(params)
        derived = dict(params)
        top = float(params[factor_param_name(critical_dim)])
        for dim in range(self.critical_dim, critical_dim):
            derived[factor_param_name(dim)] = top ** (dim / critical_dim)
        return derived

    def distributions(self) -> dict[str, BaseDistribution]:
        """One Optuna distribution per parameter.

        Factor distributions have no ``step``: enqueued baselines sit off the mutation grid,
        and Optuna would reject them as out of the distribution.
        """
        # factors below the highest swept critical dim are derived (below s) in some trials
        highest = self.critical_dims[-1]
        space: dict[str, BaseDistribution] = {
            factor_param_name(dim): FloatDistribution(MIN_RESCALE_FACTOR if dim < highest else self.lower, self.upper)
            for dim in range(self.critical_dim, self.num_factors)
        }
        if self.sweeps_critical_dim:
            space[CRITICAL_DIM_PARAM] = CategoricalDistribution(self.critical_dims)
        return space | self._extra_distributions()

    def to_factors(self, params: Mapping[str, Any]) -> RopeFactors:
        """The full factor set (derived dims included) that ``params`` stand for.

        Values are taken as given (no clamping); use :meth:`to_params` first to repair
        out-of-bounds or non-monotone values. Raises ``ValueError`` on a missing parameter.
        """
        self._check_params(params)
        critical_dim = self.critical_dim_of(params)
        searched = [float(params[name]) for name in self.searched_names(params)]
        derived = [searched[0] ** (dim / critical_dim) for dim in range(critical_dim)]
        return self._factors(derived + searched, params,
                             {"critical_dim": critical_dim} if self.sweeps_critical_dim else None)

    def to_params(self, factors: RopeFactors) -> dict[str, Any]:
        """The parameters closest to ``factors`` inside this space (used to enqueue seeds).

        Searched factors are clamped into ``[min_factor, max_factor]`` and then raised to a
        running maximum, so the result is always monotone; in LongRoPE2 mode each is raised to at
        least one ``step`` above its left neighbour, the last is capped at ``last_factor_step``
        above it, and factors pushed past ``max_factor`` are lowered from the right, one ``step``
        apart, so the result is strictly increasing and in bounds. Dims below ``critical_dim`` are
        not parameters: :meth:`to_factors` re-derives them, so the round trip changes them unless
        they already follow ``lambda_{d_c} ** (i / d_c)``; with a sweep, ``d_c`` is
        ``factors.metadata["critical_dim"]`` when it is one of the swept values, else the lowest.
        ``start_tokens`` goes to the nearest candidate, ``attention_scaling`` is clamped into its
        range; both are dropped when not searched.
        """
        if factors.num_factors != self.num_factors:
            raise ValueError(f"{factors.num_factors} factors given, the search space has {self.num_factors}")
        critical_dim = factors.metadata.get("critical_dim")
        critical_dim = critical_dim if critical_dim in self.critical_dims else self.critical_dim
        gap = self.step if self.longrope2 else 0.0
        values: list[float] = []
        for value in factors.rescale_factors[critical_dim:]:
            value = min(max(value, self.lower), self.upper)
            values.append(max(value, values[-1] + gap) if values else value)
        if self.last_factor_step is not None and len(values) > 1:
            values[-1] = min(values[-1], values[-2] + self.last_factor_step)
        ceiling = self.upper
        for j in reversed(range(len(values))):
            values[j] = min(values[j], ceiling)
            ceiling = values[j] - gap
        params: dict[str, Any] = dict(zip(self.factor_names[critical_dim - self.critical_dim :], values, strict=True))
        if self.sweeps_critical_dim:
            params[CRITICAL_DIM_PARAM] = critical_dim
            params = self.with_derived(params)
        return params | self._extra_params(factors)

    def to_record(self) -> dict[str, Any]:
        """A JSON-able description of the space, as stored in a study's user attrs."""
        return {"kind": self.kind, "num_factors": self.num_factors, "original_length": self.original_length,
                "target_length": self.target_length, "critical_dim": self.critical_dim,
                "min_factor": self.lower, "max_factor": self.upper, "start_tokens": list(self.start_token_candidates),
                "attention_scaling": list(self.attention_scaling_range or []) or None,
                "yarn_betas": [self.yarn_beta_fast, self.yarn_beta_slow], "critical_dims": list(self.critical_dims)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> LongRoPESearchSpace:
        """The space that :meth:`to_record` described (records of older versions get today's defaults)."""
        scaling = record["attention_scaling"]
        beta_fast, beta_slow = record.get("yarn_betas", (32.0, 1.0))
        return cls(num_factors=record["num_factors"], original_length=record["original_length"],
                   target_length=record["target_length"], min_factor=record.get("min_factor"),
                   max_factor=record["max_factor"], start_token_candidates=tuple(record["start_tokens"]),
                   attention_scaling_range=tuple(scaling) if scaling else None, critical_dim=record["critical_dim"],
                   yarn_beta_fast=beta_fast, yarn_beta_slow=beta_slow,
                   critical_dims=tuple(record.get("critical_dims", ())))

    def is_increasing(self, vector: Sequence[float]) -> bool:
        """Whether the searched part of a factor vector is ordered as this space requires:
        non-decreasing (LongRoPE), or strictly increasing with the last step capped (LongRoPE2)."""
        if not self.longrope2:
            return all(a <= b for a, b in pairwise(vector))
        ordered = all(a < b for a, b in pairwise(vector))
        cap = self.last_factor_step
        return ordered and (cap is None or len(vector) < 2 or vector[-1] - vector[-2] <= cap + 1e-9)

    def seeds(self, geometry: RopeGeometry) -> list[RopeFactors]:
        """The vectors that open the search (generation 0 is these and mutants of :meth:`mutation_roots`).

        LongRoPE: PI, NTK-aware, YaRN (inverse frequencies blended, as YaRN defines it) and YaRN
        with factors blended linearly (the reference's seed), both with this space's betas.
        LongRoPE2: :data:`LONGROPE2_NUM_SEEDS` NTK-shaped vectors
        (:func:`~models.baselines.longrope2_initial`) with critical factors from ``s`` up in steps
        of ``LONGROPE2_SEED_SPACING * s``, each inside the space (as the reference's ``ntk_init``);
        the plain baselines would sit below ``s`` from the critical dim on (YaRN's factor there is
        about 8.5 for Llama-3 at 128k, s = 16), outside LongRoPE2's space.
        Raises ``ValueError`` when ``geometry`` does not match the space.
        """
        if not self.longrope2:
            return self.baseline_seeds(geometry)
        self._check_geometry(geometry)
        return [seed for dim in self.critical_dims for seed in self._longrope2_seeds(geometry, dim)]

    def _longrope2_seeds(self, geometry: RopeGeometry, critical_dim: int) -> list[RopeFactors]:
        # the highest critical factor whose rising tail still ends inside the space
        top = self.upper - LONGROPE2_INCREMENT * (self.num_factors - critical_dim - 1)
        critical_factors = sorted({min(self.scale * (1 + LONGROPE2_SEED_SPACING * k), max(top, self.lower))
                                   for k in range(LONGROPE2_NUM_SEEDS)})
        return [longrope2_initial(geometry, self.target_length, critical_dim=critical_dim, critical_factor=factor)
                for factor in critical_factors]

    @property
    def mutation_roots(self) -> tuple[str, ...]:
        """Methods of the seeds whose mutants fill generation 0 by default: PI, NTK and YaRN, as the
        LongRoPE paper builds its initial population; every NTK-shaped start in LongRoPE2 mode."""
        return ("longrope2-init",) if self.longrope2 else PAPER_MUTATION_ROOTS
