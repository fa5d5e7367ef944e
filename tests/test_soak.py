"""Kill/resume soak: `hpo.run` on the tiny preset, killed again and again at random moments, then let finish.

Each launch is a subprocess that is killed with SIGKILL, SIGTERM or SIGINT (drawn from a seeded
``random.Random``; ``LONGROPE_SOAK_SEED`` picks another seed) at one of three moments:

- ``startup``: after a random delay from launch, mostly while Python imports torch or the model loads;
- ``search``: a random delay after this launch has finished 1 or 2 more trials, so it lands in a claim,
  a trial or its ``tell``;
- ``finish``: (the last kill) a random delay after the study holds all its trials, while the best
  trial is compared with the baselines and the outputs are written.

A last launch is left to finish and must exit 0. The study must then hold exactly the asked trials,
nothing running or waiting, and every failed trial's parameters re-run by a later trial (Optuna's
retry records); the output files must agree with the storage. The workers run with a 1 s heartbeat
and a 2 s grace period, so a SIGKILLed worker's trial goes stale within seconds, not half a minute.
A signal that Python drops (a KeyboardInterrupt raised inside a finalizer is only printed) lets that
launch run on to exit 0: tolerated, and counted in the printed figures (``pytest -s`` shows them).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

SEED = int(os.environ.get("LONGROPE_SOAK_SEED", "20240611"))
N_TRIALS = 30
STUDY = "tiny"
EVALUATED = (TrialState.COMPLETE, TrialState.PRUNED)
SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT)
LAUNCH_TIMEOUT_S = 90  # a launch that has not reached its kill point (or ended) by then has hung
EXIT_TIMEOUT_S = 30  # a signalled worker that has not exited by then has hung
# Python's report of an exception it could not raise: a KeyboardInterrupt (SIGINT, or SIGTERM through hpo.run's
# handler) that arrived while a finalizer, a weakref callback or an atexit callback ran is printed so and dropped.
SWALLOWED_INTERRUPT = re.compile(
    r"^Exception ignored in(?: atexit callback)?: [^\n]*\nTraceback \(most recent call last\):\n(?:(?:  [^\n]*)?\n)*"
    r"KeyboardInterrupt\b[^\n]*\n?", re.MULTILINE)

# `python -m hpo.run` with short heartbeats: the module that defines open_storage reads them at call time.
RUNNER = """
import importlib, sys
try:
    module = importlib.import_module("hpo.records")
except ModuleNotFoundError as error:
    if error.name != "hpo.records":
        raise
    module = importlib.import_module("hpo.study")
