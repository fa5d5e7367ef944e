"""Corpora and windows: every source type, both window modes, and the too-short errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from objectives.data import DataError, load_documents, token_windows


def streams(*lengths: int) -> list[torch.Tensor]:
    return [torch.arange(n) + 1000 * i for i, n in enumerate(lengths)]


def test_documents_mode_takes_the_first_tokens_of_each_long_enough_document():
    windows = token_windows(streams(50, 10, 40, 30), length=30, samples=3, mode="documents")
    assert [w.tolist() for w in windows] == [list(range(30)), list(range(2000, 2030)), list(range(3000, 3030))]


def test_documents_mode_with_bos_is_bos_plus_length_minus_one():
    windows = token_windows(streams(50), length=8, samples=1, bos_token_id=7, mode="documents")
    assert windows[0].tolist() == [7, 0, 1, 2, 3, 4, 5, 6]


def test_stream_mode_cuts_consecutive_windows_and_skips():
    windows = token_windows([torch.arange(100)], length=20, samples=2, first_window=1, mode="stream")
    assert [w.tolist() for w in windows] == [list(range(20, 40)), list(range(40, 60))]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"length": 60, "samples": 1, "mode": "documents"}, "0 of its 2 documents have at least 60"),
        ({"length": 20, "samples": 3, "mode": "documents"}, "3 windows of 20 tokens asked"),
        ({"length": 30, "samples": 4, "mode": "stream"}, "holds 90 tokens, 3 windows"),
        ({"length": 30, "samples": 3, "first_window": 1, "mode": "stream"}, "skipping 1"),
    ],
)
def test_too_short_is_a_clear_error(kwargs, message):
    with pytest.raises(DataError, match=message):
        token_windows(streams(50, 40) if kwargs["mode"] == "documents" else [torch.arange(90)], **kwargs)


def test_local_sources(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    assert load_documents(str(tmp_path)) == ["first", "second"]
    assert load_documents(str(tmp_path / "a.txt")) == ["first"]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in ["x", "y"]) + "\n")
    assert load_documents(str(jsonl)) == ["x", "y"]
    parquet = tmp_path / "docs.parquet"
    pd.DataFrame({"text": ["p", "q"]}).to_parquet(parquet)
    assert load_documents(str(parquet)) == ["p", "q"]


def test_bad_sources(tmp_path):
    with pytest.raises(DataError, match="unknown corpus"):
        load_documents(str(tmp_path / "missing"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1 has no string field 'text'"):
        load_documents(str(bad))
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(DataError, match="unsupported file type"):
        load_documents(str(tmp_path / "x.csv"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .txt files"):
        load_documents(str(empty))


def test_embedded_essays_are_real_text():
    documents = load_documents("essays")
    assert len(documents) > 40
    assert sum(len(d) for d in documents) > 500_000
    assert "startup" in " ".join(documents).lower()
