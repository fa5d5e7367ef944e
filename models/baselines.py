"""Baseline RoPE rescalings as pure functions of the model's RoPE geometry.

Each function turns ``(geometry, target_length, ...)`` into a :class:`RopeFactors`,
the way transformers' ``modeling_rope_utils`` turns a config into
``(inv_freq, attention_factor)``. No model is needed, so each is testable alone
and usable as a seed for the search.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from models.rope import RopeFactors, RopeGeometry

YARN_BLENDS = ("inv_freq", "factor")
# LongRoPE2's NTK-shaped starts rise by this much per dim from the critical dim on (the reference's
# ntk_init), so that they are strictly increasing there, as its search space requires.
LONGROPE2_INCREMENT = 0.1


def length_scale(geometry: RopeGeometry, target_length: int) -> float:
    """``s = target / original``, never below 1: shorter inputs need no rescaling."""
    return max(1.0, target_length / geometry.original_length)


def longrope_attention_scaling(scale: float, original_length: int) -> float:
    """LongRoPE's default cos/sin multiplier ``sqrt(1 + ln s / ln L0)``."""
    return 1.0 if scale <= 1.0 else math.sqrt(1.0 + math.log(scale) / math.log(original_length))


def yarn_attention_scaling(scale: float) -> float:
    """YaRN's cos/sin multiplier ``0.1 ln s + 1``."""
    return 1.0 if scale <= 1.0 else 0.1 * math.log(scale) + 1.0


def no_scaling(geometry: RopeGeometry, target_length: int) -> RopeFactors:
    """The model as trained: every factor 1."""
    return RopeFactors(
        rescale_factors=(1.0,) * geometry.num_factors,
        original_length=geometry.original_length,
        target_length=target_length,
        method="none",
    )


def linear_interpolation(geometry: RopeGeometry, target_length: int, attention_scaling: float = 1.0) -> RopeFactors:
    """Position interpolation (PI): every factor ``s``."""
    scale = length_scale(geometry, target_length)
    return RopeFactors(
        rescale_factors=(scale,) * geometry.num_factors,
        original_length=geometry.original_length,
        target_length=target_length,
        attention_scaling=attention_scaling,
        method="pi",
    )


def ntk_aware(geometry: RopeGeometry, target_length: int, attention_scaling: float = 1.0,
              effective_scale: float | None = None) -> RopeFactors:
    """NTK-aware scaling: ``base' = base * s^(d/(d-2))``, i.e. ``lambda_i = s^(d/(d-2) * 2i/d)``.

    ``effective_scale`` builds the curve for another ``s`` than ``target / original`` (its slowest pair's
    factor is that scale): the one parameter a user tunes by hand (:func:`hand_made_curves`).
    """
    scale = length_scale(geometry, target_length) if effective_scale is None else effective_scale
    if scale < 1.0:
        raise ValueError(f"effective_scale must be >= 1, got {scale}")
    d = geometry.rotary_dim
    base_ratio = scale ** (d / (d - 2))
    return RopeFactors(
        rescale_factors=tuple(base_ratio ** (2 * i / d) for i in range(geometry.num_factors)),
        original_length=geometry.original_length,
        target_length=target_length,
        attention_scaling=attention_scaling,
        method="ntk",
        metadata={} if effective_scale is None else {"effective_scale": effective_scale},
    )


def yarn_correction_dim(geometry: RopeGeometry, rotations: float) -> float:
    """The (fractional) pair index whose wavelength fits ``rotations`` times into the original window."""
    d = geometry.rotary_dim
    return d * math.log(geometry.original_length / (2 * math.pi * rotations)) / (2 * math.log(geometry.base))


