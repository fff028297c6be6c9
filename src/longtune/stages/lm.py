"""Causal-LM objective shared by `sft` and `pt`: the stages differ only in which tokens the data pipeline
labels (assistant spans vs everything), so one function turns a batch into (loss_sum, count)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from longtune.data.collate import Batch
from longtune.losses.causal_lm import chunked_lm_loss
from longtune.models.loader import unwrap_base


@dataclass
class StageOutput:
    loss_sum: Tensor  # sum of token losses on this micro-batch (differentiable)
    count: Tensor  # number of loss tokens in it


def final_hidden_states(model: nn.Module, batch: Batch) -> Tensor:
    """Run the decoder stack only; the LM head is applied by the chunked loss."""
    base = unwrap_base(model)
    decoder = base.get_decoder()
    device = next(model.parameters()).device
    out = decoder(
        input_ids=batch.input_ids.to(device),
        position_ids=batch.position_ids.to(device),
        use_cache=False,
    )
    return out.last_hidden_state


def lm_loss(model: nn.Module, batch: Batch, loss_chunk_size: int) -> StageOutput:
    hidden = final_hidden_states(model, batch)
    head = unwrap_base(model).get_output_embeddings()
    loss_sum, count = chunked_lm_loss(hidden, batch.labels.to(hidden.device), head, loss_chunk_size)
    return StageOutput(loss_sum=loss_sum, count=count)
