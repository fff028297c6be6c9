"""Chunked causal-LM loss: the LM head runs over chunks of loss tokens under checkpointing, so full-sequence
logits (T x V, in fp32) never exist. Returns a token-loss *sum* and a token *count*; the trainer divides by the
global count of the optimizer step, which is what makes accumulation and (later) parallelism exact."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss_sum(hidden: Tensor, targets: Tensor, head: nn.Module) -> Tensor:
    logits = head(hidden)
    # Softmax in at least fp32: bf16 log-sum-exp over a large vocabulary loses several digits.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_lm_loss(
    hidden: Tensor, labels: Tensor, head: nn.Module, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """Sum of token cross-entropies and the number of loss tokens.

    hidden: [..., T, H] final hidden states; labels: [..., T] already shifted (labels[t] is the target of
    position t, IGNORE_INDEX where nothing is trained). Only positions with a label reach the head, so SFT
    prompts cost no head FLOPs at all.
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    keep = (flat_labels != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    count = torch.tensor(keep.numel(), device=labels.device, dtype=torch.long)
    if keep.numel() == 0:
        # Keep the graph connected so every rank runs the same backward.
        return hidden.sum() * 0.0, count
    sel_hidden = flat_hidden.index_select(0, keep)
    sel_labels = flat_labels.index_select(0, keep)
    total = None
    for start in range(0, sel_hidden.shape[0], chunk_size):
        h = sel_hidden[start : start + chunk_size]
        y = sel_labels[start : start + chunk_size]
        if torch.is_grad_enabled():
            part = checkpoint(_chunk_loss_sum, h, y, head, use_reentrant=False)
        else:
            part = _chunk_loss_sum(h, y, head)
        total = part if total is None else total + part
    assert total is not None
    return total, count


def _chunk_token_logps(hidden: Tensor, targets: Tensor, head: nn.Module) -> Tensor:
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return -F.cross_entropy(logits, targets, reduction="none")


def chunked_sequence_logps(
    hidden: Tensor, labels: Tensor, sequence_ids: Tensor, num_sequences: int, head: nn.Module, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """Per-sequence sums of target log-probs over *this rank's* tokens, and their token counts.

    hidden [B, T, H]; labels [B, T] shifted; sequence_ids [B, T] (which sequence each position belongs to).
    Returns (sums [num_sequences] differentiable, counts [num_sequences]); under SP both are partial and are
    summed over the SP group by the caller. The head runs chunk by chunk under checkpointing, as for SFT.
    """
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    flat_ids = sequence_ids.reshape(-1)
    keep = (flat_labels != IGNORE_INDEX).nonzero(as_tuple=True)[0]
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    sums = hidden.new_zeros(num_sequences, dtype=dtype) + hidden.sum() * 0.0  # connected even with no label
    counts = torch.zeros(num_sequences, dtype=dtype, device=hidden.device)
    if keep.numel() == 0:
        return sums, counts
    sel_hidden = flat_hidden.index_select(0, keep)
    sel_labels = flat_labels.index_select(0, keep)
    sel_ids = flat_ids.index_select(0, keep)
    parts = []
    for start in range(0, sel_hidden.shape[0], chunk_size):
        h = sel_hidden[start : start + chunk_size]
        y = sel_labels[start : start + chunk_size]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_token_logps, h, y, head, use_reentrant=False))
        else:
            parts.append(_chunk_token_logps(h, y, head))
    token_logps = torch.cat(parts).to(dtype)
    sums = sums.index_add(0, sel_ids, token_logps)
    counts = counts.index_add(0, sel_ids, torch.ones_like(token_logps, dtype=dtype))
    return sums, counts
