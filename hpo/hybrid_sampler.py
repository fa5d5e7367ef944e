"""LongRoPE's evolutionary search with a model-based generation 0 (``[search] sampler = "hybrid"``).

The evolutionary sampler fills generation 0 with mutants of the baselines: random guesses around
a few curves. :class:`HybridSampler` fills it instead with proposals of a model-based sampler (TPE
by default) over a :class:`~hpo.curve_space.MonotoneCurveSpace`, a low-dimensional family where a
model learns from few evaluations; from generation 1 on, the GA breeds per-pair factors from the
best trials of that phase, as LongRoPE does from its own generation 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from hpo.curve_space import MonotoneCurveSpace
from hpo.sampler import LongRoPESampler, Proposal
from hpo.search_space import LongRoPESearchSpace

MODEL = "model"  # the role of a generation-0 trial that the model-based sampler proposed


class HybridSampler(LongRoPESampler):
    """:class:`~hpo.sampler.LongRoPESampler` whose generation 0 is proposed by a model-based sampler.

    Generation 0 holds ``population_size`` trials (:func:`hpo.study.sampler_for` makes it the number of
    seeds plus ``[search] population``): the enqueued seeds, then one proposal per trial of
    ``make_model_sampler(seed + trial number)`` over ``curve_space``, each stored as the per-pair
    parameters of ``search_space`` (role ``"model"``, no parents). Later generations are the GA's.

    The model-based sampler keeps no state of its own: for every proposal it reads the study's
    evaluated trials, each projected into the curve family (:meth:`MonotoneCurveSpace.to_params` of
    its factors; seeds and GA trials too), through an in-memory study built for that proposal and
    asked once. So the proposals depend on the storage alone: several workers, Ray and a resumed run
    propose as one process would, and pruned trials inform the model through their intermediate values.

    Args:
        search_space: the per-pair space the study's trials live in.
        curve_space: the curve family the model searches; its window, n_hat candidates and attention
            scaling range must be ``search_space``'s.
        make_model_sampler: an Optuna sampler for a seed (a :data:`hpo.study.CURVE_SAMPLERS` value).
        **options: :class:`~hpo.sampler.LongRoPESampler`'s (``population_size`` sizes the model phase).
    """

    def __init__(self, search_space: LongRoPESearchSpace, curve_space: MonotoneCurveSpace,
                 make_model_sampler: Callable[[int], optuna.samplers.BaseSampler], **options: Any) -> None:
        if search_space.longrope2:
            raise ValueError("the hybrid sampler's curves span every pair: it cannot search LongRoPE2's space")
        shared = ("num_factors", "original_length", "target_length", "start_token_candidates",
                  "attention_scaling_range")
        if any(getattr(search_space, name) != getattr(curve_space, name) for name in shared):
            raise ValueError(f"the curve space must share the search space's {', '.join(shared)}")
        super().__init__(search_space, **options)
        self._curves = curve_space
        self._make_model_sampler = make_model_sampler

    @classmethod
    def _get_generation_key(cls) -> str:
        # the evolutionary sampler's key: the records (hpo.records.GENERATION_KEY) read either sampler's generations
        return LongRoPESampler._get_generation_key()

    def _propose(self, study: optuna.Study, trial: FrozenTrial) -> Proposal:
        if self.get_trial_generation(study, trial) > 0:
            return super()._propose(study, trial)
        return Proposal(self._model_proposal(study, trial), MODEL, [])

    def _model_proposal(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        """The model's next curve, after every evaluated trial, as per-pair parameters."""
        distributions = self._curves.distributions()
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the in-memory study would log its creation
        try:
            shadow = optuna.create_study(direction=study.direction,
                                         sampler=self._make_model_sampler(self._seed + trial.number))
        finally:
            optuna.logging.set_verbosity(verbosity)
        for evaluated in study._get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
            if not self._space.has_all_params(evaluated.params):
                continue
            shadow.add_trial(optuna.trial.create_trial(
                params=self._curves.to_params(self._space.to_factors(evaluated.params)),
                distributions=distributions,
                value=evaluated.value if evaluated.state == TrialState.COMPLETE else None,
                state=evaluated.state,
                intermediate_values=evaluated.intermediate_values,
            ))
        asked = shadow.ask(distributions)
        return self._project(self._space.to_params(self._curves.to_factors(asked.params)))
