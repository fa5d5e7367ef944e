"""Stopping a search before ``n_trials``: once the best value has stalled, or once a budget is spent.

- Stalled, as the LongRoPE research code does it: the search stops when the best value changed by less
  than ``early_stop_delta`` over the last ``early_stop_generations`` generations (the reference: 0.001
  perplexity over 20 generations); :func:`stop_reason` is the rule.
- Spent: ``max_full_evaluations`` searched windows read at the target length by the finished trials
  (:func:`budget_reason`), the cost that pruning changes and a trial count does not measure.

Both are pure readers of the study's records; :func:`stopper` builds them from a preset's ``[search]``
settings for :meth:`hpo.trials.TrialClaims.claim`, which stops handing out trials once one fires,
records the reason in the study's ``early_stopped`` user attr (:data:`STOPPED_ATTR`) and logs it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from functools import partial

import optuna
from optuna.study import StudyDirection
from optuna.trial import TrialState

from hpo.pruning import FidelityStep, TrialCost, trial_cost
from hpo.records import EVALUATED, GENERATION_KEY, STOPPED_ATTR
from hpo.sampler import LongRoPESampler
from studies import GENETIC_SAMPLERS, SearchSpec

logger = logging.getLogger("hpo.study")


StopRule = Callable[[optuna.Study], str | None]


def stop_reason(study: optuna.Study, delta: float, generations: int,
                generation_size: Callable[[int], int] | None = None) -> str | None:
    """Why the search should stop now, in one line, or ``None`` while it should go on.

    With ``best_g`` the best value of the complete trials of generations ``0 .. g`` (generation 0,
    the seeds and their mutants, counts), the search stops after generation ``g`` when
    ``g >= generations`` and ``best_{g - generations} - best_g < delta`` (for a minimized study;
    the other way round when maximized). Why this form: it is the reference's rule ("the best
    changed by less than delta over the last N generations"), and comparing running bests is the
    same as asking whether any of the last ``generations`` generations improved on everything
    before them by ``delta`` or more; a best that keeps creeping down by a little per generation
    still stops once the total over the window is below ``delta``. Only ``g`` with both ends
    complete are compared, so a stop never depends on a half-measured generation.

    Generation ``g`` is complete when no trial of generations ``<= g`` is running and either a
    trial of a later generation exists (any state: the sampler starts generation ``g + 1`` only
    once ``g`` holds its evaluated trials) or, given ``generation_size`` (the sampler's
    :meth:`~hpo.sampler.LongRoPESampler.generation_size`), ``g`` holds that many evaluated
    (complete or pruned) trials. The size lets the rule fire before a trial of the next
    generation is asked for, which the later-generation test alone could not.

    The generation of a trial is its ``LongRoPESampler:generation`` system attr; trials without
    one (added by hand) are left out. Only complete trials with a finite value make a best;
    pruned and failed ones make none. Returns the first ``g`` at which the rule holds, so the
    answer does not change as later generations arrive; a study that has stopped stays stopped.
    """
    by_generation: dict[int, list[optuna.trial.FrozenTrial]] = {}
    for trial in study.get_trials(deepcopy=False):
        generation = trial.system_attrs.get(GENERATION_KEY)
        if isinstance(generation, int) and generation >= 0:
            by_generation.setdefault(generation, []).append(trial)
    if not by_generation:
        return None
    newest = max(by_generation)
    sign = 1.0 if study.direction == StudyDirection.MINIMIZE else -1.0
    bests: list[float] = []  # bests[g] = sign * best_g over the complete generations 0 .. g
    best = math.inf
    for generation in range(newest + 1):
        trials = by_generation.get(generation, [])
        if any(t.state == TrialState.RUNNING for t in trials):
            break
        full = generation < newest or (
            generation_size is not None
            and sum(t.state in EVALUATED for t in trials) >= generation_size(generation))
        if not full:
            break
        values = [sign * t.value for t in trials
                  if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)]
        best = min([best, *values])
        bests.append(best)
        start = generation - generations
        if start < 0 or not math.isfinite(best):
            continue
        change = bests[start] - best
        if change < delta:
            return (f"best {sign * best:.4f} changed by {change:.4g} < {delta:g} over the last {generations} "
                    f"generations (generations {start}-{generation})")
    return None


def budget_reason(study: optuna.Study, schedule: Sequence[FidelityStep], max_full_evaluations: int) -> str | None:
    """Why the search should stop now: its complete and pruned trials read ``max_full_evaluations`` or more
    searched windows at the full target length (the steps of ``schedule`` they reported; prefix rungs do not
    count); ``None`` while they read fewer. Failed trials do not count: an interrupted trial runs again.

    Checked before each trial is claimed, so the trial that crosses the budget finishes (with several
    workers, so do the others' running ones) and the budget may be overshot by what they read.
    """
    trials = study.get_trials(deepcopy=False, states=EVALUATED)
    spent = sum((trial_cost(trial, schedule) for trial in trials), TrialCost()).full_evaluations
    if spent < max_full_evaluations:
        return None
    return f"{spent} full-length evaluations spent, the budget is {max_full_evaluations} (max_full_evaluations)"


def stopper(search: SearchSpec, sampler: optuna.samplers.BaseSampler | None = None,
            schedule: Sequence[FidelityStep] = ()) -> StopRule | None:
    """The preset's rules as one ``study -> reason`` callable (the first rule that fires gives the reason);
    ``None`` when early stopping and the budget of full-length evaluations are both off.

    ``sampler`` (the study's) gives the generation sizes when it is a
    :class:`~hpo.sampler.LongRoPESampler` (see :func:`stop_reason`). The stall rule counts that sampler's
    generations: with another ``[search] sampler`` (TPE, CMA-ES, GP have none) it is off, and a warning
    says so, so that ``--sampler`` works on presets that stop early. ``schedule`` is the steps a trial is
    measured in (:meth:`hpo.study.Workload.schedule`), which the budget counts in.
    """
    rules: list[StopRule] = []
    if search.early_stop_generations is not None:
        if search.sampler in GENETIC_SAMPLERS:
            size = sampler.generation_size if isinstance(sampler, LongRoPESampler) else None
            rules.append(partial(stop_reason, delta=search.early_stop_delta,
                                 generations=search.early_stop_generations, generation_size=size))
        else:
            logger.warning("early stopping counts the longrope sampler's generations; sampler %r has none: "
                           "early_stop_generations is ignored", search.sampler)
    if search.max_full_evaluations is not None:
        if not schedule:
            raise ValueError("a budget of full-length evaluations needs the schedule trials are measured in")
        rules.append(partial(budget_reason, schedule=schedule, max_full_evaluations=search.max_full_evaluations))
    if not rules:
        return None
    return rules[0] if len(rules) == 1 else partial(_first_reason, rules)


def _first_reason(rules: Sequence[StopRule], study: optuna.Study) -> str | None:
    return next((reason for rule in rules if (reason := rule(study)) is not None), None)


def forget_stale_stop(study: optuna.Study, stop: StopRule | None) -> None:
    """Clear an ``early_stopped`` record that the current settings no longer support.

    A study stopped early and run again with early stopping off, or with a longer window, a
    smaller delta or a larger budget, goes on; its record must not claim a stop that did not happen.
    """
    recorded = study.user_attrs.get(STOPPED_ATTR)
    if recorded and (stop is None or stop(study) is None):
        logger.info("early stop recorded earlier (%s) does not hold with these settings: the search goes on",
                    recorded)
        study.set_user_attr(STOPPED_ATTR, None)