module = importlib.import_module(module.open_storage.__module__)
module.HEARTBEAT_INTERVAL_S = 1
module.GRACE_PERIOD_S = 2
from hpo.run import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def out_dir(tmp_path) -> Iterator[Path]:
    """The study's output directory: on tmpfs where there is one, so that SQLite's fsyncs (a third of a trial's
    time on this machine's disk) do not slow the soak; a killed process loses nothing there either."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path / "out"
        return
    directory = Path(tempfile.mkdtemp(prefix="longrope-soak-", dir=shm))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def finished_trials(database: Path) -> int | None:
    """Complete or pruned trials in the study database; None while it cannot be read (not made yet, locked)."""
    if not database.exists():
        return None
    try:
        with closing(sqlite3.connect(database, timeout=0.5)) as connection:
            return connection.execute(
                "select count(*) from trials where state in ('COMPLETE', 'PRUNED')").fetchone()[0]
    except sqlite3.Error:  # tables not created yet, or locked by a writer
        return None


def kill_plan(rng: random.Random) -> list[tuple[signal.Signals, str]]:
    """6 or 7 kills: every signal at least once, at least one start-up kill and two in the search, the last one
    while the finished study writes its outputs."""
    n_kills = rng.randint(6, 7)
    signals = [*SIGNALS, *rng.choices(SIGNALS, k=n_kills - len(SIGNALS))]
    rng.shuffle(signals)
    phases = ["startup", "search", "search", *rng.choices(["startup", "search"], weights=[1, 2], k=n_kills - 4)]
    rng.shuffle(phases)
    return list(zip(signals, [*phases, "finish"], strict=True))


def test_kill_and_resume_soak_loses_no_trial(tmp_path, out_dir):
    rng = random.Random(SEED)
    database = out_dir / "study.db"
    command = [sys.executable, "-c", RUNNER, "--study", STUDY, "--out", str(out_dir), "--n-trials", str(N_TRIALS),
               "--quiet"]
    started = time.monotonic()
    launches: list[str] = []  # one line per launch, for the report
    sent: Counter[str] = Counter()
    phases_hit: Counter[str] = Counter()
    exit_codes: Counter[int] = Counter()
    swallowed: list[str] = []  # launches whose signal Python dropped (see SWALLOWED_INTERRUPT)
    unclean: list[str] = []  # launches that did not end as their signal should end them: checked last

    def launch(index: int) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"launch{index}.stderr"
        with log.open("w") as stderr:
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        return process, log

    def wait_until(process: subprocess.Popen, *, moment: float | None = None, finished: int | None = None) -> bool:
        """Poll until the clock reaches ``moment`` or the study holds ``finished`` trials; False when the
        process ended first."""
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while process.poll() is None:
            if moment is not None and time.monotonic() >= moment:
                return True
            if finished is not None and (finished_trials(database) or 0) >= finished:
                return True
            assert time.monotonic() < deadline, f"launch {len(launches)} hung: {process.args}"
            time.sleep(0.1)
        return False

    for index, (signum, phase) in enumerate(kill_plan(rng)):
        before = finished_trials(database) or 0
        if phase == "search" and before + 2 > N_TRIALS - 2:  # too few trials left to land inside one
            phase = "startup"
        process, log = launch(index)
        launched = time.monotonic()
        try:
            if phase == "startup":
                delay = rng.uniform(0.2, 8.0)
                waited = wait_until(process, moment=launched + delay)
                where = f"{delay:.2f}s after launch"
            elif phase == "search":
                more, delay = rng.randint(1, 2), rng.uniform(0.0, 0.8)
                waited = wait_until(process, finished=before + more)
                where = f"{delay:.2f}s after {more} more trial(s)"
            else:
                delay = rng.uniform(0.0, 0.6)
                waited = wait_until(process, finished=N_TRIALS)
                where = f"{delay:.2f}s after the last trial"
            if waited and phase != "startup":
                time.sleep(delay)
            if process.poll() is None:
                process.send_signal(signum)
                sent[signum.name] += 1
                phases_hit[phase] += 1
            else:
                where += " (had already ended)"
            try:
                code = process.wait(timeout=EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"launch {index} did not exit within {EXIT_TIMEOUT_S}s of {signum.name} "
                                     f"({phase}, {where}): {log.read_text()[-2000:]}") from None
        finally:  # a launch that hung is not left running
            if process.poll() is None:
                process.kill()
                process.wait()
        stderr = log.read_text()
        dropped = SWALLOWED_INTERRUPT.search(stderr) is not None
        exit_codes[code] += 1
        launches.append(f"launch {index}: {signum.name:<7} {phase:<7} {where}: exit {code}, "
                        f"{(finished_trials(database) or 0) - before:+d} finished trials "
                        f"at {time.monotonic() - started:.1f}s" + (" (signal dropped by Python)" if dropped else ""))
        print(launches[-1])
        if dropped:
            swallowed.append(launches[-1])
        # SIGKILL ends it at once; SIGTERM and SIGINT end it cleanly (130, no traceback) while `main` runs, and
        # as Python's default handlers do before it (an import, in start-up) and after it returned (at the finish,
        # outputs written). Exit 0: the launch finished the study before its signal came (only possible at the
        # finish), or Python dropped the signal and it went on; a SIGINT in start-up, before `main` holds the
        # signals, was also seen swallowed silently by an import (once in CI): a known gap, not a lost trial.
        # Python ends on an uncaught KeyboardInterrupt by SIGINT (-2), but with status 1 when it lands inside
        # some imports (scipy's, sqlalchemy's: 5 of 15 start-up SIGINTs here, after torch has loaded), its
        # traceback then being the only output: Python's default too, and nothing had started.
        allowed = {-signum} if signum == signal.SIGKILL else {130}
        if phase in ("startup", "finish"):
            allowed.add(-signum)
        if phase == "startup" and signum == signal.SIGINT and stderr.rstrip().endswith("\nKeyboardInterrupt"):
            allowed.add(1)
        if phase == "finish" or dropped or (phase == "startup" and signum != signal.SIGKILL):
            allowed.add(0)
        # The soak goes on after an unclean exit, so that the storage is still checked after it.
        what = f"launch {index}: {signum.name} ({phase}, {where}) gave exit {code}"
        if code not in allowed or (code in (0, 130) and "Traceback" in SWALLOWED_INTERRUPT.sub("", stderr)) or (
                code == 130 and "interrupted" not in stderr):
            unclean.append(f"{what}:\n{stderr[-6000:]}")
            print(f"UNCLEAN {what}, stderr ends: {stderr.strip().splitlines()[-1:]}")

    final_started = time.monotonic()
    final = subprocess.run(command, capture_output=True, text=True, timeout=180)
    final_s = time.monotonic() - final_started
    assert final.returncode == 0, final.stderr
    assert "Traceback" not in final.stderr, final.stderr
    launches.append(f"launch {len(launches)}: left to finish in {final_s:.1f}s: exit 0")
    wall_s = time.monotonic() - started

    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{database}")
    trials = study.trials
    by_number = {t.number: t for t in trials}
    states = Counter(t.state for t in trials)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    retries = [t for t in trials if "failed_trial" in t.system_attrs]
    interrupted = [t for t in failed if t.user_attrs.get("interrupted")]
    # Optuna's retry records: each re-queued trial names the first failed trial of its chain and the chain so far
    retry_of: dict[int, list[int]] = {}
    for retry in retries:
        retry_of.setdefault(retry.system_attrs["retry_history"][-1], []).append(retry.number)

    def chain(trial) -> str:
        how = "interrupted" if trial.user_attrs.get("interrupted") else "stale" if trial.state == TrialState.FAIL \
            else trial.state.name
        following = retry_of.get(trial.number, [])
        return f"{trial.number} {how}" + "".join(f" -> {chain(by_number[n])}" for n in following)

    print(f"seed {SEED}: {len(launches)} launches, kills {dict(sent)} by phase {dict(phases_hit)}, "
          f"exit codes {dict(exit_codes)}, {len(swallowed)} signal(s) dropped by Python, "
          f"{len(unclean)} unclean exit(s)")
    print(f"{len(trials)} trials: {({s.name: n for s, n in states.items()})}; {len(failed)} failed "
          f"({len(interrupted)} interrupted by SIGTERM/SIGINT, {len(failed) - len(interrupted)} stale after "
          f"SIGKILL), {len(retries)} retries, longest retry chain "
          f"{max((len(t.system_attrs['retry_history']) for t in retries), default=0)}")
    for trial in failed:
        if "failed_trial" not in trial.system_attrs:
            print(f"retry chain: {chain(trial)}")
    print(f"wall time {wall_s:.1f}s (final launch {final_s:.1f}s)")

    assert sum(states[s] for s in EVALUATED) == N_TRIALS, states
    assert states[TrialState.RUNNING] == states[TrialState.WAITING] == 0, states
    for retry in retries:
        history = retry.system_attrs["retry_history"]
        assert history and history[0] == retry.system_attrs["failed_trial"], retry.system_attrs
        parent = by_number[history[-1]]
        assert parent.state == TrialState.FAIL and parent.number < retry.number, (parent.number, retry.number)
        assert history == [*parent.system_attrs.get("retry_history", []), parent.number], (parent.number, history)
    for trial in failed:
        assert "error" not in trial.user_attrs, f"trial {trial.number} raised: {trial.user_attrs['error']}"
        assert trial.number in retry_of, (f"proposal of failed trial {trial.number} lost: never re-queued "
                                          f"(retry chain {chain(trial)}, system attrs {trial.system_attrs})")
        assert len(retry_of[trial.number]) == 1, f"trial {trial.number} re-queued more than once: {chain(trial)}"
        retry = by_number[retry_of[trial.number][0]]
        # study.ask stores the parameters one by one: a kill inside it leaves some, all kept in the retry
        assert trial.params.items() <= retry.params.items(), (trial.number, trial.params, retry.params)
        end = retry
        while end.state == TrialState.FAIL and end.number in retry_of:
            end = by_number[retry_of[end.number][0]]
        assert end.state in EVALUATED, f"retry chain of trial {trial.number} ends in {end.state.name}: {chain(trial)}"

    factors = json.loads((out_dir / "best_factors.json").read_text())
    assert factors["metadata"]["trial"] == study.best_trial.number
    assert factors["metadata"]["searched_perplexity"] == study.best_value
    summary = json.loads((out_dir / "results.json").read_text())
    assert summary["trials"] == {state.name.lower(): states[state] for state in TrialState}
    assert not unclean, "\n\n".join(unclean)
