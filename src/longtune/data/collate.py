"""Turn encoded examples into padded tensors with labels shifted to the position that predicts them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass
class Batch:
    input_ids: Tensor  # [B, T]
    labels: Tensor  # [B, T], shifted: labels[b, t] is the target of position t
    position_ids: Tensor  # [B, T]
    num_rows: int

    @property
    def num_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def shift_labels(labels: list[int]) -> list[int]:
    """labels[t] (the token at t, or IGNORE) becomes the target of position t-1; the last position gets IGNORE."""
    return labels[1:] + [IGNORE_INDEX]


def collate(examples, pad_token_id: int) -> Batch:
    """Right-pad to the longest example of this micro-batch (never to cutoff_len).

    Padding needs no attention mask: attention is causal, so real tokens never look at the pad tail, and pad
    positions carry IGNORE labels.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(shift_labels(list(example.labels)), dtype=torch.long)
    positions = torch.arange(width, dtype=torch.long).unsqueeze(0).expand(len(examples), width).contiguous()
    return Batch(input_ids=ids, labels=labels, position_ids=positions, num_rows=len(examples))
