"""Turn examples (plain or packed) into padded tensors with labels shifted to the position that predicts them,
per-document position ids and document ids."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longtune.constants import IGNORE_INDEX, PAD_DOCUMENT
from longtune.data.example import Example


@dataclass
class Batch:
    input_ids: Tensor  # [B, T]
    labels: Tensor  # [B, T], shifted: labels[b, t] is the target of position t
    position_ids: Tensor  # [B, T], restarting at 0 for every document
    doc_ids: Tensor  # [B, T], document index within the row; PAD_DOCUMENT on padding
    num_rows: int
    packed: bool  # some row holds more than one document: attention must respect doc_ids

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def document_lengths(example: Example) -> list[int]:
    return list(example.doc_lengths or [len(example.input_ids)])


def shift_labels(labels: list[int]) -> list[int]:
    """labels[t] (the token at t, or IGNORE) becomes the target of position t-1; the last position gets IGNORE."""
    return labels[1:] + [IGNORE_INDEX]


def shifted_document_labels(example: Example) -> list[int]:
    """Shift within each document, so a document's last position never predicts the next document's first token."""
    out: list[int] = []
    start = 0
    for n in document_lengths(example):
        out.extend(shift_labels(list(example.labels[start : start + n])))
        start += n
    return out


def loss_token_count(example: Example) -> int:
    return sum(1 for y in shifted_document_labels(example) if y != IGNORE_INDEX)


def collate(examples: list[Example], pad_token_id: int) -> Batch:
    """Right-pad to the longest example of this micro-batch (never to cutoff_len).

    Padding needs no attention mask: attention is causal (and document-aware for packed rows), so real tokens
    never look at the pad tail, and pad positions carry IGNORE labels.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(e.input_ids) for e in examples)
    shape = (len(examples), width)
    ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    positions = torch.arange(width, dtype=torch.long).repeat(len(examples), 1)
    docs = torch.full(shape, PAD_DOCUMENT, dtype=torch.long)
    packed = False
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(shifted_document_labels(example), dtype=torch.long)
        lengths = document_lengths(example)
        packed |= len(lengths) > 1
        start = 0
        for doc, length in enumerate(lengths):
            positions[row, start : start + length] = torch.arange(length)
            docs[row, start : start + length] = doc
            start += length
        # padding continues the last document's positions (any value works: it is never attended to by real tokens)
        positions[row, n:] = torch.arange(lengths[-1], lengths[-1] + width - n)
    return Batch(input_ids=ids, labels=labels, position_ids=positions, doc_ids=docs, num_rows=len(examples),
                 packed=packed)
