"""How a (packed) row is cut across the sequence-parallel group.

One layout serves every SP mode: the row is padded to a multiple of 2*sp and cut into 2*sp equal chunks; rank r
keeps chunks r and 2*sp-1-r ("zigzag"), so each rank holds one early and one late chunk and causal attention work
is balanced. Labels are shifted *before* the cut (labels[t] is the target of position t), so no label crosses a
rank boundary. Every local token carries its global index in the padded row and its document id, which is all
an attention kernel needs to build causal, document and sliding-window masks, whatever the order of the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from longtune.constants import IGNORE_INDEX, PAD_DOCUMENT


def zigzag_chunk_ids(sp_size: int, sp_rank: int) -> tuple[int, int]:
    return sp_rank, 2 * sp_size - 1 - sp_rank


def padded_length(length: int, sp_size: int) -> int:
    """The smallest multiple of 2*sp that holds `length` tokens (never padded to cutoff_len)."""
    unit = 2 * sp_size
    return -(-length // unit) * unit


def local_token_index(padded: int, sp_size: int, sp_rank: int) -> Tensor:
    """Global indices (into the padded row) of the tokens rank `sp_rank` keeps, in local order."""
    if padded % (2 * sp_size):
        raise ValueError(f"padded length {padded} is not a multiple of 2*sp={2 * sp_size}")
    chunk = padded // (2 * sp_size)
    first, second = zigzag_chunk_ids(sp_size, sp_rank)
    return torch.cat([torch.arange(first * chunk, (first + 1) * chunk), torch.arange(second * chunk, (second + 1) * chunk)])


@dataclass
class LocalShard:
    """One rank's part of a batch. All tensors are [B, T_local]."""

    input_ids: Tensor
    labels: Tensor  # already shifted; IGNORE on padding and at each document's last token
    position_ids: Tensor  # per-document positions (RoPE), global values
    seq_index: Tensor  # index of each token in the padded row
    doc_ids: Tensor  # document of each token; PAD_DOCUMENT on padding


def pad_row_tensors(
    input_ids: Tensor, labels: Tensor, position_ids: Tensor, doc_ids: Tensor, sp_size: int, pad_token_id: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Right-pad [B, T] tensors to a multiple of 2*sp. Padding gets IGNORE labels and its own document id."""
    length = input_ids.shape[-1]
    extra = padded_length(length, sp_size) - length
    if extra == 0:
        return input_ids, labels, position_ids, doc_ids

    def pad(x: Tensor, value: int) -> Tensor:
        return torch.nn.functional.pad(x, (0, extra), value=value)

    last_pos = position_ids[..., -1:] + 1 + torch.arange(extra)
    return (
        pad(input_ids, pad_token_id),
        pad(labels, IGNORE_INDEX),
        torch.cat([position_ids, last_pos], dim=-1),
        pad(doc_ids, PAD_DOCUMENT),
    )


def shard_for_sequence_parallel(
    input_ids: Tensor,
    labels: Tensor,
    position_ids: Tensor,
    doc_ids: Tensor,
    sp_size: int,
    sp_rank: int,
    pad_token_id: int,
) -> LocalShard:
    """Pad to 2*sp and keep this rank's zigzag chunks. With sp_size == 1 this only adds the index tensors."""
    ids, lab, pos, doc = pad_row_tensors(input_ids, labels, position_ids, doc_ids, sp_size, pad_token_id)
    index = local_token_index(ids.shape[-1], sp_size, sp_rank).to(ids.device)
    take = lambda x: x.index_select(-1, index)  # noqa: E731
    batch = ids.shape[0]
    return LocalShard(
        input_ids=take(ids),
        labels=take(lab),
        position_ids=take(pos),
        seq_index=index.unsqueeze(0).expand(batch, -1).contiguous(),
        doc_ids=take(doc),
    )


def unshard(local_parts: list[Tensor], sp_size: int, dim: int = -1) -> Tensor:
    """Inverse of the zigzag cut: rebuild the padded row from every rank's local tensor (tests, eval)."""
    chunks: list[Tensor | None] = [None] * (2 * sp_size)
    for rank, part in enumerate(local_parts):
        first, second = zigzag_chunk_ids(sp_size, rank)
        a, b = part.chunk(2, dim=dim)
        chunks[first], chunks[second] = a, b
    return torch.cat([c for c in chunks if c is not None], dim=dim)


def shard_tensor(x: Tensor, sp_size: int, sp_rank: int, pad_value: float | int) -> Tensor:
    """Any extra per-token [B, T] tensor cut exactly like the batch (padded with `pad_value`)."""
    extra = padded_length(x.shape[-1], sp_size) - x.shape[-1]
    if extra:
        x = torch.nn.functional.pad(x, (0, extra), value=pad_value)
    return x.index_select(-1, local_token_index(x.shape[-1], sp_size, sp_rank).to(x.device))
