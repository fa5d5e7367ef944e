"""The outputs ``python -m hpo.run`` writes beside a study: its best factors, their ``rope_parameters`` block
and a summary with the comparison table (names and layout: :mod:`hpo.records`). Readers read them back
through :mod:`hpo.records`, never through this module.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from optuna.trial import TrialState

from hpo.records import (
    BEST_FACTORS_FILE,
    RESULTS_FILE,
    ROPE_PARAMETERS_FILE,
    exported_factors,
    study_stage,
)
from models.export import write_rope_parameters
from models.rope import RopeGeometry
from studies import StudyPreset


def write_outputs(out_dir: Path, study: optuna.Study, preset: StudyPreset, geometry: RopeGeometry,
                  rows: list[dict]) -> dict[str, Path]:
    """The best factors, their ``rope_parameters`` block (for the model's RoPE ``geometry``) and the summary
    (with the comparison ``rows``) in ``out_dir``."""
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
        "factors": (short_factors or long_factors).save(out_dir / BEST_FACTORS_FILE),
        "rope_parameters": write_rope_parameters(out_dir / ROPE_PARAMETERS_FILE, long_factors, geometry,
                                                 short_factors),
        "results": out_dir / RESULTS_FILE,
    }
    paths["results"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return paths
