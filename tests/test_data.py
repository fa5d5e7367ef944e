"""Corpora and windows: every source type, both window modes, min_tokens, and the too-short and offline errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from objectives.data import DataError, load_documents, load_windows, token_windows
from studies import PresetError, load_preset


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


def test_the_embedded_stories_are_the_book_without_its_licence():
    """The second held-out text: Sherlock Holmes from a PyPI wheel, the Gutenberg header and footer cut off."""
    (book,) = load_documents("holmes")
    assert "SHERLOCK HOLMES" in book[:200] and "Walsall" in book[-200:] and len(book) > 500_000
    assert "PROJECT GUTENBERG" not in book.upper() and "War and Peace" not in book


def test_min_tokens_keeps_only_long_documents_like_the_reference():
    # documents of 50, 10, 40, 30 tokens; windows of BOS + 19 need 19, min_tokens raises the bar to 35
    windows = token_windows(streams(50, 10, 40, 30), length=20, samples=2, bos_token_id=7, mode="documents",
                            min_tokens=35)
    assert [w.tolist() for w in windows] == [[7, *range(19)], [7, *range(2000, 2019)]]
    # below the window's own need it changes nothing: a window is never shorter than asked
    assert token_windows(streams(50, 10, 40), length=20, samples=2, mode="documents", min_tokens=5)[1][0] == 2000
    with pytest.raises(DataError, match="2 of its 4 documents have at least 35 tokens"):
        token_windows(streams(50, 10, 40, 30), length=20, samples=3, mode="documents", min_tokens=35)


def test_min_tokens_in_stream_mode_is_an_error():
    with pytest.raises(DataError, match="min_tokens selects long documents"):
        token_windows([torch.arange(100)], length=20, samples=1, mode="stream", min_tokens=50)


def test_min_tokens_reaches_load_windows(tmp_path):
    for name, words in (("a.txt", 10), ("b.txt", 400), ("c.txt", 200)):
        (tmp_path / name).write_text(" ".join(["word"] * words))

    class WordTokenizer:  # one token per word; enough for load_windows and its token cache
        bos_token_id = 7

        def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
            return {"input_ids": [1] * len(text.split())}

        def __len__(self) -> int:
            return 8

    windows = load_windows(str(tmp_path), WordTokenizer(), 8, 2, min_tokens=100)
    assert len(windows) == 2  # b and c: a is long enough for a window but below min_tokens
    with pytest.raises(DataError, match=f"{tmp_path}: text too short: 3 windows .* 2 of its 3 documents have at "
                                        "least 100 tokens"):
        load_windows(str(tmp_path), WordTokenizer(), 8, 1, first_window=2, min_tokens=100)


def test_preset_min_tokens_is_checked():
    preset = load_preset("tiny")
    assert preset.data.min_tokens is None
    assert preset.replace(data__window_mode="documents", data__min_tokens=300).data.min_tokens == 300
    for bad in (0, -5, 1.5, "many", True):
        with pytest.raises(PresetError, match="data.min_tokens must be a positive integer"):
            preset.replace(data__min_tokens=bad)
    with pytest.raises(PresetError, match="window_mode 'stream' joins them"):
        preset.replace(data__window_mode="stream", data__min_tokens=300)


@pytest.mark.parametrize("name", ["llama2_16k", "llama2_32k", "llama2_128k", "mistral_32k", "llama3_128k"])
def test_pg19_presets_filter_documents_as_the_reference_scripts_do(name):
    data = load_preset(name).data
    assert (data.source, data.window_mode, data.samples, data.min_tokens) == ("pg19", "documents", 5, 131072)


def test_the_256k_preset_needs_documents_of_its_target_length():
    preset = load_preset("llama2_256k")
    assert preset.data.min_tokens == preset.target_length == 262144


def test_pg19_offline_is_a_quick_one_line_error(tmp_path):
    """No hub (as on this machine): a clear DataError at once, never a hang on the network.

    A fresh interpreter, because `datasets` and `huggingface_hub` read the offline switches when first imported.
    """
    code = ("from objectives.data import DataError, load_documents\n"
            "try:\n    load_documents('pg19')\n"
            "except DataError as error:\n    print(error)\n")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1
    assert result.stdout.startswith("could not load dataset 'emozilla/pg19' split 'validation' (offline?)")
    assert "Pass a local .txt/.jsonl/.parquet file instead." in result.stdout


class _Planted:
    """A pickle that would create ``marker`` when unpickled by a loader that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_token_cache_file_is_loaded_as_tensors_only(tmp_path, monkeypatch):
    """The cache is data: a file planted in its place must not run code; it is tokenized again instead."""
    monkeypatch.setenv("LONGROPE_HPO_CACHE", str(tmp_path / "cache"))
    (tmp_path / "doc.txt").write_text("one two three four five six")

    class WordTokenizer:
        bos_token_id = 7

        def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
            return {"input_ids": list(range(1, len(text.split()) + 1))}

        def __len__(self) -> int:
            return 8

    first = load_windows(str(tmp_path / "doc.txt"), WordTokenizer(), 4, 1, mode="stream")
    [cache_file] = (tmp_path / "cache" / "tokens").glob("*.pt")
    marker = tmp_path / "code-ran"
    torch.save([_Planted(marker)], cache_file)
    again = load_windows(str(tmp_path / "doc.txt"), WordTokenizer(), 4, 1, mode="stream")
    assert not marker.exists()
    assert [w.tolist() for w in again] == [w.tolist() for w in first] == [[1, 2, 3, 4]]
