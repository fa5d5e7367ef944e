"""`python -m dashboards.serve`: a real tiny study's figures and factor files, served by optuna-dashboard."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import optuna
import pytest
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta

from dashboards.figures import report_figures
from dashboards.serve import is_loopback, publish, read_only
from hpo.records import best_factors

FIGURE_IDS = {"factor-curves", "convergence", "start-tokens"}


def get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, response.headers.get_content_type(), response.read()


@pytest.mark.parametrize("layout", ["run-dir", "storage-only"])
def test_server_lists_the_saved_figures_and_artifacts(run_dir, tmp_path, layout):
    """From a run directory the factor files on disk are uploaded; from a bare storage, the best trial's."""
    if layout == "run-dir":
        out = tmp_path / "run"
        shutil.copytree(run_dir, out)
        where = ["--out", str(out)]
    else:
        out = tmp_path / "elsewhere"
        shutil.copy(run_dir / "study.db", tmp_path / "moved.db")
        where = ["--storage", f"sqlite:///{tmp_path / 'moved.db'}", "--out", str(out)]
    server = subprocess.Popen([sys.executable, "-m", "dashboards.serve", "--study", "tiny", *where, "--port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(300, server.kill)  # a hung start must not hang the suite
    watchdog.start()
    try:
        first_line = server.stdout.readline()
        assert first_line.startswith("Optuna Dashboard: http://127.0.0.1:"), server.stderr.read()
        base = first_line.split()[-1].split("/dashboard/")[0]

        status, kind, body = get(f"{base}/api/studies")
        studies = {s["study_name"]: s["study_id"] for s in json.loads(body)["study_summaries"]}
        assert status == 200 and set(studies) == {"tiny"}
        assert first_line.strip().endswith(f"/dashboard/studies/{studies['tiny']}")

        detail = json.loads(get(f"{base}/api/studies/{studies['tiny']}")[2])
        figures = {g["id"]: json.loads(g["graph_object"]) for g in detail["plotly_graph_objects"]}
        assert set(figures) == FIGURE_IDS  # no evaluation results here: the study's own figures
        assert figures["factor-curves"]["layout"]["title"]["text"] == "Rescale factor per RoPE dimension"
        assert all(figure["data"] for figure in figures.values())

        artifacts = {a["filename"]: a["artifact_id"] for a in detail["artifacts"]}
        expected = {"best_factors.json", "rope_parameters.json"} if layout == "run-dir" else {"best_factors.json"}
        assert set(artifacts) == expected
        for name, artifact_id in artifacts.items():
            status, _, content = get(f"{base}/artifacts/{studies['tiny']}/{artifact_id}")
            assert status == 200
            if layout == "run-dir":
                assert content == (out / name).read_bytes()
            else:
                study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'moved.db'}")
                assert json.loads(content) == best_factors(study).to_dict()
        assert len(list((out / "artifacts").iterdir())) == len(expected)

        status, kind, _ = get(f"{base}/dashboard")
        assert status == 200 and kind == "text/html"

        # read-only by default: the API's unauthenticated DELETE would remove the study and its trials
        delete = urllib.request.Request(f"{base}/api/studies/{studies['tiny']}", method="DELETE")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(delete, timeout=30)
        assert refused.value.code == 403 and b"read-only" in refused.value.read()
        remaining = json.loads(get(f"{base}/api/studies")[2])["study_summaries"]
        assert [summary["study_name"] for summary in remaining] == ["tiny"]
    finally:
        watchdog.cancel()
        server.terminate()
        server.wait(timeout=30)


def test_publishing_again_replaces_figures_and_skips_unchanged_files(run_dir, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    shutil.copy(run_dir / "study.db", tmp_path / "study.db")
    study = optuna.load_study(study_name="tiny", storage=storage)
    store = FileSystemArtifactStore(str(tmp_path / "artifacts"))
    (tmp_path / "artifacts").mkdir()
    files = [run_dir / "best_factors.json", run_dir / "rope_parameters.json"]
    figures = report_figures([study])

    assert publish(study, figures, files, store) == files
    assert publish(study, figures, files, store) == []
    changed = tmp_path / "best_factors.json"
    changed.write_text(files[0].read_text().replace('"method": "longrope"', '"method": "longrope-v2"'))
    assert publish(study, figures, [changed], store) == [changed]

    metas = get_all_artifact_meta(study)
    assert sorted(meta.filename for meta in metas) == ["best_factors.json", "best_factors.json", "rope_parameters.json"]
    system_attrs = study._storage.get_study_system_attrs(study._study_id)
    plot_ids = {key.split(":")[2] for key in system_attrs if key.startswith("dashboard:plot_data:")}
    assert plot_ids == FIGURE_IDS


def test_unknown_study_exits_2(run_dir):
    done = subprocess.run([sys.executable, "-m", "dashboards.serve", "--study", "nope", "--out", str(run_dir),
                           "--port", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "no study 'nope'" in done.stderr and "tiny" in done.stderr


def test_read_only_refuses_every_api_write_and_passes_reads():
    calls = []

    def app(environ, start_response):
        calls.append(environ["REQUEST_METHOD"])
        start_response("200 OK", [])
        return [b"ok"]

    guarded = read_only(app)
    statuses = []
    for method, path in [("DELETE", "/api/studies/1"), ("POST", "/api/studies/1/note"), ("PUT", "/api/trials/3"),
                         ("PATCH", "/api/studies/1"), ("GET", "/api/studies"), ("HEAD", "/api/studies/1"),
                         ("GET", "/dashboard")]:
        guarded({"REQUEST_METHOD": method, "PATH_INFO": path}, lambda status, headers: statuses.append(status))
    assert statuses[:4] == ["403 Forbidden"] * 4 and statuses[4:] == ["200 OK"] * 3
    assert calls == ["GET", "HEAD", "GET"]


def test_only_loopback_hosts_count_as_private():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")
