"""`python -m hpo.run` end to end on the tiny preset: outputs, resume after SIGKILL, bad input, PostgreSQL."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
import torch

from hpo import records
from hpo import run as run_module
from hpo import study as study_module
from hpo.cli import DTYPE_CHOICES
from hpo.run import apply_overrides, build_parser, main
from hpo.sampler import LongRoPESampler
from hpo.search_space import LongRoPESearchSpace
from hpo.trials import TrialClaims
from models.loading import pick_dtype
from models.rope import RopeFactors
from studies import PRESET_DIR, load_preset


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpo.run", *args], capture_output=True, text=True, timeout=timeout)


def load_study(out_dir) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{out_dir / 'study.db'}")


def generation(trial) -> int:
    return trial.system_attrs[LongRoPESampler._get_generation_key()]


def test_tiny_study_writes_factors_and_compares_with_baselines(tmp_path):
    result = run_cli("--study", "tiny", "--out", str(tmp_path), "--n-trials", "10", "--quiet")
    assert result.returncode == 0, result.stderr
    for method in ("none", "pi", "ntk", "yarn", "longrope (trial"):
        assert method in result.stdout
    factors = RopeFactors.load(tmp_path / "best_factors.json")
    assert factors.num_factors == 8 and factors.target_length == 256
    rope = json.loads((tmp_path / "rope_parameters.json").read_text())["rope_parameters"]
    assert rope["rope_type"] == "longrope" and rope["long_factor"] == list(factors.rescale_factors)
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["trials"]["complete"] == 10
    assert {"searched", "heldout"} <= set(summary["comparison"][-1])
    study = load_study(tmp_path)
    assert {t.user_attrs.get("seed") for t in study.trials} >= {"pi", "ntk", "yarn"}
    assert factors.metadata["searched_perplexity"] == pytest.approx(study.best_value)


def test_sigkill_mid_run_loses_no_completed_trial_and_generations_continue(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "hpo.run", "--study", "tiny", "--out", str(tmp_path),
                                "--n-trials", "40", "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    database = tmp_path / "study.db"
    deadline = time.monotonic() + 300
    completed_before = 0
    while time.monotonic() < deadline and completed_before < 12:
        time.sleep(0.2)
        if database.exists():
            try:
                with sqlite3.connect(database) as connection:
                    completed_before = connection.execute(
                        "select count(*) from trials where state = 'COMPLETE'").fetchone()[0]
            except sqlite3.OperationalError:  # tables not created yet, or locked
                continue
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert completed_before >= 12, "the study did not get going"
    before = {t.number: t for t in load_study(tmp_path).trials if t.state.name == "COMPLETE"}
    max_generation_before = max(generation(t) for t in before.values())

    result = run_cli("--study", "tiny", "--out", str(tmp_path), "--n-trials", "40", "--quiet")
    assert result.returncode == 0, result.stderr
    after = load_study(tmp_path).trials
    for number, trial in before.items():  # every completed trial kept, unchanged
        assert after[number].state.name == "COMPLETE" and after[number].value == trial.value
        assert after[number].params == trial.params
    evaluated = [t for t in after if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(evaluated) == 40  # the killed trial did not use up the budget...
    for killed in (t for t in after if t.state.name == "FAIL"):  # ...and its parameters were run again
        retried = [t for t in after if t.system_attrs.get("failed_trial") == killed.number]
        assert [t.state.name for t in retried] == ["COMPLETE"]
        # study.ask stores a trial's parameters one by one: a kill inside it leaves some, all kept in the retry
        assert killed.params.items() <= retried[0].params.items()
    new_generations = [generation(t) for t in after if t.number > max(before) and t.state.name == "COMPLETE"]
    assert min(new_generations) >= max_generation_before  # continued, not restarted at 0
    assert max(new_generations) > max_generation_before


def test_stale_running_trial_is_failed_and_retried(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "HEARTBEAT_INTERVAL_S", 1)
    monkeypatch.setattr(records, "GRACE_PERIOD_S", 2)
    assert main(["--study", "tiny", "--out", str(tmp_path), "--n-trials", "8", "--quiet"]) == 0
    storage = records.open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.load_study(study_name="tiny", storage=storage)
    # a trial left RUNNING by a killed process: it has drawn a parameter, then its heartbeat stopped
    with pytest.warns(UserWarning, match="Heartbeat"):
        orphan = study.ask()
    drawn = orphan.suggest_float("factor_00", 1.0, 3.0)
    storage.record_heartbeat(orphan._trial_id)
    # no sleep for it to go stale: the run claims the rest of its budget, then waits for the orphan to
    assert main(["--study", "tiny", "--out", str(tmp_path), "--n-trials", "10", "--quiet"]) == 0
    trials = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert trials[orphan.number].state.name == "FAIL"
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == orphan.number]
    assert len(retried) == 1 and retried[0].params["factor_00"] == drawn
    assert sum(t.state.name == "COMPLETE" for t in trials) >= 9


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_measure = study_module.Workload.step_perplexity

    def flaky(self, factors, step, desc="trial"):
        calls["n"] += 1
        if calls["n"] == 3:  # trial 1's second window
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_measure(self, factors, step, desc=desc)

    monkeypatch.setattr(study_module.Workload, "step_perplexity", flaky)
    assert main(["--study", "tiny", "--out", str(tmp_path), "--n-trials", "6", "--quiet"]) == 0
    trials = load_study(tmp_path).trials
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) == 1 and "out of memory" in failed[0].user_attrs["error"]
    assert sum(t.state.name == "COMPLETE" for t in trials) == 6  # a failed trial does not use up the budget


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--study", "llama9_1m"], "unknown study 'llama9_1m'"),
        (["--study", "tiny", "--storage", "postgresql+psycopg://nobody@127.0.0.1:1/none"],
         "cannot open study storage"),
        (["--study", "tiny", "--storage", "notadb://x"], "cannot open study storage"),
        (["--study", "tiny", "--target-length", "64"], "must be longer than the model's original window 128"),
        (["--study", "tiny", "--cpus-per-trial", "2"], "need --backend ray"),
        (["--study", "tiny", "--backend", "ray", "--max-concurrent", "0"], "--max-concurrent: must be > 0"),
        (["--study", "tiny", "--sampler", "bayes"], "--sampler: invalid choice: 'bayes'"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, args, message):
    result = run_cli(*args, "--out", str(tmp_path), "--quiet")
    assert result.returncode == 2
    assert message in result.stderr


def test_malformed_preset_file(tmp_path):
    preset = tmp_path / "broken.toml"
    preset.write_text("target_length = 256\n[search]\npopulaton = 4\n")
    result = run_cli("--study", str(preset), "--out", str(tmp_path), "--quiet")
    assert result.returncode == 2 and "populaton" in result.stderr


def test_list_shows_the_presets():
    result = run_cli("--list")
    assert result.returncode == 0
    assert "smollm2_16k" in result.stdout and "llama3_128k" in result.stdout


def test_same_study_on_postgresql(tmp_path, postgres_url):
    args = ["--study", "tiny", "--out", str(tmp_path), "--storage", postgres_url, "--quiet"]
    assert main([*args, "--n-trials", "6"]) == 0
    assert main([*args, "--n-trials", "9"]) == 0  # resumes the same study
    study = optuna.load_study(study_name="tiny", storage=postgres_url)
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 9
    assert not (tmp_path / "study.db").exists()
    assert (tmp_path / "best_factors.json").is_file()


def run_tiny_longrope2(tmp_path, name: str, sections: str) -> optuna.Study:
    """Run a LongRoPE2 study of the tiny model, 128 -> 512 tokens on one window, through the CLI."""
    preset = tmp_path / f"{name}.toml"
    preset.write_text('target_length = 512\n[model]\nname = "tiny-random-llama"\ndtype = "float32"\n'
                      '[data]\nsamples = 1\nheldout_samples = 1\n' + sections)
    result = run_cli("--study", str(preset), "--out", str(tmp_path), "--quiet")
    assert result.returncode == 0, result.stderr
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'study.db'}")


def test_longrope2_mode_with_needle_driven_fitness(tmp_path):
    study = run_tiny_longrope2(tmp_path, "tiny_longrope2", '[fitness]\nkind = "needle-perplexity"\nneedles = 2\n'
                               '[search]\nn_trials = 8\npopulation = 4\nparents = 2\nmutants = 1\ncrossovers = 1\n'
                               'critical_dim = "auto"\n')
    factors = RopeFactors.load(tmp_path / "best_factors.json").rescale_factors
    critical_dim = study.user_attrs["search_space"]["critical_dim"]
    assert critical_dim == 2
    assert not any(name in study.best_params for name in ("factor_00", "factor_01"))
    for i in range(critical_dim):  # derived, NTK-shaped below the critical dim
        assert factors[i] == pytest.approx(factors[critical_dim] ** (i / critical_dim))


def test_dtype_flag_reaches_the_preset(tmp_path, monkeypatch):
    args = build_parser().parse_args(["--study", "llama2_16k", "--dtype", "bf16"])
    assert apply_overrides(load_preset("llama2_16k"), args).model.dtype == "bf16"
    no_flag = build_parser().parse_args(["--study", "llama2_16k"])
    assert apply_overrides(load_preset("llama2_16k"), no_flag).model.dtype == "float16"  # the reference's fp16
    seen = []

    def stop(preset):
        seen.append(preset.model.dtype)
        raise ValueError("stopped before loading the model")

    monkeypatch.setattr(run_module, "load_workload", stop)
    assert main(["--study", "tiny", "--out", str(tmp_path), "--dtype", "float16", "--quiet"]) == 2
    assert seen == ["float16"]


def test_an_invalid_dtype_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_module, "load_workload", lambda preset: pytest.fail("loaded despite a bad --dtype"))
    assert main(["--study", "tiny", "--out", str(tmp_path), "--dtype", "fp8", "--quiet"]) == 2
    stderr = capsys.readouterr().err
    assert stderr == f"error: unknown --dtype 'fp8'; choose from {', '.join(DTYPE_CHOICES)}\n"


def test_dtype_choices_are_what_the_loader_reads():
    for name in DTYPE_CHOICES:
        pick_dtype(name, torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown dtype"):
        pick_dtype("fp8", torch.device("cpu"))


def test_a_sweep_of_critical_dims_reports_the_best_of_each(tmp_path):
    """critical_dim = [2, 4]: one study, each trial keeps its lineage's d_c, the table has the best per d_c."""
    study = run_tiny_longrope2(tmp_path, "tiny_dc_sweep", '[search]\nn_trials = 26\npopulation = 18\nparents = 4\n'
                               'mutants = 2\ncrossovers = 2\ncritical_dim = [4, 2]\n')
    space = LongRoPESearchSpace.from_record(study.user_attrs["search_space"])
    assert space.critical_dims == (2, 4) and (space.lower, space.upper) == (4.0, 8.0)
    swept = {trial.params["critical_dim"] for trial in study.trials}
    assert swept == {2, 4}
    for trial in study.trials:
        factors = space.to_factors(trial.params).rescale_factors
        critical_dim = trial.params["critical_dim"]
        assert factors[:critical_dim] == pytest.approx([factors[critical_dim] ** (i / critical_dim)
                                                        for i in range(critical_dim)])
        assert all(4.0 <= f <= 8.0 for f in factors[critical_dim:])
        assert all(a < b for a, b in itertools.pairwise(factors))
    rows = json.loads((tmp_path / "results.json").read_text())["comparison"]
    methods = [row["method"] for row in rows]
    assert any(m.startswith("critical dim 2 (trial") for m in methods)
    assert any(m.startswith("critical dim 4 (trial") for m in methods)
    assert methods[-1].startswith("longrope (trial")
    assert min(row["searched"] for row in rows if row["method"].startswith("critical dim")) == rows[-1]["searched"]


