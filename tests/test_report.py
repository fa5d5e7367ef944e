"""Report figures from a real tiny study, and the HTML report as headless Chromium renders it offline."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.trial import TrialState, create_trial
from PIL import Image, ImageStat

from dashboards.figures import (
    convergence,
    factor_curves,
    passkey_heatmap,
    perplexity_vs_length,
    report_figures,
    start_tokens_effect,
    trial_generation,
)
from hpo.records import EvaluationRow, read_results, recorded_search_space, write_results

ERROR = "RuntimeError: out of memory"
PPL = {"none": {128: 20.0, 256: 60.0}, "yarn": {128: 20.5, 256: 25.0}, "longrope:tiny": {128: 20.4, 256: 24.0}}
PASSKEY = {("none", 256, 0.25): 1.0, ("none", 256, 0.75): 0.5, ("yarn", 256, 0.25): 1.0, ("yarn", 256, 0.75): 1.0,
           ("none", 128, 0.25): 1.0, ("none", 128, 0.75): 1.0, ("yarn", 128, 0.25): 0.5, ("yarn", 128, 0.75): 1.0}


def run_module(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    """The tiny preset searched for real, plus one failed and one pruned trial, and a copy named tiny_copy."""
    out = tmp_path_factory.mktemp("tiny")
    done = run_module("hpo.run", "--study", "tiny", "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    storage = f"sqlite:///{out / 'study.db'}"
    study = optuna.load_study(study_name="tiny", storage=storage)
    distributions = recorded_search_space(study).distributions()
    generation = {"LongRoPESampler:generation": 3}
    params = study.best_trial.params
    study.add_trial(create_trial(state=TrialState.FAIL, params=params, distributions=distributions,
                                 system_attrs=generation, user_attrs={"error": ERROR}))
    study.add_trial(create_trial(state=TrialState.PRUNED, params=params, distributions=distributions,
                                 system_attrs=generation, intermediate_values={0: 50_700.0}))
    optuna.copy_study(from_study_name="tiny", from_storage=storage, to_storage=storage, to_study_name="tiny_copy")
    return out


@pytest.fixture(scope="module")
def study(study_dir) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{study_dir / 'study.db'}")


@pytest.fixture(scope="module")
def results_file(tmp_path_factory) -> Path:
    rows = [EvaluationRow(method, length, 1.0, 2 * length, 2, task="ppl", perplexity=value)
            for method, by_length in PPL.items() for length, value in by_length.items()]
    rows += [EvaluationRow(method, length, 1.0, 2 * length, 2, task="passkey", accuracy=accuracy, depth=depth)
             for (method, length, depth), accuracy in PASSKEY.items()]
    path = tmp_path_factory.mktemp("results") / "evaluation.csv"
    write_results(rows, csv=path)
    return path


def test_factor_curves_show_the_best_trials_and_the_baselines(study):
    figure = factor_curves([study], top=5)
    space = recorded_search_space(study)
    best = study.best_trial
    names = [trace.name for trace in figure.data]
    best_trace = next(trace for trace in figure.data if f"trial {best.number} " in trace.name)
    assert list(best_trace.y) == list(space.to_factors(best.params).rescale_factors)
    assert list(best_trace.x) == list(range(space.num_factors))
    assert sum(trace.legendgroup == "tiny:top" for trace in figure.data) == 4
    assert {"pi", "ntk", "yarn"} <= set(names)
    pi = next(trace for trace in figure.data if trace.name == "pi")
    assert set(pi.y) == {2.0}  # PI at 2x: every factor s
    assert figure.layout.yaxis.type == "log"


def test_convergence_by_trial_and_generation_shows_pruned_and_failed_trials(study):
    figure = convergence([study])
    by_name = {}
    for trace in figure.data:
        by_name.setdefault(trace.name, []).append(trace)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert sorted(by_name["tiny: trial"][0].x) == sorted(t.number for t in complete)
    assert by_name["tiny: best so far"][0].y[-1] == study.best_value
    failed, pruned = by_name["tiny: fail (1)"], by_name["tiny: pruned (1)"]
    assert len(failed) == len(pruned) == 2  # one marker in each panel
    assert failed[0].text == (ERROR,) and failed[1].x == (3,)
    assert pruned[0].y == (50_700.0,)  # its last reported value
    assert failed[0].y == (max(t.value for t in complete),)  # no value: drawn at the top
    generations = sorted({trial_generation(t) for t in complete})
    best_of = by_name["tiny: best of generation"][0]
    assert list(best_of.x) == generations
    assert list(best_of.y) == [min(t.value for t in complete if trial_generation(t) == g) for g in generations]


def test_start_tokens_effect_groups_every_complete_trial(study):
    figure = start_tokens_effect([study])
    (box,) = figure.data
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(box.y) == len(complete)
    assert set(box.x) <= {"0", "2", "4"} and len(set(box.x)) > 1
    assert list(figure.layout.xaxis.categoryarray) == sorted(set(box.x), key=int)


def test_results_figures_show_the_measured_values(results_file):
    results = read_results(results_file)
    lines = {trace.name: trace for trace in perplexity_vs_length(results).data}
    assert set(lines) == set(PPL)
    for method, by_length in PPL.items():
        assert list(lines[method].x) == [128, 256]
        assert np.allclose(lines[method].y, [by_length[128], by_length[256]])

    heatmap = passkey_heatmap(results)
    panels = {title.text: trace for title, trace in zip(heatmap.layout.annotations, heatmap.data, strict=True)}
    assert set(panels) == {"none", "yarn"}
    for (method, length, depth), accuracy in PASSKEY.items():
        row, col = [0.25, 0.75].index(depth), [128, 256].index(length)
        assert panels[method].z[row][col] == accuracy
    assert list(panels["none"].y) == ["25%", "75%"] and list(panels["none"].x) == ["128", "256"]


def test_pooling_duplicate_cells_weights_by_prompts_and_tokens(results_file):
    results = read_results(results_file)
    extra = results[(results["method"] == "none") & (results["length"] == 256)].copy()
    extra["windows"] = 6  # three times the prompts, all wrong; three times the tokens at perplexity e
    extra["tokens"] = 3 * extra["tokens"]
    extra.loc[extra["task"] == "passkey", "accuracy"] = 0.0
    extra.loc[extra["task"] == "ppl", "perplexity"] = np.e
    doubled = pd.concat([results, extra], ignore_index=True)
    none = next(t for t in perplexity_vs_length(doubled).data if t.name == "none")
    assert none.y[1] == pytest.approx(np.exp((np.log(60.0) + 3 * 1.0) / 4))
    heatmap = passkey_heatmap(doubled)
    assert heatmap.layout.annotations[0].text == "none"
    assert heatmap.data[0].z[0][1] == pytest.approx(1.0 * 2 / 8)  # depth 25%, 256 tokens: 2 of 8 right


def test_report_figures_leave_out_what_the_results_do_not_hold(study, results_file):
    assert list(report_figures([study])) == ["factor-curves", "convergence", "start-tokens"]
    results = read_results(results_file)
    assert list(report_figures([study], results[results["task"] == "ppl"])) == [
        "factor-curves", "convergence", "perplexity-length", "start-tokens"]


# ---------------------------------------------------------------------------------------------------------------
# The HTML report in a real browser.

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=20000",
                  # offline: any attempt to fetch a script from the network fails
                  "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9"]
# Records uncaught errors and rejected promises on <html>, so --dump-dom shows them.
ERROR_PROBE = ("<script>addEventListener('error',e=>document.documentElement.dataset.jsErrors+=e.message+'|');"
               "addEventListener('unhandledrejection',e=>document.documentElement.dataset.jsErrors+=e.reason+'|');"
               "document.documentElement.dataset.jsErrors='';"
               "addEventListener('load',()=>document.documentElement.dataset.loaded='yes');</script>")


def chromium(page: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    binary = shutil.which("chromium")
    assert binary, "Debian's chromium package is needed: apt-get install -y chromium"
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    done = subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, page.as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def rendered_dom(report: Path, tmp_path: Path) -> str:
    probed = tmp_path / f"probed-{report.name}"
    probed.write_text(report.read_text().replace("<head>", "<head>" + ERROR_PROBE, 1))
    return chromium(probed, tmp_path, "--dump-dom").stdout


def html_element(dom: str, element_id: str) -> str:
    """The dumped DOM from the element with ``element_id`` up to the next section."""
    start = dom.index(f'<div id="{element_id}"')
    return dom[start:dom.find("</section>", start)]


def test_the_error_probe_catches_a_script_error(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><head></head><body><script>notDefined();</script></body></html>")
    assert "notDefined is not defined" in rendered_dom(page, tmp_path)


@pytest.mark.parametrize("comparison", [False, True], ids=["one-study", "two-studies"])
def test_report_renders_offline_in_chromium(study_dir, results_file, tmp_path, comparison):
    report = tmp_path / "report.html"
    studies = ["--study", "tiny", "--study", "tiny_copy"] if comparison else ["--study", "tiny"]
    done = run_module("dashboards.report", *studies, "--out", str(study_dir), "--results", str(results_file),
                      "--html", str(report))
    assert done.returncode == 0, done.stderr
    expected = ["factor-curves", "convergence", "perplexity-length", "passkey-accuracy", "start-tokens"]
    assert f"wrote {report} (5 figures: {', '.join(expected)})" in done.stdout
    page = report.read_text()
    assert re.search(r"<script[^>]*\bsrc=", page) is None  # plotly.js is inlined, nothing is fetched
    assert ("tiny_copy" in page) == comparison

    dom = rendered_dom(report, tmp_path)
    assert 'data-loaded="yes"' in dom and 'data-js-errors=""' in dom, dom[:300]
    for figure_id in expected:
        element = html_element(dom, figure_id)
        assert "js-plotly-plot" in element.split(">", 1)[0], f"{figure_id} was not plotted"
        assert element.count('class="main-svg"') >= 2 and ('class="trace' in element or 'class="hm"' in element)

    shot = tmp_path / "report.png"
    chromium(report, tmp_path, f"--screenshot={shot}", "--window-size=1300,3400")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1300, 3400)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200  # axes, lines, heatmap cells, text
    assert max(ImageStat.Stat(image.convert("L")).stddev) > 20


def test_report_without_results_leaves_those_figures_out(study_dir, tmp_path):
    report = tmp_path / "report.html"
    done = run_module("dashboards.report", "--study", "tiny", "--out", str(study_dir), "--html", str(report))
    assert done.returncode == 0, done.stderr
    assert "no evaluation results" in done.stdout and "3 figures" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--study", "nope"], "no study 'nope'"),
        (["--study", "tiny", "--results", "missing.csv"], "results file missing.csv does not exist"),
        (["--study", "tiny", "--study", "tiny_copy", "--out", "{dir}", "--out", "{dir}", "--out", "{dir}"],
         "give --out once, or once per --study"),
    ],
)
def test_bad_input_exits_2(study_dir, tmp_path, args, message):
    args = [arg.replace("{dir}", str(study_dir)) for arg in args]
    if "--out" not in args:
        args += ["--out", str(study_dir)]
    done = run_module("dashboards.report", *args, "--html", str(tmp_path / "r.html"))
    assert done.returncode == 2
    assert message in done.stderr
    assert not (tmp_path / "r.html").exists()
