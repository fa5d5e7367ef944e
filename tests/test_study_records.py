"""The records layer: readers that never load the runner, output directories checked before any work, damaged
study databases refused in one line, and readers of a study that has no complete trial yet."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
import sqlalchemy

from dashboards import report
from hpo import export, records
from hpo import run as run_module
from hpo.records import SEARCH_SPACE_ATTR, WORKLOAD_ATTR, StorageError, load_study
from hpo.run import main as run_main
from hpo.study import load_workload, open_study, search_space_for
from hpo.trials import TrialClaims, interrupt_trial
from studies import load_preset
from tests.conftest import deadline


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_readers_do_not_load_the_runner():
    readers = "hpo.evaluate, hpo.export, hpo.finetune, dashboards.report, dashboards.serve, dashboards.figures"
    runner = ("hpo.study", "hpo.sampler", "hpo.run", "hpo.ray_backend", "hpo.outputs", "hpo.early_stopping",
              "hpo.trials")
    done = subprocess.run([sys.executable, "-c", f"import sys, {readers}; print(' '.join(sorted(sys.modules)))"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not set(runner) & set(done.stdout.split())


@pytest.mark.parametrize("where", ["a file", "under a file", "not writable"])
def test_an_out_dir_that_cannot_hold_the_outputs_is_refused_before_any_work(tmp_path, capsys, where):
    blocker = tmp_path / "taken"
    blocker.write_text("not a directory")
    out = {"a file": blocker, "under a file": blocker / "run", "not writable": Path("/proc/longrope")}[where]
    storage = tmp_path / "elsewhere.db"  # an external storage: the outputs would be written after the whole search
    assert run_main(["--study", "tiny", "--out", str(out), "--storage", f"sqlite:///{storage}", "--quiet"]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"--out {out}" in err
    assert not storage.exists()  # nothing started
    assert blocker.read_text() == "not a directory"


def damaged_copy(run_dir, tmp_path, offset: int):
    out = tmp_path / f"damaged-{offset}"
    shutil.copytree(run_dir, out)
    with (out / "study.db").open("r+b") as database:  # a page overwritten with garbage (a disk or copy fault)
        database.seek(offset)
        database.write(b"\xa5" * 4096)
    return out


@pytest.mark.parametrize("offset", [8192, 81920])
def test_a_partly_damaged_study_database_is_one_line_for_every_command(run_dir, tmp_path, capsys, offset):
    out = damaged_copy(run_dir, tmp_path, offset)
    before = (out / "best_factors.json").read_bytes()
    assert run_main(["--study", "tiny", "--out", str(out), "--quiet"]) == 2
    assert "the SQLite file is damaged" in one_line(capsys.readouterr().err)
    assert report.main(["--study", "tiny", "--out", str(out)]) == 2
    assert "the SQLite file is damaged" in one_line(capsys.readouterr().err)
    assert export.main(["--study", "tiny", "--out", str(out), "--to", str(tmp_path / "model")]) == 2
    assert "the SQLite file is damaged" in one_line(capsys.readouterr().err)
    assert (out / "best_factors.json").read_bytes() == before
    with pytest.raises(StorageError, match="damaged"):
        load_study("tiny", out=out)


def study_without_complete_trial(run_dir, tmp_path):
    """A live study as it looks before its first trial completes: its records and one failed trial."""
    recorded = load_study("tiny", out=run_dir).user_attrs
    out = tmp_path / "live"
    out.mkdir()
    study = optuna.create_study(study_name="tiny", storage=f"sqlite:///{out / 'study.db'}")
    for key in (SEARCH_SPACE_ATTR, WORKLOAD_ATTR):
        study.set_user_attr(key, recorded[key])
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    return out


def test_report_of_a_study_without_complete_trial_says_so_and_defaults_to_its_directory(run_dir, tmp_path, capsys):
    out = study_without_complete_trial(run_dir, tmp_path)
    assert report.main(["--study", "tiny", "--out", str(out)]) == 0
    assert f"wrote {out / 'report.html'}" in capsys.readouterr().out
    page = (out / "report.html").read_text()
    assert report.NO_COMPLETE_TRIAL["factor-curves"] in page
    assert "Bold: the best trial" not in page

    assert report.main(["--study", "tiny", "--study", "tiny", "--out", str(run_dir), "--out", str(out),
                        "--html", str(tmp_path / "both.html")]) == 0
    assert "No complete trial yet in tiny" in (tmp_path / "both.html").read_text()


def test_serve_shows_a_live_study_before_its_first_complete_trial(run_dir, tmp_path):
    out = study_without_complete_trial(run_dir, tmp_path)
    server = subprocess.Popen([sys.executable, "-m", "dashboards.serve", "--study", "tiny", "--out", str(out),
                               "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(300, server.kill)
    watchdog.start()
    try:
        first_line = server.stdout.readline()
    finally:
        watchdog.cancel()
        server.terminate()
        _, err = server.communicate(timeout=30)
    assert first_line.startswith("Optuna Dashboard: http://127.0.0.1:"), err
    assert "has no complete trial yet" in err


def test_interruptions_do_not_use_up_the_retries_of_a_killed_trial(tmp_path, monkeypatch):
    """Two Ctrl-Cs on one proposal, then a SIGKILL: the proposal is still run again (Optuna's retry callback
    counts the interruptions and would drop it)."""
    monkeypatch.setattr(records, "HEARTBEAT_INTERVAL_S", 1)
    monkeypatch.setattr(records, "GRACE_PERIOD_S", 1)
    preset = load_preset("tiny")
    storage = records.open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    workload = load_workload(preset)
    space = search_space_for(preset, workload)
    study = open_study(preset, storage, space, workload)
    claims = TrialClaims(storage, study.study_name)
    distributions = space.distributions()
    first = claims.claim(study, distributions, 10)
    interrupt_trial(study, first)
    interrupt_trial(study, claims.claim(study, distributions, 10))  # the re-queued parameters
    claims.claim(study, distributions, 10)  # once more, and its worker is killed: no heartbeat from now on
    with deadline(60, "the killed worker's trial to go stale"):
        claims.wait(study, poll_s=0.1)  # fails the stale trial once its heartbeat is old, and re-queues it
    trials = study.get_trials()
    assert [t.state.name for t in trials[:3]] == ["FAIL", "FAIL", "FAIL"]
    waiting = [t for t in trials if t.state.name == "WAITING" and t.system_attrs.get("failed_trial") == 0]
    assert len(waiting) == 1 and waiting[0].params == first.params
    assert waiting[0].system_attrs["retry_history"] == [0, 1, 2]


@pytest.mark.parametrize("moment", ["attrs", "tell"])
def test_a_signal_while_a_finished_trial_is_recorded_keeps_its_result(tmp_path, monkeypatch, capsys, moment):
    """SIGTERM inside study.tell used to cut its transaction short (exit 1 with a traceback, the result lost);
    one while the trial's attrs were written, before tell, left it RUNNING (seen once in CI)."""
    tells = {"n": 0, "armed": False}
    real_open = run_module.open_storage

    def open_storage(url):
        storage = real_open(url)

        @sqlalchemy.event.listens_for(storage.engine, "after_cursor_execute")
        def signal_mid_tell(connection, cursor, statement, *args):
            if tells["armed"] and "trial_intermediate_values" in statement:  # tell reads the trial back
                tells["armed"] = False
                os.kill(os.getpid(), signal.SIGTERM)

        return storage

    real_tell, real_set_user_attr = optuna.Study.tell, optuna.Trial.set_user_attr

    def tell(self, trial, values=None, state=None, skip_if_finished=False):
        if values is not None:
            tells["n"] += 1
            tells["armed"] = tells["n"] == 3 and moment == "tell"
        return real_tell(self, trial, values, state, skip_if_finished)

    def set_user_attr(self, key, value):
        real_set_user_attr(self, key, value)
        if key == "seconds" and self.number == 2 and moment == "attrs":
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(run_module, "open_storage", open_storage)
    monkeypatch.setattr(optuna.Study, "tell", tell)
    monkeypatch.setattr(optuna.Trial, "set_user_attr", set_user_attr)
    assert run_main(["--study", "tiny", "--out", str(tmp_path), "--n-trials", "8", "--quiet"]) == 130
    assert "interrupted" in one_line(capsys.readouterr().err)
    trials = load_study("tiny", out=tmp_path).trials
    assert [t.state.name for t in trials[:3]] == ["COMPLETE"] * 3  # the third was being recorded: kept whole
    assert "RUNNING" not in {t.state.name for t in trials}


def test_the_pool_log_of_a_query_cut_short_by_a_signal_is_left_out(tmp_path, caplog):
    """A SIGINT inside a query's fetch made sqlalchemy log "Error closing cursor" with two tracebacks beside the
    run's one-line message (seen once in CI, 11 of 194 signals in a loop of storage reads); other pool
    errors are still logged."""
    storage = records.open_storage(f"sqlite:///{tmp_path / 'study.db'}")

    def log_error(cause: BaseException) -> None:
        try:
            try:
                raise cause
            except BaseException:
                raise sqlite3.ProgrammingError("Cannot operate on a closed database.") from None
        except sqlite3.ProgrammingError:
            storage.engine.pool.logger.error("Error closing cursor", exc_info=True)

    with caplog.at_level(logging.ERROR):
        log_error(KeyboardInterrupt("SIGINT"))
        assert not caplog.records
        log_error(OSError("disk I/O error"))
    assert [record.getMessage() for record in caplog.records] == ["Error closing cursor"]
