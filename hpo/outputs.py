"""Where a study's outputs live and what it found: the lookups every later stage starts from.

``python -m hpo.run --study NAME`` writes ``runs/NAME/`` (or ``--out DIR``): ``study.db``
(unless ``--storage`` points elsewhere), ``best_factors.json``, ``rope_parameters.json`` and
``results.json`` (:func:`write_outputs`). Evaluation, fine-tuning, export and the dashboards read
a study back through these functions, from its storage or, without one, from ``best_factors.json``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from hpo.search_space import LongRoPESearchSpace
from hpo.study import Stage, default_storage_url, open_storage, study_dir
from models.export import write_rope_parameters
from models.rope import RopeFactors, RopeGeometry
from studies import PresetError, StudyPreset, load_preset


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


def study_stage(study: optuna.Study) -> Stage | None:
    """The earlier study a chained study was built on, as ``hpo.study.open_study`` recorded it."""
    record = study.user_attrs.get("stage")
    return Stage.from_record(record) if record else None


def best_factors(study: optuna.Study, **metadata: Any) -> RopeFactors:
    """The factors of the study's best complete trial, with provenance (and ``metadata``) in ``metadata``.

    For a chained study (a preset's ``[extend]``) these are its final factors: chained after the
    earlier study's for a longer stage, the short factors for a short stage.
    """
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        raise StudyError(f"study {study.study_name!r} has no complete trial yet")
    best = study.best_trial
    found = recorded_search_space(study).to_factors(best.params)  # method is "longrope"
    found = dataclasses.replace(found, metadata={"study": study.study_name, "trial": best.number,
                                                 "searched_perplexity": best.value, **metadata})
    stage = study_stage(study)
    return stage.final_factors(found) if stage else found


def exported_factors(study: optuna.Study, **metadata: Any) -> tuple[RopeFactors, RopeFactors | None]:
    """``(long factors, short factors or None)`` that the study's export carries: a short stage's are the
    earlier study's long factors and its own best; any other study's are its best alone (:func:`best_factors`)."""
    found = best_factors(study, **metadata)
    stage = study_stage(study)
    return (stage.factors, found) if stage and stage.mode == "short" else (found, None)


def study_model(study: optuna.Study) -> str | None:
    """The model the study searched, as recorded (a chained study's stage, or the study's settings), else its
    shipped preset's; None when unknown (a study from before settings were recorded, run from a preset file)."""
    stage = study_stage(study)
    if stage:
        return stage.model
    recorded = study.user_attrs.get("workload")
    if recorded:
        return recorded["model"]
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


OUTPUT_FILES = ("best_factors.json", "rope_parameters.json", "results.json")


def check_outputs_are_its_own(out_dir: Path, study_name: str, storage: optuna.storages.BaseStorage) -> None:
    """Refuse to start study ``study_name`` in ``storage`` where ``out_dir`` holds outputs it did not write.

    A study not yet in the storage would overwrite them, and they may be the only record left of an
    earlier run (its ``study.db`` lost, emptied to 0 bytes, or elsewhere): a :class:`StudyError`
    names them. A study already in the storage continues and rewrites its own outputs.
    """
    if study_name in optuna.get_all_study_names(storage):
        return
    found = [name for name in OUTPUT_FILES if (out_dir / name).exists()]
    if found:
        raise StudyError(f"{out_dir} already holds {', '.join(found)} of a study that is not in this storage: a new "
                         f"study {study_name!r} would overwrite them; pass the --storage they came from, or move "
                         f"them away, or use another --out")


def write_outputs(out_dir: Path, study: optuna.Study, preset: StudyPreset, geometry: RopeGeometry,
                  rows: list[dict]) -> dict[str, Path]:
    """``best_factors.json``, ``rope_parameters.json`` (for the model's RoPE ``geometry``) and
    ``results.json`` (with the comparison ``rows``) in ``out_dir``."""
    heldout = next((row.get("heldout") for row in rows if row["method"].startswith("longrope")), None)
    stage = study_stage(study)
    long_factors, short_factors = exported_factors(
        study, model=stage.model if stage else preset.model.name, heldout_perplexity=heldout,
        data=preset.data.source)
    trials = study.get_trials(deepcopy=False)
    summary = {
        "study": study.study_name, "model": preset.model.name, "target_length": preset.target_length,
        "extends": {"study": stage.from_study, "mode": stage.mode, "model": stage.model} if stage else None,
        "trials": {state.name.lower(): sum(t.state == state for t in trials) for state in TrialState},
        "trial_time_s": sum((t.datetime_complete - t.datetime_start).total_seconds() for t in trials
                           if t.datetime_complete and t.datetime_start),
        "early_stopped": study.user_attrs.get("early_stopped"),
        "comparison": rows,
    }
    paths = {
        "factors": (short_factors or long_factors).save(out_dir / "best_factors.json"),
        "rope_parameters": write_rope_parameters(out_dir / "rope_parameters.json", long_factors, geometry,
                                                 short_factors),
        "results": out_dir / "results.json",
    }
    paths["results"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return paths