def yarn(
    geometry: RopeGeometry,
    target_length: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    attention_scaling: float | None = None,
    blend: str = "inv_freq",
) -> RopeFactors:
    """YaRN: extrapolate fast dims (factor 1), interpolate slow dims (factor s), linear ramp between.

    The ramp bounds are the correction dims for ``beta_fast`` and ``beta_slow``
    rotations, floored/ceiled as transformers' ``yarn`` does, so the two agree.
    ``blend="inv_freq"`` (YaRN itself, and transformers) blends inverse frequencies along the
    ramp: ``1/lambda = (1-r) + r/s``. ``blend="factor"`` blends the factors, ``lambda = (1-r) + r s``,
    as the LongRoPE reference builds its YaRN seed (``evolution/search.py``); its factors are larger
    inside the ramp, and its method is ``yarn-linear``.
    """
    if blend not in YARN_BLENDS:
        raise ValueError(f"unknown YaRN blend {blend!r}; choose from {', '.join(YARN_BLENDS)}")
    scale = length_scale(geometry, target_length)
    low = max(math.floor(yarn_correction_dim(geometry, beta_fast)), 0)
    high = min(math.ceil(yarn_correction_dim(geometry, beta_slow)), geometry.rotary_dim - 1)
    if low == high:
        high += 0.001  # one-dim ramp: avoid dividing by zero, as transformers does
    factors = []
    for i in range(geometry.num_factors):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0 = extrapolate, 1 = interpolate
        factors.append(1.0 / ((1.0 - ramp) + ramp / scale) if blend == "inv_freq" else (1.0 - ramp) + ramp * scale)
    return RopeFactors(
        rescale_factors=tuple(factors),
        original_length=geometry.original_length,
        target_length=target_length,
        attention_scaling=yarn_attention_scaling(scale) if attention_scaling is None else attention_scaling,
        method="yarn" if blend == "inv_freq" else "yarn-linear",
        metadata={"beta_fast": beta_fast, "beta_slow": beta_slow},
    )


def critical_dimension(geometry: RopeGeometry) -> int:
    """LongRoPE2's critical dim ``d_c = ceil(d/2 * log_base(L0 / 2pi)) - 1``.

    Pairs at and above ``d_c`` never complete a full rotation inside the original
    window, so they were under-trained and need more than NTK's interpolation.
    """
    exponent = math.log(geometry.original_length / (2 * math.pi)) / math.log(geometry.base)
    return min(max(math.ceil(geometry.num_factors * exponent) - 1, 1), geometry.num_factors - 1)


def longrope2_initial(
    geometry: RopeGeometry,
    target_length: int,
    critical_dim: int | None = None,
    critical_factor: float | None = None,
) -> RopeFactors:
    """LongRoPE2's NTK-shaped start: ``lambda_i = lambda_dc^(i/d_c)`` below the critical dim.

    From ``d_c`` on the factors rise from ``lambda_dc`` by :data:`LONGROPE2_INCREMENT` per dim,
    as the reference's ``ntk_init`` builds them (J-shang/LongRoPE ``genetic_base.py``), so the vector
    is strictly increasing and those dims are at least fully interpolated. ``critical_factor``
    (``lambda_dc``) defaults to ``s``.
    """
    scale = length_scale(geometry, target_length)
    d_c = critical_dimension(geometry) if critical_dim is None else critical_dim
    if not 0 < d_c < geometry.num_factors:
        raise ValueError(f"critical_dim must be in 1..{geometry.num_factors - 1}, got {d_c}")
    lambda_c = scale if critical_factor is None else critical_factor
    factors = [lambda_c ** (i / d_c) if i < d_c else lambda_c + LONGROPE2_INCREMENT * (i - d_c)
               for i in range(geometry.num_factors)]
    return RopeFactors(
        rescale_factors=tuple(factors),
        original_length=geometry.original_length,
        target_length=target_length,
        attention_scaling=longrope_attention_scaling(scale, geometry.original_length),
        method="longrope2-init",
        metadata={"critical_dim": d_c, "critical_factor": lambda_c},
    )


def _with_longrope_attention(make: Callable[..., RopeFactors]) -> Callable[[RopeGeometry, int], RopeFactors]:
    """``make`` with LongRoPE's default attention scaling instead of its own."""
    def with_scaling(geometry: RopeGeometry, target_length: int) -> RopeFactors:
        scale = length_scale(geometry, target_length)
        return make(geometry, target_length,
                    attention_scaling=longrope_attention_scaling(scale, geometry.original_length))
    return with_scaling


