"""Where a study's outputs live and what it found: the lookups every later stage starts from.

``python -m hpo.run --study NAME`` writes ``runs/NAME/`` (or ``--out DIR``): ``study.db``
(unless ``--storage`` points elsewhere), ``best_factors.json``, ``rope_parameters.json`` and
``results.json``. Evaluation, fine-tuning and the dashboards read a study back through these
functions, from its storage or, without one, from ``best_factors.json``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import optuna

from hpo.search_space import LongRoPESearchSpace
from hpo.study import Stage, default_storage_url, open_storage, study_dir
from models.rope import RopeFactors
from studies import PresetError, load_preset


class StudyError(ValueError):
    """A study that cannot be found, or that holds nothing to evaluate yet."""


def load_study(name: str, storage: str | None = None, out: str | Path | None = None) -> optuna.Study:
    """Open the existing study ``name`` in ``storage`` (default: ``study.db`` in :func:`study_dir`).

    Raises :class:`StudyError` when the storage file or the study does not exist;
    an SQLite file is never created by looking.
    """
    url = storage or default_storage_url(study_dir(name, out))
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise StudyError(f"no study storage at {url.removeprefix('sqlite:///')}: pass the study's --out DIR "
                         f"(where `python -m hpo.run --study {name}` wrote study.db) or --storage URL")
    opened = open_storage(url)
    try:
        return optuna.load_study(study_name=name, storage=opened)
    except KeyError:
        names = optuna.get_all_study_names(opened)
        raise StudyError(f"no study {name!r} in {url}; it holds: {', '.join(names) or 'no studies'}") from None


def recorded_search_space(study: optuna.Study) -> LongRoPESearchSpace:
    """The search space ``hpo.study.open_study`` recorded in the study's user attrs."""
    record = study.user_attrs.get("search_space")
    if record is None:
        raise StudyError(f"study {study.study_name!r} has no recorded search space: not made by python -m hpo.run?")
    return LongRoPESearchSpace.from_record(record)


def best_factors(study: optuna.Study) -> RopeFactors:
    """The factors of the study's best complete trial, with provenance in ``metadata``.

    For a chained study (a preset's ``[extend]``) these are its final factors: chained after the
    earlier study's for a longer stage, the short factors for a short stage.
    """
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        raise StudyError(f"study {study.study_name!r} has no complete trial yet")
    best = study.best_trial
    found = recorded_search_space(study).to_factors(best.params)  # method is "longrope"
    found = dataclasses.replace(
        found, metadata={"study": study.study_name, "trial": best.number, "searched_perplexity": best.value})
    stage = study.user_attrs.get("stage")
    return Stage.from_record(stage).final_factors(found) if stage else found


def study_model(study: optuna.Study) -> str | None:
    """The model the study searched: a chained study's recorded model, else its preset's; None when unknown."""
    stage = study.user_attrs.get("stage")
    if stage:
        return stage["model"]
    try:
        return load_preset(study.user_attrs.get("preset", study.study_name)).model.name
    except PresetError:
        return None


def study_factors(name: str, storage: str | None = None,
                  out: str | Path | None = None) -> tuple[RopeFactors, str | None]:
    """``(best factors, model name or None)`` of study ``name``.

    Read from the storage when ``storage`` is given or ``study.db`` exists in the
    study directory, else from ``best_factors.json`` there.
    """
    directory = study_dir(name, out)
    factor_file = directory / "best_factors.json"
    if storage is None and not (directory / "study.db").is_file() and factor_file.is_file():
        factors = RopeFactors.load(factor_file)
        return factors, factors.metadata.get("model")
    study = load_study(name, storage, out)
    return best_factors(study), study_model(study)
