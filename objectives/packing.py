"""Training text as packed rows: documents back to back, cut into rows of one length, with per-document positions.

A row is a pair of ``[rows, length]`` tensors ``(tokens, starts)``: token ids, and True where a document
begins. Position ids restart at 0 at each start and the label of a start is :data:`IGNORE_INDEX`, so no loss
crosses a document boundary (transformers then keeps packed documents apart in attention: see
:mod:`hpo.finetune`). The fine-tuning stage trains on these rows and scores its held-out ones with
:func:`objectives.perplexity.packed_rows_loss`.
"""

from __future__ import annotations

import numpy as np
import torch

from objectives.data import DataError, load_documents, tokenize_documents

IGNORE_INDEX = -100  # transformers' cross-entropy skips these labels


def pack_documents(streams: list[torch.Tensor], length: int, eos_token_id: int | None,
                   bos_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Documents back to back, each followed by EOS, cut into rows of exactly ``length`` tokens.

    Returns ``(tokens, starts)``: token ids, and True where a document begins. The first token of every row
    counts as a start: a document cut by a row boundary continues from position 0. With ``bos_token_id``,
    every document starts with BOS, and so does every row: a row that starts inside a document has BOS in
    place of its first text token. The tail shorter than a row is dropped; no token is in two rows.
    """
    pieces, flags = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.bool)]  # no text: no rows
    bos = [] if bos_token_id is None else [bos_token_id]
    eos = [] if eos_token_id is None else [eos_token_id]
    for stream in streams:
        if stream.numel() == 0:
            continue
        document = torch.cat([torch.tensor(bos, dtype=torch.long), stream, torch.tensor(eos, dtype=torch.long)])
        start = torch.zeros(document.numel(), dtype=torch.bool)
        start[0] = True
        pieces.append(document)
        flags.append(start)
    tokens, starts = torch.cat(pieces), torch.cat(flags)
    rows = tokens.numel() // length
    return _rows(tokens[:rows * length], starts[:rows * length], length, bos_token_id)


def _rows(tokens: torch.Tensor, starts: torch.Tensor, length: int,
          bos_token_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    starts = starts.reshape(-1, length).clone()
    starts[:, 0] = True
    tokens = tokens.reshape(-1, length)
    if bos_token_id is not None:
        tokens = tokens.clone()
        tokens[:, 0] = bos_token_id  # the replaced token was a start: context only, never a label
    return tokens, starts


def split_rows(tokens: torch.Tensor, starts: torch.Tensor, length: int,
               bos_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row cut into ``row_length // length`` rows of ``length`` tokens (the mixed window's short rows).

    With ``bos_token_id``, each short row starts with BOS, as :func:`pack_documents` makes the long ones.
    """
    keep = tokens.shape[1] // length * length
    return _rows(tokens[:, :keep], starts[:, :keep], length, bos_token_id)


def model_inputs(tokens: torch.Tensor, starts: torch.Tensor) -> dict[str, torch.Tensor]:
    """``input_ids``, per-document ``position_ids`` and ``labels`` (-100 at document starts) for a forward."""
    index = torch.arange(tokens.shape[-1]).expand_as(tokens)
    last_start = torch.where(starts, index, 0).cummax(dim=-1).values
    return {"input_ids": tokens, "position_ids": index - last_start,
            "labels": tokens.masked_fill(starts, IGNORE_INDEX)}


def training_rows(position: int, count: int, rows: int, seed: int) -> list[int]:
    """Indices of the ``count`` training rows read from data position ``position`` on.

    Row ``position`` of the endless data order is row ``permutation(pass)[position % rows]`` with a new seeded
    permutation per pass, so any position is found again from the seed alone (what resuming needs).
    """
    chosen = []
    for index in range(position, position + count):
        epoch, offset = divmod(index, rows)
        chosen.append(int(np.random.default_rng([seed, epoch]).permutation(rows)[offset]))
    return chosen


def load_packed_rows(source: str, mode: str, tokenizer, length: int, *, first_document: int = 0,
                     bos_token_id: int | None = None, min_rows: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The documents of ``source`` from ``first_document`` on, tokenized as ``mode`` splits them, packed
    (:func:`pack_documents`); a :class:`~objectives.data.DataError` when they fill fewer than ``min_rows``."""
    streams = tokenize_documents(load_documents(source)[first_document:], tokenizer, mode)
    tokens, starts = pack_documents(streams, length, tokenizer.eos_token_id, bos_token_id)
    if len(tokens) < min_rows:
        total = sum(s.numel() for s in streams)
        raise DataError(f"{source}: text too short: from document {first_document} on it holds {total:,} "
                        f"tokens, {len(tokens)} sequences of {length:,}; {min_rows} are needed")
    return tokens, starts