BASELINES: dict[str, Callable[[RopeGeometry, int], RopeFactors]] = {
    "none": no_scaling,
    "pi": linear_interpolation,
    "ntk": ntk_aware,
    "ntk+attn": _with_longrope_attention(ntk_aware),
    "yarn": yarn,
    "yarn+attn": _with_longrope_attention(yarn),
    "longrope2-init": longrope2_initial,
}
# What a user tries by hand before a search (issue 17): NTK built for a larger scale than s (at 4x on
# held-out text, NTK built for s = 6 beat NTK built for s = 4 by about 3.5%: DESIGN.md section 4), with
# LongRoPE's attention scaling, and YaRN with other ramp bounds than the default 32/1.
NTK_SCALE_MULTIPLIERS = (1.0, 1.25, 1.5, 2.0)
YARN_BETAS = ((32.0, 1.0), (16.0, 1.0), (64.0, 2.0), (128.0, 2.0))


# A hand-made family's member by the name the comparison tables give it.
_NTK_MEMBER = re.compile(r"ntk\+attn \(s=(\d+(?:\.\d+)?)\)")
_YARN_MEMBER = re.compile(r"yarn \((\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)\)")
HAND_MADE_NAMES = ("ntk+attn (s=SCALE)", "yarn (BETA_FAST/BETA_SLOW)")


def hand_made_curves(geometry: RopeGeometry, target_length: int, beta_fast: float = 32.0,
                     beta_slow: float = 1.0) -> dict[str, dict[str, RopeFactors]]:
    """The one-parameter families a user tunes by hand, by family name then curve name.

    ``"ntk+attn"``: NTK-aware curves built for ``s`` times each of :data:`NTK_SCALE_MULTIPLIERS`, with
    LongRoPE's attention scaling (the first is the ``ntk+attn`` baseline). ``"yarn"``: YaRN with the
    given betas (the first, named ``yarn`` as the baseline) and each other pair of :data:`YARN_BETAS`.
    A family's tuned curve is its member with the lowest perplexity on the searched windows; every
    member's name is also a :func:`baseline` name for it, to the digits the name shows (``"ntk+attn (s=5)"``).
    """
    scale = length_scale(geometry, target_length)
    ntk_family = {"ntk+attn" if multiplier == 1.0 else f"ntk+attn (s={multiplier * scale:g})":
                  _ntk_with_longrope_attention(geometry, target_length, multiplier * scale)
                  for multiplier in NTK_SCALE_MULTIPLIERS}
    betas = dict.fromkeys([(float(beta_fast), float(beta_slow)), *YARN_BETAS])
    yarn_family = {"yarn" if index == 0 else f"yarn ({fast:g}/{slow:g})": yarn(geometry, target_length, fast, slow)
                   for index, (fast, slow) in enumerate(betas)}
    return {"ntk+attn": ntk_family, "yarn": yarn_family}


def _ntk_with_longrope_attention(geometry: RopeGeometry, target_length: int, effective_scale: float) -> RopeFactors:
    """NTK-aware built for ``effective_scale``, with LongRoPE's attention scaling for the real length scale."""
    scaling = longrope_attention_scaling(length_scale(geometry, target_length), geometry.original_length)
    return ntk_aware(geometry, target_length, attention_scaling=scaling, effective_scale=effective_scale)


def is_baseline(name: str) -> bool:
    """Whether :func:`baseline` knows ``name``."""
    return name in BASELINES or bool(_NTK_MEMBER.fullmatch(name) or _YARN_MEMBER.fullmatch(name))


def baseline(name: str, geometry: RopeGeometry, target_length: int) -> RopeFactors:
    """The named baseline with its default options, or a member of a hand-made family by its name
    (:func:`hand_made_curves`): ``"ntk+attn (s=5)"`` is NTK-aware built for an effective scale of 5 with
    LongRoPE's attention scaling, ``"yarn (64/2)"`` YaRN with ``beta_fast`` 64 and ``beta_slow`` 2."""
    if name in BASELINES:
        return BASELINES[name](geometry, target_length)
    if ntk := _NTK_MEMBER.fullmatch(name):
        return _ntk_with_longrope_attention(geometry, target_length, float(ntk[1]))
    if yarn_betas := _YARN_MEMBER.fullmatch(name):
        return yarn(geometry, target_length, float(yarn_betas[1]), float(yarn_betas[2]))
    raise ValueError(f"unknown method {name!r}; choose from {', '.join([*BASELINES, *HAND_MADE_NAMES])}")