def test_a_resume_under_other_data_settings_is_refused_with_one_line(tmp_path, capsys):
    """Values measured on other windows must not be ranked with the old ones (nor the cached baselines)."""
    base = ["--study", "tiny", "--out", str(tmp_path), "--quiet"]
    assert main([*base, "--n-trials", "4"]) == 0
    recorded = load_study(tmp_path).user_attrs["workload"]
    assert recorded["data.samples"] == 2 and recorded["dtype"] == "float32" and recorded["model_revision"]
    capsys.readouterr()
    for changed, line in ((["--samples", "1"], "data.samples = 2, not 1"),
                          (["--dtype", "bf16"], "dtype = 'float32', not 'bfloat16'"),
                          (["--target-length", "512"], "target_length = 256, not 512")):
        assert main([*base, "--n-trials", "6", *changed]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and line in err, err
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert len(load_study(tmp_path).get_trials(states=finished)) == 4  # nothing was run under the other settings
    assert main([*base, "--n-trials", "6"]) == 0  # the same settings continue
    assert len(load_study(tmp_path).get_trials(states=finished)) == 6


def test_ctrl_c_in_a_trial_requeues_it_at_once_and_the_rerun_runs_it_first(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real_measure = study_module.Workload.step_perplexity

    def interrupted(self, factors, step, desc="trial"):
        calls["n"] += 1
        if calls["n"] == 9:  # inside trial 4 (two windows a trial)
            raise KeyboardInterrupt
        return real_measure(self, factors, step, desc=desc)

    monkeypatch.setattr(study_module.Workload, "step_perplexity", interrupted)
    base = ["--study", "tiny", "--out", str(tmp_path), "--n-trials", "8", "--quiet"]
    assert main(base) == 130
    assert "queued to run first" in capsys.readouterr().err
    trials = load_study(tmp_path).trials
    stopped = trials[4]
    assert stopped.state.name == "FAIL" and stopped.user_attrs["interrupted"] is True
    waiting = [t for t in trials if t.state.name == "WAITING"]
    assert len(waiting) == 1 and waiting[0].system_attrs["failed_trial"] == 4 and waiting[0].params == stopped.params
    assert not [t for t in trials if t.state.name == "RUNNING"]

    assert main(base) == 0  # no heartbeat grace to wait for: the queued parameters run first
    trials = load_study(tmp_path).trials
    assert trials[waiting[0].number].state.name == "COMPLETE"
    assert sum(t.state.name == "COMPLETE" for t in trials) == 8


def test_sigterm_ends_the_run_like_ctrl_c(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "hpo.run", "--study", "tiny", "--out", str(tmp_path),
                                "--n-trials", "400", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    database = tmp_path / "study.db"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        time.sleep(0.5)
        try:
            with sqlite3.connect(database) as connection:
                if connection.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0] >= 6:
                    break
        except sqlite3.OperationalError:  # not created yet, or locked
            continue
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr.splitlines()[-1]
    trials = load_study(tmp_path).trials
    assert not [t for t in trials if t.state.name == "RUNNING"]  # ended, not left for the heartbeat to expire
    for stopped in (t for t in trials if t.user_attrs.get("interrupted")):
        assert [t.state.name for t in trials if t.system_attrs.get("failed_trial") == stopped.number] == ["WAITING"]


def test_a_new_study_never_overwrites_outputs_it_did_not_write(tmp_path, capsys):
    """A 0-byte study.db would start a new study over the only record left of the old one."""
    base = ["--study", "tiny", "--out", str(tmp_path), "--n-trials", "4", "--quiet"]
    assert main(base) == 0
    kept = {name: (tmp_path / name).read_bytes() for name in ("best_factors.json", "results.json")}
    (tmp_path / "study.db").write_bytes(b"")
    capsys.readouterr()
    assert main(base) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds best_factors.json, rope_parameters.json, results.json" in err
    assert {name: (tmp_path / name).read_bytes() for name in kept} == kept


def test_a_signal_while_a_trial_is_claimed_still_ends_that_trial(tmp_path, monkeypatch, capsys):
    """SIGTERM between asking the study for a trial and handing it over used to leave it RUNNING."""
    real_claim = TrialClaims.claim

    def claim_then_sigterm(self, *args, **kwargs):
        trial = real_claim(self, *args, **kwargs)
        if trial is not None and trial.number == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives inside the claim, after study.ask
        return trial

    monkeypatch.setattr(TrialClaims, "claim", claim_then_sigterm)
    assert main(["--study", "tiny", "--out", str(tmp_path), "--n-trials", "8", "--quiet"]) == 130
    trials = load_study(tmp_path).trials
    assert not [t for t in trials if t.state.name == "RUNNING"]
    assert trials[5].state.name == "FAIL" and trials[5].user_attrs["interrupted"] is True
    assert [t.system_attrs["failed_trial"] for t in trials if t.state.name == "WAITING"] == [5]


def test_hand_made_curves_open_the_search_and_their_tuned_members_are_rows(tmp_path, capsys):
    """NTK built for larger scales and YaRN with other betas are seeds; each family's best searched member is
    a row, with the precision it was measured in, and the summary line names the best baseline."""
    preset = tmp_path / "tiny_hand_made.toml"
    preset.write_text((PRESET_DIR / "tiny.toml").read_text().replace("hand_made_seeds = false", "")
                      .replace("n_trials = 16", "n_trials = 20"))
    assert main(["--study", str(preset), "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    study = optuna.load_study(study_name="tiny_hand_made", storage=f"sqlite:///{tmp_path / 'study.db'}")
    seeds = [t for t in study.trials if "seed" in t.user_attrs]
    assert len(seeds) > 4 and all(generation(t) == 0 for t in seeds)  # generation 0 grew to hold them all
    rows = {row["method"]: row for row in json.loads((tmp_path / "results.json").read_text())["comparison"]}
    assert {"ntk+attn", "yarn+attn", "longrope2-init"} <= set(rows)
    assert all(row["dtype"] == "float32" for row in rows.values())
    for family in ("ntk+attn", "yarn"):
        (tuned,) = [name for name in rows if name.startswith(f"{family} tuned: ")]
        members = [value for key, value in study.user_attrs.items()
                   if key == f"searched:{family}" or key.startswith(f"searched:{family} (")]
        assert rows[tuned]["searched"] == min(members) and len(members) == 4
    assert "against the best baseline" in out and "(essays, float32)" in out


def test_a_resumed_study_keeps_its_generation_0_when_the_seeds_change(tmp_path):
    """The sampler is sized from the seeds the study opened with, not from those the preset would add now."""
    assert main(["--study", "tiny", "--out", str(tmp_path), "--n-trials", "4", "--quiet"]) == 0
    preset = tmp_path / "tiny.toml"
    preset.write_text((PRESET_DIR / "tiny.toml").read_text().replace("hand_made_seeds = false", ""))
    assert main(["--study", str(preset), "--out", str(tmp_path), "--n-trials", "10", "--quiet"]) == 0
    trials = load_study(tmp_path).trials
    assert [generation(t) for t in trials] == [0] * 6 + [1] * 4  # population 6, as the study began
    assert sum("seed" in t.user_attrs for t in trials) == 4
