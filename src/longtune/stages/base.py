"""What every training objective provides to the trainer: a per-rank loss *sum*, the example normaliser that
the trainer sums over the whole optimizer step, and optional metric (sum, count) pairs."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from longtune.models.loader import unwrap_base
from longtune.parallel.collectives import all_reduce_sum
from longtune.parallel.sequence import ModelInputs


class StageOutput(NamedTuple):
    """A NamedTuple so that FSDP's root hooks see the tensors (pytree-flattenable)."""

    loss_sum: Tensor  # this rank's share of the step's loss sum (differentiable)
    count: Tensor  # this rank's share of the normaliser (for eval)
    metrics: Tensor | None = None  # [2 * len(metric_names)]: (sum, count) per metric, rank shares


def final_hidden_states(model: nn.Module, inputs: ModelInputs) -> Tensor:
    """Run the decoder stack only (heads are applied by the stage, chunk by chunk)."""
    decoder = unwrap_base(model).get_decoder()
    extra = {"sp_context": inputs.sp_context} if inputs.sp_context is not None else {}
    out = decoder(input_ids=inputs.input_ids, position_ids=inputs.position_ids, use_cache=False, **extra)
    return out.last_hidden_state


def sequence_logps(model: nn.Module, inputs: ModelInputs, loss_chunk_size: int) -> tuple[Tensor, Tensor]:
    """Per-sequence target log-prob sums and token counts over the *whole* sequence (summed over SP ranks)."""
    from longtune.losses.causal_lm import chunked_sequence_logps

    hidden = final_hidden_states(model, inputs)
    head = unwrap_base(model).get_output_embeddings()
    assert inputs.sequence_ids is not None
    sums, counts = chunked_sequence_logps(
        hidden, inputs.labels, inputs.sequence_ids, inputs.num_sequences, head, loss_chunk_size
    )
    sums = all_reduce_sum(sums, inputs.sp_group, inputs.sp_size)
    with torch.no_grad():
        counts = all_reduce_sum(counts, inputs.sp_group, inputs.sp_size)
    return sums, counts


def metric_vector(values: list[tuple[Tensor, Tensor]], sp_size: int) -> Tensor:
    """(sum, count) pairs as one tensor. Every SP rank holds the same sequence-level values, so each rank
    contributes 1/sp of them: the all-reduce over the world then counts every sequence once."""
    flat = torch.stack([torch.stack([s.detach().double(), c.detach().double()]) for s, c in values]).reshape(-1)
    return flat / sp_size
