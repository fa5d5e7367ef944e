"""RULER through lm-eval: its own tasks, offline, on the tiny model end to end, and the parser of its output."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import hpo.evaluate
from dashboards.figures import ruler_heatmap
from objectives.ruler import RulerError, parse_results


def test_the_parser_reads_each_tasks_score_at_the_length_and_skips_groups():
    output = {
        "results": {
            "niah_single_1": {"alias": "niah_single_1", "4096,none": -1, "4096_stderr,none": "N/A",
                              "8192,none": 0.75, "8192_stderr,none": "N/A"},
            "ruler_vt": {"4096,none": -1, "8192,none": 0.2},
            "ruler": {"4096,none": -1},  # the group's aggregate: RULER's own only averages 4096
        },
        "n-samples": {"niah_single_1": {"original": 4, "effective": 4}, "ruler_vt": {"original": 5, "effective": 5}},
    }
    assert parse_results(output, 8192) == [("niah_single_1", 0.75, 4), ("ruler_vt", 0.2, 5)]
    with pytest.raises(RulerError, match="no 16384-token sample of niah_single_1"):
        parse_results(output, 16384)


def test_ruler_tasks_run_offline_through_the_evaluation_entry_point(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the essay haystack must come from the embedded essays
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    results = tmp_path / "ruler.json"
    code = hpo.evaluate.main(["--model", "tiny-random-llama", "--methods", "none,yarn", "--lengths", "512",
                              "--tasks", "ruler:niah_single_1,ruler:niah_single_2", "--limit", "2",
                              "--json", str(results), "--no-progress"])
    assert code == 0
    rows = json.loads(results.read_text())["results"]
    cells = {(row["method"], row["task"]) for row in rows}
    assert cells == {(m, f"ruler:{t}") for m in ("none", "yarn") for t in ("niah_single_1", "niah_single_2")}
    for row in rows:
        assert row["windows"] == 2 and 0.0 <= row["accuracy"] <= 1.0 and row["perplexity"] is None
        assert row["length"] == 512 and row["tokens"] > 0
    assert "ruler:niah_single_2: score over samples" in capsys.readouterr().out
    figure = ruler_heatmap(pd.DataFrame(rows))
    assert [panel.name for panel in figure.data] == [None, None] and len(figure.data) == 2  # one per method
    assert list(figure.data[0].y) == ["niah_single_1", "niah_single_2"]


def test_an_unknown_ruler_task_is_a_one_line_error(capsys):
    assert hpo.evaluate.main(["--model", "tiny-random-llama", "--tasks", "ruler:qa_squad"]) == 2
    assert "unknown task(s) ruler:qa_squad" in capsys.readouterr().err


def test_a_length_too_short_for_variable_tracking_is_a_one_line_error(capsys, monkeypatch):
    # lm-eval's own builder would retry forever at this length (its smallest sample with the in-context example
    # is ~850 tokens), deaf to Ctrl-C
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hpo.evaluate.main(["--model", "tiny-random-llama", "--methods", "none", "--lengths", "512",
                              "--tasks", "ruler:ruler_vt", "--limit", "1", "--no-progress"]) == 2
    assert "ruler_vt's smallest sample takes" in capsys.readouterr().err
