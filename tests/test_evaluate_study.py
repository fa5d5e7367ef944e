"""`python -m hpo.evaluate --study`: a real tiny study's best factors on every task, and the results table."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

from hpo.records import RESULT_COLUMNS, ResultsError, read_results


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpo.evaluate", "--dtype", "float32", "--no-progress", *args],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def study(run_dir) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{run_dir / 'study.db'}")


@pytest.fixture(scope="module")
def evaluated(run_dir) -> tuple[subprocess.CompletedProcess, Path]:
    """All three tasks at the study's target length, on the windows the study searched (2, from the start)."""
    done = evaluate("--study", "tiny", "--out", str(run_dir), "--methods", "none,yarn", "--lengths", "256",
                    "--samples", "2", "--tasks", "ppl,passkey,needle-ppl", "--depth-bins", "2", "--needles", "2")
    return done, run_dir


def test_study_best_factors_reproduce_the_searched_perplexity(evaluated, study):
    done, run_dir = evaluated
    assert done.returncode == 0, done.stderr
    results = read_results(run_dir / "evaluation.csv")
    ppl = results[results["task"] == "ppl"].set_index("method")["perplexity"]
    # same model, windows and factors as the search: the same numbers it stored
    assert ppl["longrope:tiny"] == pytest.approx(study.best_value, rel=1e-6)
    assert ppl["yarn"] == pytest.approx(study.user_attrs["searched:yarn"], rel=1e-6)
    assert ppl["none"] == pytest.approx(study.user_attrs["searched:none"], rel=1e-6)
    for title in ("ppl: perplexity", "passkey: accuracy over all depths", "needle-ppl: perplexity"):
        assert title in done.stdout
    assert f"wrote {run_dir / 'evaluation.csv'}" in done.stdout


def test_results_table_is_tidy_and_the_same_in_csv_and_json(evaluated):
    done, run_dir = evaluated
    assert done.returncode == 0, done.stderr
    frame = read_results(run_dir / "evaluation.csv")
    assert list(frame.columns) == list(RESULT_COLUMNS)
    pd.testing.assert_frame_equal(frame, read_results(run_dir / "evaluation.json"), check_dtype=False)
    meta = json.loads((run_dir / "evaluation.json").read_text())
    assert meta["model"] == "tiny-random-llama" and meta["study"] == "tiny" and meta["seed"] == 0

    methods = ["none", "yarn", "longrope:tiny"]
    assert frame.groupby("task")["method"].apply(list).to_dict() == {
        "ppl": methods, "needle-ppl": methods, "passkey": [m for m in methods for _ in range(2)]}
    passkey = frame[frame["task"] == "passkey"]
    assert passkey["depth"].tolist() == [0.25, 0.75] * 3
    assert (passkey["windows"] == 2).all() and passkey["accuracy"].between(0, 1).all()
    assert (passkey["tokens"] <= 2 * 256).all() and (passkey["tokens"] > 2 * 200).all()
    assert passkey["perplexity"].isna().all()
    needle = frame[frame["task"] == "needle-ppl"]
    assert needle["perplexity"].map(math.isfinite).all() and needle["accuracy"].isna().all()
    # scored: the answers only, 2 windows x 2 needles x " dddddd." (a space, 6 digits, a period: 8 tokens)
    assert (needle["windows"] == 2).all() and (needle["tokens"] == 2 * 2 * 8).all()


def test_a_study_is_evaluated_in_the_dtype_it_ran_in_unless_asked(run_dir, study, tmp_path, monkeypatch):
    """tiny ran in float32; here auto would measure bf16 the faster (faked), which ``--dtype auto`` still asks for."""
    from hpo import evaluate as evaluate_module
    from models import precision

    monkeypatch.setattr(precision, "probe_file", lambda: tmp_path / precision.PROBE_FILE)
    monkeypatch.setattr(precision, "time_layer", lambda shape, dtype: {"float32": 2.0}.get(str(dtype)[6:], 1.0))
    assert study.user_attrs["workload"]["dtype"] == "float32"
    common = ["--study", "tiny", "--out", str(run_dir), "--methods", "none", "--lengths", "256", "--samples", "1",
              "--tasks", "ppl", "--no-progress", "--json", str(tmp_path / "evaluation.json")]
    for asked, expected in (([], "float32"), (["--dtype", "auto"], "bfloat16")):
        rows = evaluate_module.run(evaluate_module.build_parser().parse_args(common + asked))
        assert {row.dtype for row in rows} == {expected}


def test_factor_file_of_a_study_without_its_storage(run_dir, study, tmp_path):
    """A directory holding only best_factors.json (e.g. copied from a GPU box) evaluates the same factors."""
    shutil.copy(run_dir / "best_factors.json", tmp_path / "best_factors.json")
    out = tmp_path / "table.json"
    done = evaluate("--study", "tiny", "--out", str(tmp_path), "--methods", "", "--samples", "2", "--json", str(out))
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(row["method"], row["length"]) for row in rows] == [("longrope:tiny", 128), ("longrope:tiny", 256)]
    assert rows[1]["perplexity"] == pytest.approx(study.best_value, rel=1e-6)
    assert not (tmp_path / "evaluation.csv").exists()  # --json given: only that is written


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--study", "nope", "--out", "{run_dir}"], "no study 'nope' in sqlite:///"),
        (["--study", "tiny", "--out", "{tmp}/empty"], "no study storage at"),
        (["--study", "tiny", "--storage", "sqlite:///{tmp}/none.db"], "no study storage at"),
        (["--study", "tiny", "--out", "{run_dir}", "--tasks", "ppl,quiz"], "unknown task(s) quiz"),
        (["--study", "tiny", "--out", "{run_dir}", "--tasks", ""], "--tasks is empty"),
    ],
)
def test_bad_input_exits_2(run_dir, tmp_path, args, message):
    args = [arg.replace("{run_dir}", str(run_dir)).replace("{tmp}", str(tmp_path)) for arg in args]
    done = evaluate(*args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert not (tmp_path / "none.db").exists()  # looking never creates a database


def test_read_results_rejects_what_is_not_a_table(tmp_path):
    with pytest.raises(ResultsError, match="does not exist"):
        read_results(tmp_path / "missing.csv")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ResultsError, match="lacks the column"):
        read_results(tmp_path / "other.csv")
    (tmp_path / "bad.json").write_text('{"rows": []}')
    with pytest.raises(ResultsError, match="not an evaluation table"):
        read_results(tmp_path / "bad.json")


def test_read_results_takes_tables_of_the_perplexity_only_format(tmp_path):
    """JSON written before tasks existed: every row was a perplexity row."""
    old = {"model": "m", "results": [{"method": "yarn", "length": 256, "perplexity": 20.5, "seconds": 1.0,
                                      "tokens": 255, "windows": 1}]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    frame = read_results(tmp_path / "old.json")
    assert frame.loc[0, "task"] == "ppl" and frame.loc[0, "perplexity"] == 20.5 and pd.isna(frame.loc[0, "accuracy"])
