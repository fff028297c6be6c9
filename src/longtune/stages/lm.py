"""Causal-LM objective shared by `sft` and `pt`: the stages differ only in which tokens the data pipeline
labels (assistant spans vs everything), so one function turns a batch into (loss_sum, count)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from longtune.losses.causal_lm import chunked_lm_loss
from longtune.models.loader import unwrap_base
from longtune.parallel.sequence import ModelInputs


@dataclass
class StageOutput:
    loss_sum: Tensor  # sum of token losses on this rank's part of the micro-batch (differentiable)
    count: Tensor  # number of loss tokens in it


def final_hidden_states(model: nn.Module, inputs: ModelInputs) -> Tensor:
    """Run the decoder stack only (the LM head is applied chunk by chunk by the loss)."""
    decoder = unwrap_base(model).get_decoder()
    extra = {"sp_context": inputs.sp_context} if inputs.sp_context is not None else {}
    out = decoder(input_ids=inputs.input_ids, position_ids=inputs.position_ids, use_cache=False, **extra)
    return out.last_hidden_state


def lm_loss(model: nn.Module, inputs: ModelInputs, loss_chunk_size: int) -> StageOutput:
    hidden = final_hidden_states(model, inputs)
    head = unwrap_base(model).get_output_embeddings()
    loss_sum, count = chunked_lm_loss(hidden, inputs.labels, head, loss_chunk_size)
    return StageOutput(loss_sum=loss_sum, count=count)
