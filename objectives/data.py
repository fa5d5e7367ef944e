"""Long-text corpora and the token windows that perplexity is measured on.

A corpus is named by a source string:

- ``essays``: the embedded Paul Graham essays (about 154k SmolLM2 tokens);
- ``holmes``: the embedded held-out text of another kind, Conan Doyle's *The Adventures of
  Sherlock Holmes* (public domain, about 130k SmolLM2 tokens), which no preset searches on;
- a local ``.txt`` file, a directory of ``.txt`` files, a ``.jsonl`` file (one
  ``{"text": ...}`` per line) or a ``.parquet`` file (a ``text`` column);
- ``pg19``, ``proof-pile`` or ``hf:NAME[:SPLIT]``: a Hugging Face dataset through
  the optional ``datasets`` package (it must be installed and reachable or cached).

Windows are cut in one of two modes. ``documents`` (the papers' setting) takes
the first ``length`` tokens of each document long enough, optionally starting
with BOS. ``stream`` joins all documents and cuts consecutive windows, which
suits a corpus of many short texts such as the essays. Asking for more than the
corpus holds is an error, never a silently shorter window.

``min_tokens`` (``documents`` mode only) reads PG19 as the LongRoPE reference
does (``--dataset-min-tokens 131072``): only documents of at least that many
tokens count, so the same few long books are measured at every target length,
instead of whichever documents happen to be just long enough.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch

from models import assets
from models.atomic import written_atomically

EMBEDDED_CORPUS = "essays"
HOLMES_CORPUS = "holmes"
HF_DATASETS = {"pg19": ("emozilla/pg19", "validation"), "proof-pile": ("hoskinson-center/proof-pile", "validation")}
WINDOW_MODES = ("documents", "stream")


class DataError(ValueError):
    """A corpus that cannot be read, or that is too short for what was asked."""


def read_utf8(path: Path) -> str:
    """The text of ``path``; a file that is not UTF-8 is a :class:`DataError` naming it and the first bad byte."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"cannot read {path}: not UTF-8 text "
                        f"(byte 0x{error.object[error.start]:02x} at offset {error.start})") from None


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    for number, line in enumerate(read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number} is not JSON: {error}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{number} has no string field 'text'")
        texts.append(record["text"])
    return texts


def _read_parquet(path: Path) -> list[str]:
    import pandas as pd

    frame = pd.read_parquet(path)
    if "text" not in frame.columns:
        raise DataError(f"{path} has no 'text' column (columns: {', '.join(frame.columns)})")
    return [str(text) for text in frame["text"]]


def _read_hf_dataset(name: str, split: str) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading {name!r} needs the datasets package: pip install 'longrope-hpo[datasets]'") from None
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as error:  # network, auth and format errors all surface differently
        reason = " ".join(str(error).split())  # one line: some hub errors span several
        raise DataError(f"could not load dataset {name!r} split {split!r} (offline?): {reason}. "
                        "Pass a local .txt/.jsonl/.parquet file instead.") from None
    return [str(text) for text in dataset["text"]]


def load_documents(source: str) -> list[str]:
    """The documents of ``source`` (see the module docstring), in a stable order."""
    if source == EMBEDDED_CORPUS:
        return [path.read_text() for path in sorted(assets.essays_dir().glob("*.txt"))]
    if source == HOLMES_CORPUS:
        return [assets.holmes_text()]
    if source in HF_DATASETS:
        return _read_hf_dataset(*HF_DATASETS[source])
    if source.startswith("hf:"):
        name, _, split = source[3:].partition(":")
        return _read_hf_dataset(name, split or "validation")
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise DataError(f"directory {path} holds no .txt files")
        return [read_utf8(file) for file in files]
    if not path.is_file():
        raise DataError(f"unknown corpus {source!r}: not '{EMBEDDED_CORPUS}', '{HOLMES_CORPUS}', a dataset name, "
                        "or an existing path")
    readers = {".txt": lambda p: [read_utf8(p)], ".jsonl": _read_jsonl, ".parquet": _read_parquet}
    if path.suffix not in readers:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .txt, .jsonl or .parquet")
    return readers[path.suffix](path)


def default_window_mode(source: str) -> str:
    """The embedded texts read as one stream (the essays are short, the stories one book); real corpora by
    document."""
    return "stream" if source in (EMBEDDED_CORPUS, HOLMES_CORPUS) else "documents"


