"""What a chained study (a preset's ``[extend]``) takes from the earlier study it builds on.

One class per kind of stage, each answering the same questions, so the runner, the records and the
export ask the stage instead of branching on its kind (as Optuna's NSGA-II is handed a strategy object):

- :class:`LongerStage` (``mode = "longer"``): LongRoPE's progressive extension. The search extends
  the earlier study's target window further; its factors are chained after the earlier ones. Built on
  the fine-tuned model of the earlier study (``extend.finetuned``) it is the paper's
  fine-tune-then-extend-again step: only where the model and the factors come from differs, which
  :func:`hpo.records.stage_for` reads.
- :class:`ShortStage` (``mode = "short"``): LongRoPE's short-context readjustment. The search looks
  for factors within the model's own window, for a model that runs with the earlier study's long
  factors beyond it; the export carries both sets.

Every method is pure: a stage is a value recorded on the study (:meth:`Stage.to_record`).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from models.baselines import baseline
from models.rope import RopeFactors, RopeGeometry, chain_factors


@dataclass(frozen=True)
class Stage(ABC):
    """The earlier study's name, its factors (the ones its fine-tuned model was trained with, when ``model``
    is that model's directory) and the model the chained study loads."""

    from_study: str
    factors: RopeFactors
    model: str

    mode: ClassVar[str]  # the preset's ``extend.mode`` that makes this kind of stage
    takes_hand_made_seeds: ClassVar[bool]  # whether hand-made curves of the search window make sense as seeds

    def to_record(self) -> dict[str, Any]:
        """The stage as JSON types, recorded on the study (:func:`stage_from_record` reads it back)."""
        return {"from_study": self.from_study, "mode": self.mode, "factors": self.factors.to_dict(),
                "model": self.model}

    @abstractmethod
    def search_geometry(self, model_geometry: RopeGeometry, target_length: int) -> RopeGeometry:
        """The RoPE window the search extends, for a model of ``model_geometry`` and the preset's
        ``target_length``; a ``ValueError`` when that length makes no sense for this stage."""

    @abstractmethod
    def search_target_length(self, target_length: int) -> int:
        """The target length the search space is built for, given the preset's."""

    @abstractmethod
    def final_factors(self, found: RopeFactors) -> RopeFactors:
        """The factors the model runs with for searched ``found``."""

    @abstractmethod
    def exported(self, found: RopeFactors) -> tuple[RopeFactors, RopeFactors | None]:
        """``(long factors, short factors or None)`` that the export carries for final factors ``found``."""

    @abstractmethod
    def first_seeds(self, model_geometry: RopeGeometry, target_length: int) -> list[RopeFactors]:
        """The trials that open the search before the search space's own seeds."""

    @abstractmethod
    def references(self, candidates: list[tuple[str, RopeFactors]], model_geometry: RopeGeometry,
                   target_length: int) -> list[tuple[str, RopeFactors]]:
        """What the best trial is compared with, given the baselines an unchained study is compared with."""


@dataclass(frozen=True)
class LongerStage(Stage):
    """Extend the earlier study's window further: the search treats its target as the original window."""

    mode: ClassVar[str] = "longer"
    takes_hand_made_seeds: ClassVar[bool] = True

    def search_geometry(self, model_geometry: RopeGeometry, target_length: int) -> RopeGeometry:
        geometry = RopeGeometry(model_geometry.rotary_dim, model_geometry.base, self.factors.target_length)
        if target_length <= geometry.original_length:
            raise ValueError(f"target_length {target_length} must be longer than the earlier stage's "
                             f"original window {geometry.original_length}")
        return geometry

    def search_target_length(self, target_length: int) -> int:
        return target_length

    def final_factors(self, found: RopeFactors) -> RopeFactors:
        """The earlier factors chained with ``found`` (:func:`~models.rope.chain_factors`)."""
        return chain_factors(self.factors, found)

    def exported(self, found: RopeFactors) -> tuple[RopeFactors, RopeFactors | None]:
        return found, None

    def first_seeds(self, model_geometry: RopeGeometry, target_length: int) -> list[RopeFactors]:
        return []

    def references(self, candidates: list[tuple[str, RopeFactors]], model_geometry: RopeGeometry,
                   target_length: int) -> list[tuple[str, RopeFactors]]:
        """Each baseline on top of the earlier factors; ``none`` is the earlier factors alone."""
        return [(f"{self.from_study} only" if name == "none" else f"{self.from_study} + {name}", factors)
                for name, factors in candidates]


@dataclass(frozen=True)
class ShortStage(Stage):
    """Search factors within the model's own window for a model that runs with the earlier study's long ones."""

    mode: ClassVar[str] = "short"
    takes_hand_made_seeds: ClassVar[bool] = False

    def search_geometry(self, model_geometry: RopeGeometry, target_length: int) -> RopeGeometry:
        if target_length > model_geometry.original_length:
            raise ValueError(f"a short stage searches within the model's window: target_length "
                             f"{target_length} must be at most {model_geometry.original_length}")
        return model_geometry

    def search_target_length(self, target_length: int) -> int:
        """The long factors' target: the short factors live in the same space, bounded as the long ones."""
        return self.factors.target_length

    def final_factors(self, found: RopeFactors) -> RopeFactors:
        """``found`` with the long factors' attention scaling, since an exported ``longrope`` config has one
        attention factor for both sets."""
        return dataclasses.replace(found, attention_scaling=self.factors.attention_scaling)

    def exported(self, found: RopeFactors) -> tuple[RopeFactors, RopeFactors | None]:
        """The earlier study's long factors and ``found`` as the short ones."""
        return self.factors, found

    def first_seeds(self, model_geometry: RopeGeometry, target_length: int) -> list[RopeFactors]:
        """The long factors themselves, then no rescaling."""
        return [dataclasses.replace(self.factors, method="long"), baseline("none", model_geometry, target_length)]

    def references(self, candidates: list[tuple[str, RopeFactors]], model_geometry: RopeGeometry,
                   target_length: int) -> list[tuple[str, RopeFactors]]:
        """No rescaling (what the export uses within the window without a short search) and the long factors."""
        return [("none", baseline("none", model_geometry, target_length)),
                (f"{self.from_study} long factors", self.factors)]


STAGE_KINDS: dict[str, type[Stage]] = {kind.mode: kind for kind in (LongerStage, ShortStage)}


def stage_from_record(record: dict[str, Any]) -> Stage:
    """The stage a :meth:`Stage.to_record` record describes."""
    return STAGE_KINDS[record["mode"]](record["from_study"], RopeFactors.from_dict(record["factors"]),
                                       record["model"])
