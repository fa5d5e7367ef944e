"""Multi-fidelity pruning of LongRoPE trials: stop a trial once it is clearly worse than the parents.

A trial is measured in fidelity steps (:func:`fidelity_schedule`): optionally the first searched
window cut to growing prefixes, then each searched window in full. After each step the trial
reports its running perplexity (the prefix's own perplexity, or the token-weighted perplexity of
the full windows so far) at an Optuna step equal to the searched tokens read so far, so the same
step means the same text for every trial of the study, whatever schedule each one ran.

:class:`ParentPruner` compares that running value with the complete trials at the same step: the
parents of every generation are the best complete trials so far, so a trial behind the
``num_parents``-th best of them would not become a parent of any later generation (that bar only
rises): stopping it early loses nothing the evolutionary search would have used. A stricter rank
(compare with fewer than ``num_parents`` trials) trades that guarantee for fewer evaluations.
The local backend asks the pruner after each step; the Ray backend asks it from a Tune scheduler
(:mod:`hpo.ray_backend`), so both take the same decisions.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import optuna
from optuna.pruners import BasePruner
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState


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


@dataclass(frozen=True)
class TrialCost:
    """What measuring trials spent: ``full_evaluations`` searched windows read at the full target length,
    ``windows`` read in all (a prefix rung counted as the share of its window it reads), and ``seconds`` of
    trial wall time. The first two do not depend on what else the machine ran."""

    full_evaluations: int = 0
    windows: float = 0.0
    seconds: float = 0.0

    def __add__(self, other: TrialCost) -> TrialCost:
        return TrialCost(self.full_evaluations + other.full_evaluations, self.windows + other.windows,
                         self.seconds + other.seconds)


def trial_cost(trial: FrozenTrial, schedule: Sequence[FidelityStep]) -> TrialCost:
    """What ``trial`` spent: the steps of ``schedule`` it reported (its intermediate values) and its wall time."""
    window_tokens = {step.window: step.tokens for step in schedule if not step.prefix}
    read = [step for step in schedule if step.step in trial.intermediate_values]
    seconds = ((trial.datetime_complete - trial.datetime_start).total_seconds()
               if trial.datetime_complete and trial.datetime_start else 0.0)
    return TrialCost(sum(not step.prefix for step in read),
                     sum(step.tokens / window_tokens[step.window] for step in read), seconds)


def cost_to_reach(trials: Sequence[FrozenTrial], schedule: Sequence[FidelityStep],
                  target: float | None = None) -> tuple[TrialCost, FrozenTrial | None] | None:
    """What ``trials`` (one worker's, in evaluation order) spent up to and with the first complete trial at or
    below ``target``, and that trial; ``None`` when none reached it. Without ``target``: all of them."""
    spent = TrialCost()
    for trial in trials:
        spent += trial_cost(trial, schedule)
        if target is not None and trial.state == TrialState.COMPLETE and trial.value <= target:
            return spent, trial
    return (spent, None) if target is None else None


class ParentPruner(BasePruner):
    """Prune a trial whose running value could not make it into the best ``rank`` trials, by a margin.

    Contract (single-objective studies run by a :class:`~optuna.samplers.BaseGASampler` whose
    parents are the best ``num_parents`` complete trials, as :class:`hpo.sampler.LongRoPESampler`):

    - At the trial's last reported step ``s``, the reference is the ``rank``-th best value at
      ``s`` among the complete trials of the study that reported ``s`` (any generation: trials
      evaluated under another schedule may lack the step). With fewer than ``rank`` such
      trials the trial goes on, so the first ``rank`` trials of a study are always measured in full.
    - The trial is pruned when its value at ``s`` is worse than the reference by more than
      ``margin``, relative: above ``(1 + margin) * reference`` when minimizing, below
      ``(1 - margin) * reference`` when maximizing (values are perplexities, so positive).

    With ``rank = num_parents`` the search is unchanged as long as running values rank trials as
    their final values do: complete trials only accumulate, so the ``num_parents``-th best only
    improves, and a trial behind it now would not be a parent of this or any later generation.
    A smaller ``rank`` prunes more (generation 0 too, once ``rank`` trials are complete) but may
    stop a trial that would have been a parent, so the search then breeds from other trials.

    The pruner reads everything from the storage, so any process sharing the study takes the same
    decision. Pruned trials keep their reported values (Optuna records the last one as the trial's
    value) and are never parents: the sampler only breeds from complete trials, and not from one
    that a pruned trial beat at the step where it stopped.

    Args:
        rank: how many complete trials a running value is compared with: the sampler's parent count
            to keep the search as it is, fewer to prune more (>= 1).
        margin: how much worse than the reference a running value must be, as a fraction (>= 0).
    """

    def __init__(self, rank: int, margin: float = 0.01) -> None:
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self._rank = rank
        self._margin = margin

    @property
    def margin(self) -> float:
        return self._margin

    def reference(self, study: optuna.Study, step: int) -> float | None:
        """The ``rank``-th best complete value at ``step``, or ``None`` with too few complete trials."""
        # Not the per-ask trial cache: a trial runs for minutes while other workers complete theirs.
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        values = sorted(t.intermediate_values[step] for t in complete if step in t.intermediate_values)
        if study.direction == StudyDirection.MAXIMIZE:
            values.reverse()
        return values[self._rank - 1] if len(values) >= self._rank else None

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        reference = self.reference(study, step)
        if reference is None:
            return False
        value = trial.intermediate_values[step]
        if study.direction == StudyDirection.MINIMIZE:
            return value > (1 + self._margin) * reference
        return value < (1 - self._margin) * reference
