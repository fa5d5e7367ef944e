"""Multi-fidelity pruning of LongRoPE trials: stop a trial once it is clearly worse than the parents.

A trial is measured in fidelity steps (:func:`fidelity_schedule`): optionally the first searched
window cut to growing prefixes, then each searched window in full. After each step the trial
reports its running perplexity (the prefix's own perplexity, or the token-weighted perplexity of
the full windows so far) at an Optuna step equal to the searched tokens read so far, so the same
step means the same text for every trial of the study, whatever schedule each one ran.

:class:`ParentPruner` compares that running value with the parents of the trial's generation at the
same step. The parents are the best complete trials so far, so a trial worse than the worst of them
would not become a parent of any later generation either (the parent set only improves): stopping
it early loses nothing the evolutionary search would have used. The local backend asks the pruner
after each step; the Ray backend asks it from a Tune scheduler (:mod:`hpo.ray_backend`), so both
take the same decisions.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import optuna
from optuna.pruners import BasePruner
from optuna.samplers import BaseGASampler
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial


@dataclass(frozen=True)
class FidelityStep:
    """One measurement of a trial: searched window ``window`` read up to its first ``tokens`` tokens.

    ``step`` is the Optuna step the running value is reported at: searched tokens read before this
    window plus ``tokens``. ``prefix`` is true when the window is cut short (a cheap early rung).
    """

    window: int
    tokens: int
    step: int
    prefix: bool


def fidelity_schedule(window_lengths: Sequence[int], prefixes: Sequence[float] = ()) -> list[FidelityStep]:
    """The steps that measure a trial: window 0 cut to each of ``prefixes`` (fractions of its length), then each window.

    Raises ``ValueError`` when there is no window or a prefix fraction is not in (0, 1).
    """
    if not window_lengths:
        raise ValueError("a fidelity schedule needs at least one window")
    if any(not 0 < fraction < 1 for fraction in prefixes):
        raise ValueError(f"prefix fractions must be in (0, 1), got {list(prefixes)}")
    first = window_lengths[0]
    steps = [FidelityStep(0, round(first * fraction), round(first * fraction), True) for fraction in prefixes]
    offsets = itertools.accumulate(window_lengths, initial=0)
    for window, (offset, length) in enumerate(zip(offsets, window_lengths, strict=False)):
        steps.append(FidelityStep(window, length, offset + length, False))
    return steps


class ParentPruner(BasePruner):
    """Prune a trial whose running value is worse than every parent's at the same step, by a margin.

    Contract (single-objective studies run by a :class:`~optuna.samplers.BaseGASampler`):

    - The parents are ``sampler.get_parent_population(study, g)`` for the trial's generation ``g``
      (the trial system attr the sampler set when the trial was asked). Generation 0 has no parents
      and is never pruned.
    - At the trial's last reported step ``s``, the reference is the worst value among the parents
      that reported step ``s`` (parents evaluated under another schedule may lack it); with none,
      the trial goes on.
    - The trial is pruned when its value at ``s`` is worse than the reference by more than
      ``margin``, relative: above ``(1 + margin) * reference`` when minimizing, below
      ``(1 - margin) * reference`` when maximizing (values are perplexities, so positive).

    The pruner reads everything from the storage, so any process sharing the study takes the same
    decision. Pruned trials keep their reported values (Optuna records the last one as the trial's
    value) and are never parents: the sampler only breeds from complete trials.

    Args:
        sampler: the study's sampler, whose generations and parent populations are used.
        margin: how much worse than the worst parent a running value must be, as a fraction (>= 0).
    """

    def __init__(self, sampler: BaseGASampler, margin: float = 0.01) -> None:
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self._sampler = sampler
        self._margin = margin

    @property
    def margin(self) -> float:
        return self._margin

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        generation = trial.system_attrs.get(self._sampler._get_generation_key())
        if step is None or not generation:
            return False
        parents = self._sampler.get_parent_population(study, generation)
        reference = [p.intermediate_values[step] for p in parents if step in p.intermediate_values]
        if not reference:
            return False
        value = trial.intermediate_values[step]
        if study.direction == StudyDirection.MINIMIZE:
            return value > (1 + self._margin) * max(reference)
        return value < (1 - self._margin) * min(reference)
