"""Early stopping as the LongRoPE research code does it: stop once the best value has stalled.

The search stops when the best value changed by less than ``early_stop_delta`` over the last
``early_stop_generations`` generations (the reference: 0.001 perplexity over 20 generations).
:func:`stop_reason` is the rule, a pure reader of the study's records; :func:`stopper` builds it
from a preset's ``[search]`` settings for :meth:`hpo.trials.TrialClaims.claim`, which stops handing
out trials once it fires, records the reason in the study's ``early_stopped`` user attr
(:data:`STOPPED_ATTR`) and logs it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial

import optuna
from optuna.study import StudyDirection
from optuna.trial import TrialState

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


def stopper(search: SearchSpec, sampler: optuna.samplers.BaseSampler | None = None) -> StopRule | None:
    """The preset's rule as a ``study -> reason`` callable; ``None`` when early stopping is off.

    ``sampler`` (the study's) gives the generation sizes when it is a
    :class:`~hpo.sampler.LongRoPESampler` (see :func:`stop_reason`). The rule counts that sampler's
    generations: with another ``[search] sampler`` (TPE, CMA-ES, GP have none) it is off, and a warning
    says so, so that ``--sampler`` works on presets that stop early.
    """
    if search.early_stop_generations is None:
        return None
    if search.sampler not in GENETIC_SAMPLERS:
        logger.warning("early stopping counts the longrope sampler's generations; sampler %r has none: "
                       "early_stop_generations is ignored, the search runs n_trials", search.sampler)
        return None
    size = sampler.generation_size if isinstance(sampler, LongRoPESampler) else None
    return partial(stop_reason, delta=search.early_stop_delta, generations=search.early_stop_generations,
                   generation_size=size)


def forget_stale_stop(study: optuna.Study, stop: StopRule | None) -> None:
    """Clear an ``early_stopped`` record that the current settings no longer support.

    A study stopped early and run again with early stopping off, or with a longer window or a
    smaller delta, goes on; its record must not claim a stop that did not happen.
    """
    recorded = study.user_attrs.get(STOPPED_ATTR)
    if recorded and (stop is None or stop(study) is None):
        logger.info("early stop recorded earlier (%s) does not hold with these settings: the search goes on",
                    recorded)
        study.set_user_attr(STOPPED_ATTR, None)