def _tokenizer_key(tokenizer) -> str:
    probe = tokenizer("The quick brown fox, 0123456789!", add_special_tokens=False)["input_ids"]
    return f"{type(tokenizer).__name__}:{len(tokenizer)}:{probe}"


def tokenize_documents(documents: Sequence[str], tokenizer, mode: str) -> list[torch.Tensor]:
    """Token ids per document (or one stream), cached on disk by content and tokenizer."""
    if mode not in WINDOW_MODES:
        raise DataError(f"unknown window mode {mode!r}; choose from {', '.join(WINDOW_MODES)}")
    texts = ["".join(documents)] if mode == "stream" else list(documents)
    digest = hashlib.sha256(_tokenizer_key(tokenizer).encode())
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    cache_file = assets.cache_dir() / "tokens" / f"{digest.hexdigest()[:32]}.pt"
    if cache_file.is_file():
        try:  # tensors only: a cache file is data, and loading it must never run code
            return torch.load(cache_file, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError):  # foreign or truncated: tokenize again
            pass
    streams = [torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
               for text in texts]
    with written_atomically(cache_file) as scratch:
        torch.save(streams, scratch)
    return streams


def token_windows(
    streams: Sequence[torch.Tensor],
    length: int,
    samples: int,
    *,
    first_window: int = 0,
    bos_token_id: int | None = None,
    mode: str = "documents",
    min_tokens: int | None = None,
) -> list[torch.Tensor]:
    """``samples`` windows of exactly ``length`` tokens, skipping the first ``first_window``.

    ``documents`` mode takes one window per stream long enough: at least the window's
    text and at least ``min_tokens``. ``stream`` mode cuts consecutive windows from
    the single joined stream, where documents and so ``min_tokens`` have no meaning
    (an error, not silently ignored). With ``bos_token_id``, each window is BOS
    followed by ``length - 1`` tokens.
    """
    if length < 2 or samples < 1:
        raise DataError(f"need length >= 2 and samples >= 1, got length={length}, samples={samples}")
    body = length - (bos_token_id is not None)
    if mode == "stream":
        if min_tokens is not None:
            raise DataError("min_tokens selects long documents; stream mode joins them into one stream: "
                            "use documents mode or leave min_tokens unset")
        stream = torch.cat(list(streams))
        available = stream.numel() // body
        bodies = [stream[i * body:(i + 1) * body] for i in range(available)]
        what = f"the corpus holds {stream.numel():,} tokens, {available} windows of {length:,}"
    elif mode == "documents":
        shortest = max(body, min_tokens or 0)
        bodies = [s[:body] for s in streams if s.numel() >= shortest]
        what = f"{len(bodies)} of its {len(streams)} documents have at least {shortest:,} tokens"
    else:
        raise DataError(f"unknown window mode {mode!r}; choose from {', '.join(WINDOW_MODES)}")
    needed = first_window + samples
    if len(bodies) < needed:
        raise DataError(f"text too short: {needed} windows of {length:,} tokens asked "
                        f"(skipping {first_window}), but {what}")
    chosen = bodies[first_window:needed]
    if bos_token_id is None:
        return chosen
    return [torch.cat([torch.tensor([bos_token_id]), b]) for b in chosen]


def load_windows(
    source: str,
    tokenizer,
    length: int,
    samples: int,
    *,
    first_window: int = 0,
    mode: str | None = None,
    add_bos: bool | None = None,
    min_tokens: int | None = None,
) -> list[torch.Tensor]:
    """Read ``source``, tokenize it and cut ``samples`` windows of ``length`` tokens.

    ``mode`` defaults to :func:`default_window_mode`; ``add_bos`` defaults to True
    in ``documents`` mode (the papers' BOS + L-1 tokens) and False in ``stream`` mode.
    ``min_tokens`` keeps only documents at least that long (see :func:`token_windows`).
    """
    mode = mode or default_window_mode(source)
    add_bos = (mode == "documents") if add_bos is None else add_bos
    streams = tokenize_documents(load_documents(source), tokenizer, mode)
    bos = tokenizer.bos_token_id if add_bos else None
    try:
        return token_windows(streams, length, samples, first_window=first_window, bos_token_id=bos, mode=mode,
                             min_tokens=min_tokens)
    except DataError as error:
        raise DataError(f"{source}: {error}") from None
